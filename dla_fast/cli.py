"""``python -m dla_fast bench|verify|info``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch


def _models(spec: str) -> List[str]:
    from .models import list_models

    if spec == "all":
        return list_models()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in list_models()]
    if bad:
        raise SystemExit(f"error: unknown model(s) {', '.join(bad)}; choose from: all, {', '.join(list_models())}")
    return names


def _dtypes(spec: str, device: str) -> List[torch.dtype]:
    from .verify import DTYPE_NAMES

    if spec == "all":
        names = ["float16", "bfloat16", "float32"]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in DTYPE_NAMES]
    if bad:
        raise SystemExit(f"error: unknown dtype(s) {', '.join(bad)}; choose from: all, {', '.join(DTYPE_NAMES)}")
    return [DTYPE_NAMES[n] for n in names]


def _device(spec: Optional[str]) -> str:
    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return spec


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_json(path: str, obj: dict, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    if not quiet:
        _log(f"wrote {path}")


def cmd_bench(a) -> int:
    from . import bench

    device = _device(a.device)
    models = _models(a.model)
    cpu = device == "cpu"
    dtypes = _dtypes(a.dtype or ("float32" if cpu else "float16,bfloat16"), device)
    batch_sizes = a.batch_size or ([1, 4] if cpu else [256, 1])
    impls = [s.strip() for s in a.impl.split(",")] if a.impl else list(
        bench.CPU_DEFAULT_IMPLS if cpu else bench.GPU_DEFAULT_IMPLS)
    bad = [i for i in impls if i not in bench.IMPLS]
    if bad:
        raise SystemExit(f"error: unknown impl(s) {', '.join(bad)}; choose from: {', '.join(bench.IMPLS)}")
    needs_timm = [i for i in impls if i.startswith(("timm", "torch_compile"))]
    if needs_timm:
        try:
            import timm  # noqa: F401
        except ImportError:
            _log(f"note: timm is not installed, skipping {', '.join(needs_timm)} (pip install timm)")
            impls = [i for i in impls if i not in needs_timm]
    hw = a.hw or (224 if not cpu else 224)
    if cpu:
        _log(f"note: no GPU in use: benchmarking on the CPU ({torch.get_num_threads()} threads) with small batches "
             f"{batch_sizes}; fused kernels need a GPU, so dla_fast runs its eager fallback here")
    _log(f"bench: models={','.join(models)} dtypes={','.join(str(d)[6:] for d in dtypes)} batch={batch_sizes} "
         f"impls={','.join(impls)} device={device} input={hw}x{hw}")
    result = bench.run(models, dtypes, batch_sizes, impls, device, hw, a.rounds or (3 if cpu else 7), a.iters,
                       a.warmup if a.warmup is not None else (1 if cpu else 5), log=_log,
                       on_partial=(lambda r: _write_json(a.json, r, quiet=True)) if a.json else None)
    if a.json:
        _write_json(a.json, result)
    print(bench.format_table(result))
    return 0


def cmd_verify(a) -> int:
    from . import verify

    device = _device(a.device)
    cpu = device == "cpu"
    models = _models(a.model)
    dtypes = _dtypes(a.dtype or ("float32" if cpu else "all"), device)
    hw = a.hw or (64 if cpu else 224)
    bs = a.batch_size or (2 if cpu else 8)
    _log(f"verify: optimize(model, backend={a.backend!r}) vs a float64 reference on {device}, batch {bs}, "
         f"{hw}x{hw}; pass when err <= {verify.RATIO} x eager err + floor")
    rows = verify.verify(models, dtypes, device, a.backend, bs, (hw, hw), log=_log)
    if a.json:
        from .bench import environment
        env = environment(device)
        env["rows"] = verify.rows_as_dicts(rows)
        _write_json(a.json, env)
    print(verify.format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_info(a) -> int:
    from .ops import _backends

    print(f"dla_fast {__import__('dla_fast').__version__}, torch {torch.__version__}, "
          f"CUDA available: {torch.cuda.is_available()}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(0, device=dev, dtype=torch.float16 if dev == "cuda" else torch.float32)
    for name in ("triton", "cuda"):
        why = _backends.reason_unavailable(name, probe)
        print(f"  backend {name:<7}: {'available' if why is None else 'unavailable: ' + why}")
    if dev == "cuda":
        from .backends import cuda as _cuda
        if _cuda._C is not None:
            print(f"  cuda kernels  : {'wgmma (sm_90a) + ' if _cuda.has_wgmma() else ''}mma.sync tensor cores, "
                  f"SIMT fp32 ({'sm_90a build' if _cuda._C.wgmma_built() else 'built without sm_90a'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dla_fast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="throughput/latency of timm eager, torch.compile and dla_fast side by side")
    b.add_argument("--model", default="dla34", help="a variant, a comma list, or 'all' (default dla34)")
    b.add_argument("--dtype", default=None, help="float16|bfloat16|float32|all or a comma list "
                   "(default float16,bfloat16 on GPU, float32 on CPU)")
    b.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch sizes (default 256 1 on GPU, 1 4 on CPU)")
    b.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    b.add_argument("--impl", default=None, help="comma list of implementations (default: all that apply)")
    b.add_argument("--hw", type=int, default=None, help="input side (default 224)")
    b.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (median is reported)")
    b.add_argument("--iters", type=int, default=None, help="calls per timing sample")
    b.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation")
    b.add_argument("--json", default=None, help="write the full results here")
    b.set_defaults(fn=cmd_bench)
    v = sub.add_parser("verify", help="check optimize() against a float64 reference, pass/fail table")
    v.add_argument("--model", default="all", help="a variant, a comma list, or 'all' (default all)")
    v.add_argument("--dtype", default=None, help="default: all on GPU, float32 on CPU")
    v.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "eager"))
    v.add_argument("--device", choices=("cuda", "cpu"), default=None)
    v.add_argument("--batch-size", type=int, default=None, help="default 8 on GPU, 2 on CPU")
    v.add_argument("--hw", type=int, default=None, help="input side (default 224 on GPU, 64 on CPU)")
    v.add_argument("--json", default=None)
    v.set_defaults(fn=cmd_verify)
    i = sub.add_parser("info", help="versions and which backends can run here")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)
