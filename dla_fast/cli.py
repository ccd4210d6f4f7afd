"""``python -m dla_fast bench|verify|tune|info``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

import torch


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"error: {msg}")


def _models(spec: str) -> List[str]:
    from .models import list_models

    if spec == "all":
        return list_models()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise _fail(f"--model names no model; choose from: all, {', '.join(list_models())}")
    bad = [n for n in names if n not in list_models()]
    if bad:
        raise _fail(f"unknown model(s) {', '.join(bad)}; choose from: all, {', '.join(list_models())}")
    return names


def _dtypes(spec: Optional[str], default: str) -> List[torch.dtype]:
    from .verify import DTYPE_NAMES

    spec = default if spec is None else spec
    names = ["float16", "bfloat16", "float32"] if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise _fail(f"--dtype names no dtype; choose from: all, {', '.join(DTYPE_NAMES)}")
    bad = [n for n in names if n not in DTYPE_NAMES]
    if bad:
        raise _fail(f"unknown dtype(s) {', '.join(bad)}; choose from: all, {', '.join(DTYPE_NAMES)}")
    return [DTYPE_NAMES[n] for n in names]


def _device(spec: Optional[str]) -> str:
    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise _fail("--device cuda but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return spec


def _hw(spec: Optional[str], default: Tuple[int, int]) -> Tuple[int, int]:
    """``--hw 224`` or ``--hw 608x1088``, checked against DLA's size rule."""
    from .models.dla import nearest_valid, valid_size

    if spec is None:
        return default
    parts = spec.lower().split("x")
    try:
        hw = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else None
    except ValueError:
        hw = None
    if hw is None:
        raise _fail(f"--hw must be a side like 224 or HxW like 608x1088, got {spec!r}")
    bad = [s for s in hw if not valid_size(s)]
    if bad:
        raise _fail(f"--hw {spec}: DLA runs only on sides of 32k-1 or 32k (31, 32, 63, 64, ..., 223, 224, ...); "
                    f"{', '.join(map(str, bad))} is not one. Nearest: {nearest_valid(hw[0])}x{nearest_valid(hw[1])}")
    return hw


def _positive(name: str, v: Optional[int]) -> Optional[int]:
    if v is not None and v < 1:
        raise _fail(f"{name} must be >= 1, got {v}")
    return v


def _batches(v: Optional[List[int]], default: List[int]) -> List[int]:
    if v is None:
        return default
    for b in v:
        _positive("--batch-size", b)
    return v


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_writable(path: Optional[str]) -> None:
    """Fail before measuring anything when ``--json`` cannot be written."""
    if path is None:
        return
    d = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(d, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise _fail(f"cannot write --json {path!r}: {e.strerror or e}") from None


def _write_json(path: str, obj: dict, quiet: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    if not quiet:
        _log(f"wrote {path}")


def cmd_bench(a) -> int:
    # Every process of a run sets it (a torchrun relaunch passes the flag on): the baselines get the cuDNN
    # algorithms timm's own scripts give them, and so do the convolutions dla_fast leaves to cuDNN. The caller's
    # setting comes back afterwards (cli.main may run inside a user's process).
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    try:
        return _bench(a)
    finally:
        torch.backends.cudnn.benchmark = before


def _bench(a) -> int:
    from . import bench, distributed

    try:
        world = distributed.world_from_env()  # set when torchrun started this process
    except ValueError as e:
        raise _fail(str(e)) from None
    main_rank = world is None or world.rank == 0
    log = _log if main_rank else (lambda s: None)  # only rank 0 speaks
    if a.distributed is not None:
        if world is not None:
            raise _fail("--distributed N starts torchrun itself; under torchrun (RANK/WORLD_SIZE set) leave it out")
        _positive("--distributed", a.distributed)
    if a.train and world is None and a.distributed is None:
        raise _fail("--train times data-parallel training steps (DDP) across processes: add --distributed N, or run "
                    "under torchrun (torchrun --nproc_per_node N -m dla_fast bench --train ...)")
    device = _device(a.device)
    if a.distributed is not None and device == "cuda" and a.distributed > torch.cuda.device_count():
        raise _fail(f"--distributed {a.distributed} needs one GPU per process, and {torch.cuda.device_count()} "
                    f"GPU(s) are visible; pass --distributed {torch.cuda.device_count()} or fewer")
    models = _models(a.model)
    cpu = device == "cpu"
    dtypes = _dtypes(a.dtype, "float32" if cpu else ("bfloat16" if a.train else "float16,bfloat16"))
    batch_sizes = _batches(a.batch_size, ([4] if a.train else [1, 4]) if cpu else ([128] if a.train else [256, 1]))
    hw = _hw(a.hw, (224, 224))
    for name in ("--rounds", "--iters"):
        _positive(name, getattr(a, name[2:]))
    if a.warmup is not None and a.warmup < 0:
        raise _fail(f"--warmup must be >= 0, got {a.warmup}")
    known = tuple(distributed.TRAIN_BUILDERS) if a.train else bench.IMPLS
    impls = [s.strip() for s in a.impl.split(",") if s.strip()] if a.impl is not None else list(
        distributed.TRAIN_DEFAULT_IMPLS["cpu" if cpu else "cuda"] if a.train
        else bench.CPU_DEFAULT_IMPLS if cpu else bench.GPU_DEFAULT_IMPLS)
    if not impls:
        raise _fail(f"--impl names no implementation; choose from: {', '.join(known)}")
    bad = [i for i in impls if i not in known]
    if bad:
        what = "no training step for" if a.train and all(i in bench.IMPLS for i in bad) else "unknown"
        raise _fail(f"{what} impl(s) {', '.join(bad)}; choose from: {', '.join(known)}")
    if a.train and (a.features or a.tune):
        raise _fail(f"--train times the classifier's training step; {'--features' if a.features else '--tune'} "
                    "applies to inference only")
    if main_rank:
        _check_writable(a.json)
    needs_timm = [i for i in impls if i.startswith(("timm", "torch_compile"))]
    if needs_timm:
        try:
            import timm  # noqa: F401
        except ImportError:
            log(f"note: timm is not installed, skipping {', '.join(needs_timm)} (pip install timm)")
            impls = [i for i in impls if i not in needs_timm]
    if a.distributed is not None:
        import subprocess

        cmd = distributed.relaunch_command(a.distributed, getattr(a, "argv", sys.argv[1:]))
        _log(f"launching: {' '.join(cmd)}")
        return subprocess.call(cmd)
    if cpu:
        log(f"note: no GPU in use: benchmarking on the CPU ({torch.get_num_threads()} threads) with small batches "
            f"{batch_sizes}; fused kernels need a GPU, so dla_fast runs its eager fallback here")
    log(f"bench: models={','.join(models)} dtypes={','.join(str(d)[6:] for d in dtypes)} batch={batch_sizes}"
        f"{'/rank' if world else ''} impls={','.join(impls)} device={device} input={hw[0]}x{hw[1]}"
        f"{' features_only' if a.features else ''}{' tuned' if a.tune else ''}{' train' if a.train else ''}"
        f"{f' ranks={world.world_size}' if world else ''}")
    rounds, warmup = a.rounds or (3 if cpu else 7), a.warmup if a.warmup is not None else (1 if cpu else 5)
    if world is not None:
        return _bench_distributed(a, world, device, models, dtypes, batch_sizes, impls, hw, rounds, warmup, log)
    result = bench.run(models, dtypes, batch_sizes, impls, device, hw, rounds, a.iters, warmup, log=_log,
                       on_partial=(lambda r: _write_json(a.json, r, quiet=True)) if a.json else None,
                       features=a.features, tune=a.tune)
    if a.json:
        _write_json(a.json, result)
    print(bench.format_table(result))
    return 0


def _bench_distributed(a, world, device, models, dtypes, batch_sizes, impls, hw, rounds, warmup, log) -> int:
    """This rank's part of a torchrun launch; rank 0 prints the table and writes --json."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from . import distributed

    try:
        dev = distributed.rank_device(device, world.local_rank, torch.cuda.device_count() if device == "cuda" else 0)
    except ValueError as e:
        raise _fail(f"rank {world.rank}: {e}") from None

    @record  # torchrun's failure summary then names the exception, not just the exit code
    def go():
        ctx = distributed.Context(world, dev)
        with ctx.failing_loudly():
            result = distributed.run(ctx, models, dtypes, batch_sizes, impls, hw, rounds, a.iters, warmup,
                                     train=a.train, features=a.features, tune=a.tune, log=log,
                                     on_partial=(lambda r: _write_json(a.json, r, quiet=True)) if a.json else None)
            ctx.close()
        return result

    result = go()
    if result is not None:
        if a.json:
            _write_json(a.json, result)
        print(distributed.format_table(result), flush=True)
    return 0


def cmd_verify(a) -> int:
    from . import verify

    device = _device(a.device)
    cpu = device == "cpu"
    models = _models(a.model)
    dtypes = _dtypes(a.dtype, "float32" if cpu else "all")
    hw = _hw(a.hw, (64, 64) if cpu else (224, 224))
    bs = _positive("--batch-size", a.batch_size) or (2 if cpu else 8)
    _check_writable(a.json)
    _log(f"verify: optimize(model, backend={a.backend!r}) vs a float64 reference on {device}, batch {bs}, "
         f"{hw[0]}x{hw[1]}; pass when err <= {verify.RATIO} x eager err + floor")
    rows = verify.verify(models, dtypes, device, a.backend, bs, hw, log=_log)
    if a.json:
        from .bench import environment
        env = environment(device)
        env["rows"] = verify.rows_as_dicts(rows)
        _write_json(a.json, env)
    print(verify.format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_tune(a) -> int:
    import dla_fast

    if not torch.cuda.is_available():
        raise _fail("tuning times kernels on a GPU, and no CUDA GPU is visible (torch.cuda.is_available() is False)")
    models = _models(a.model)
    dtypes = _dtypes(a.dtype, "float16")
    hw = _hw(a.hw, (224, 224))
    batch_sizes = _batches(a.batch_size, [1])
    if a.budget is not None and a.budget <= 0:
        raise _fail(f"--budget must be > 0 seconds, got {a.budget}")
    _check_writable(a.json)
    out = {"plans": {}, "runs": []}
    for name in models:
        for dt in dtypes:
            model = dla_fast.create_model(name, features_only=a.features,
                                          out_indices=(2, 3, 4, 5) if a.features else None)
            fast = dla_fast.optimize(model, dtype=dt, device="cuda")
            _log(f"tune: {name} {str(dt)[6:]} {hw[0]}x{hw[1]} batch {batch_sizes}")
            rep = dla_fast.tune(fast, hw, batch_sizes, budget_s=a.budget, force=a.force, progress=not a.quiet)
            out["plans"].update(rep.plans)
            out["runs"].append({"model": name, "dtype": rep.dtype, "summary": rep.summary(), "seconds": rep.seconds,
                                "measured": rep.measured, "reused": rep.reused, "changed": rep.changed,
                                "compiled": rep.compiled, "compile_s": round(rep.compile_s, 3),
                                "calls": rep.calls})
            print(f"{name} {rep.dtype}: {rep.summary()}")
    if a.json:
        from .bench import environment
        env = environment("cuda")
        env["capability"] = list(torch.cuda.get_device_capability())
        env.update(out)
        _write_json(a.json, env)
    cache = dla_fast.plan.PLANNER.cache(torch.device("cuda", torch.cuda.current_device()), dtypes[0])
    if cache is not None:
        print(f"plan cache: {cache.path}")
    return 0


def cmd_info(a) -> int:
    from . import __version__, backends
    from .backends import cuda as cuda_backend

    print(f"dla_fast {__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    if cuda_backend._C is not None:
        built = "with the sm_90a wgmma/TMA kernels" if cuda_backend._C.wgmma_built() else "without sm_90a"
        print(f"  extension dla_fast._C: built and loaded ({built})")
    else:
        print(f"  extension dla_fast._C: not loaded: {cuda_backend._load_error}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(0, device=dev, dtype=torch.float16 if dev == "cuda" else torch.float32)
    for name in backends.NAMES:
        why = backends.reason_unavailable(name, probe)
        print(f"  backend {name:<7}: {'available on ' + dev if why is None else 'unavailable: ' + why}")
    if dev == "cuda":
        from .plan import PLANNER
        d = torch.device("cuda", torch.cuda.current_device())
        cache = PLANNER.cache(d, torch.float16)
        print(f"  plan cache: {cache.describe() if cache is not None else 'none'}")
        for note in PLANNER.note(d, torch.float16):
            print(f"  {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dla_fast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="throughput/latency of timm eager, torch.compile and dla_fast side by side")
    b.add_argument("--model", default="dla34", help="a variant, a comma list, or 'all' (default dla34)")
    b.add_argument("--dtype", default=None, help="float16|bfloat16|float32|all or a comma list "
                   "(default float16,bfloat16 on GPU, float32 on CPU)")
    b.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch sizes, per process under torchrun (default 256 1 on GPU, 1 4 on CPU; with --train "
                   "128 on GPU, 4 on CPU)")
    b.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    b.add_argument("--impl", default=None, help="comma list of implementations (default: all that apply)")
    b.add_argument("--hw", default=None, help="input size: a side (224) or HxW (608x1088); default 224")
    b.add_argument("--features", action="store_true",
                   help="benchmark the features_only backbone (levels 2-5), as detectors use it")
    b.add_argument("--tune", action="store_true", help="tune dla_fast's plan at this shape before timing")
    b.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (median is reported)")
    b.add_argument("--iters", type=int, default=None, help="calls per timing sample")
    b.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation")
    b.add_argument("--json", default=None, help="write the full results here")
    b.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (default: on, as timm's train.py and benchmark.py "
                   "set it, so every cuDNN convolution, the baselines' included, runs the algorithm cuDNN times best)")
    b.add_argument("--distributed", type=int, default=None, metavar="N",
                   help="run data-parallel on N processes of this node, one per GPU, by starting this command under "
                   "torchrun (torch.distributed.run --standalone --nproc_per_node N); see docs/distributed.md")
    b.add_argument("--train", action="store_true", help="time data-parallel training steps (DDP) instead of inference: "
                   "timm_eager, torch_compile, dla_fast_eager, dla_fast_fused, dla_fast_fused_save_memory, and the "
                   "CUDA-graph captured timm_eager_graph, dla_fast_fused_graph, dla_fast_fused_save_memory_graph "
                   "(rank 0 alone, no DDP) (default on GPU: timm_eager, "
                   "torch_compile, dla_fast_fused, dla_fast_fused_graph); needs torchrun or --distributed")
    b.set_defaults(fn=cmd_bench)
    v = sub.add_parser("verify", help="check optimize() against a float64 reference, pass/fail table")
    v.add_argument("--model", default="all", help="a variant, a comma list, or 'all' (default all)")
    v.add_argument("--dtype", default=None, help="default: all on GPU, float32 on CPU")
    v.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "eager"))
    v.add_argument("--device", choices=("cuda", "cpu"), default=None)
    v.add_argument("--batch-size", type=int, default=None, help="default 8 on GPU, 2 on CPU")
    v.add_argument("--hw", default=None, help="input size, a side or HxW (default 224 on GPU, 64 on CPU)")
    v.add_argument("--json", default=None)
    v.set_defaults(fn=cmd_verify)
    t = sub.add_parser("tune", help="time every layer's kernels on this GPU at an input size and cache the winners")
    t.add_argument("--model", default="dla34", help="a variant, a comma list, or 'all' (default dla34)")
    t.add_argument("--dtype", default=None, help="float16|bfloat16|float32|all or a comma list (default float16)")
    t.add_argument("--hw", default=None, help="input size, a side or HxW (default 224)")
    t.add_argument("--batch-size", type=int, nargs="+", default=None, help="batch sizes (default 1)")
    t.add_argument("--features", action="store_true", help="tune the features_only backbone (levels 2-5)")
    t.add_argument("--budget", type=float, default=None, help="seconds of measuring per model and dtype (default: "
                   "no limit)")
    t.add_argument("--force", action="store_true", help="measure again what the cache already holds")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.add_argument("--json", default=None, help="write every measured candidate here (what make_prior.py reads)")
    t.set_defaults(fn=cmd_tune)
    i = sub.add_parser("info", help="versions, the extension, which backends can run here, the plan cache")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # what --distributed starts again under torchrun
    return a.fn(a)
