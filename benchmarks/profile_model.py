"""Where a forward's GPU time goes: per-kernel device time of one optimized model, plus the CUDA-graph
replay time of the same forward (what ``cuda_graph=True`` costs end to end).

    python benchmarks/profile_model.py --model dla34 --dtype float16 --batch 1 [--backend auto] [--json out.json]

The kernel table comes from torch.profiler over a few eager (non-graph) forwards, so its sum is pure kernel
time; replay minus that sum is what launch gaps and dependencies cost inside the graph.

With ``--train IMPLS`` (``bench --train``'s implementations, e.g. ``dla_fast_fused,torch_compile``): one SGD
training step of each instead (autocast to ``--dtype``, batch ``--batch``), its kernels grouped by what they do,
side by side, then each implementation's top kernels; also the host's time to issue the step and its wall time.

With ``--host``: where the host's time to issue one forward goes, run without a CUDA graph from an idle GPU (the
detection calls of `bench --features` are paced by it): the issue time, the ops' own CPU time by op (torch.profiler,
which adds its own cost to every op it records) and the Python functions by their own time (cProfile, likewise):

    python benchmarks/profile_model.py --host --model dla169 --features --hw 512x512 --batch 8 --backend cuda
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Dict, List, Tuple

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dla_fast  # noqa: E402
from dla_fast.shapes import parse_hw  # noqa: E402


def _graph_ms(fast, x, iters: int = 200) -> float:
    runner = dla_fast.fuse.CudaGraphRunner(fast)
    for _ in range(3):
        runner(x)
    torch.cuda.synchronize()
    graph, static_x, _ = runner._graphs[next(iter(runner._graphs))]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def _kernel_times(prof, iters: int) -> Dict[str, Tuple[float, float]]:
    """{kernel name: (ms, launches)} per profiled iteration, from a torch.profiler run over ``iters``."""
    per: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time_total / 1000.0 / iters
            per[ev.name][1] += 1 / iters
    return {n: (ms, calls) for n, (ms, calls) in per.items()}


# Kernel classes of a training step, first match wins: (class, substrings of the kernel's name).
TRAIN_CLASSES = (
    ("inductor fused (triton)", ("triton_",)),  # Inductor's kernels; ours do not start with "triton_"
    ("statistics conv (triton)", ("_conv_stats_kernel", "_agg_stats_kernel", "_tensor_stats_kernel")),
    ("BN apply (triton)", ("_bn_act_kernel",)),
    ("BN backward reduce (triton)", ("_bn_bwd_reduce",)),
    ("BN backward apply (triton)", ("_bn_bwd_apply",)),
    ("statistics finalize (triton)", ("_stats_combine", "_sum_chunks", "_bn_bwd_finalize")),
    ("max pool (triton)", ("_max_pool",)),
    ("stem (cuda)", ("stem_conv_kernel",)),
    # the inference conv kernels run in a training step only as the shared inputs' data gradients
    ("shared dgrad (triton)", ("_conv_gemm_kernel", "_conv_direct_kernel")),
    ("conv dgrad", ("dgrad", "Dgrad")),
    ("conv wgrad", ("wgrad", "Wgrad")),
    ("conv forward", ("fprop", "Fprop", "implicit_gemm", "conv2d")),
    ("gemm (1x1 convs, fc)", ("gemm", "Gemm", "nvjet", "cutlass", "splitKreduce")),
    ("batch norm (aten)", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("optimizer", ("multi_tensor", "foreach")),
    ("adds (aten)", ("CUDAFunctor_add", "AddFunctor")),
    ("other elementwise (aten)", ("elementwise", "vectorized", "unrolled")),
    ("reductions (aten)", ("reduce",)),
    ("copies", ("copy", "Memcpy", "Memset", "cat")),
)


def kernel_class(name: str) -> str:
    """The training-step class of a kernel name (TRAIN_CLASSES), or "other"."""
    for cls, subs in TRAIN_CLASSES:
        if any(sub in name for sub in subs):
            return cls
    return "other"


def _profile_train(a, impls) -> int:
    import time

    from dla_fast.distributed import make_train_step, sgd, train_model
    from torch.profiler import ProfilerActivity, profile

    dtype = getattr(torch, a.dtype)
    rows = {}
    for impl in impls:
        torch.manual_seed(0)
        model = train_model(impl, a.model).cuda().to(memory_format=torch.channels_last).train()
        x = torch.randn(a.batch, 3, a.hw, a.hw, device="cuda").contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (a.batch,), device="cuda")
        run = torch.compile(model) if impl == "torch_compile" else model
        step = make_train_step(run, sgd(model), x, y, None if dtype == torch.float32 else dtype)
        print(f"{impl}: warming up (torch.compile compiles here)", flush=True)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        issue, wall = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            issue.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.iters):
                step()
            torch.cuda.synchronize()
        per = _kernel_times(prof, a.iters)
        classes = collections.defaultdict(lambda: [0.0, 0.0])
        for n, (ms, calls) in per.items():
            classes[kernel_class(n)][0] += ms
            classes[kernel_class(n)][1] += calls
        rows[impl] = {"issue_ms": 1e3 * sorted(issue)[2], "wall_ms": 1e3 * sorted(wall)[2],
                      "kernel_ms": sum(v[0] for v in per.values()),
                      "classes": {c: {"ms": v[0], "calls": v[1]} for c, v in classes.items()},
                      "kernels": [{"name": n, "ms": v[0], "calls": v[1]}
                                  for n, v in sorted(per.items(), key=lambda kv: -kv[1][0])]}
        del model, run, step
        torch.cuda.empty_cache()
    amp = "float32" if dtype == torch.float32 else f"{a.dtype} autocast"
    print(f"{a.model} training step, batch {a.batch}, {amp}, {a.hw}x{a.hw}, on "
          f"{torch.cuda.get_device_name()}; ms per step")
    print(f"{'':32}" + "".join(f"{i[:22]:>24}" for i in impls))
    for k in ("kernel_ms", "issue_ms", "wall_ms"):
        print(f"{k:32}" + "".join(f"{rows[i][k]:24.2f}" for i in impls))
    for c in [c for c, _ in TRAIN_CLASSES] + ["other"]:
        if any(c in rows[i]["classes"] for i in impls):
            cells = [rows[i]["classes"].get(c, {"ms": 0.0, "calls": 0}) for i in impls]
            print(f"{c:32}" + "".join(f"{v['ms']:13.2f} ms x{v['calls']:6.0f}" for v in cells))
    for i in impls:
        print(f"top kernels, {i}:")
        for k in rows[i]["kernels"][:a.top]:
            print(f"  {k['ms']:8.3f} ms x{k['calls']:5.0f}  {k['name'][:100]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "dtype": a.dtype, "batch": a.batch, "hw": a.hw, "mode": "train",
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "impls": rows}, f,
                      indent=1)
    return 0


def host_rows(averages, iters: int) -> List[Dict]:
    """Per op of a torch.profiler CPU run over ``iters`` forwards (``prof.key_averages()``: objects with ``key``,
    ``count``, ``self_cpu_time_total`` and ``cpu_time_total`` in microseconds): calls, own and inclusive CPU
    microseconds per forward and own microseconds per call, by own time per forward."""
    rows = [{"op": e.key, "calls": e.count / iters, "self_us": e.self_cpu_time_total / iters,
             "total_us": e.cpu_time_total / iters,
             "self_us_per_call": e.self_cpu_time_total / max(e.count, 1)} for e in averages]
    return sorted(rows, key=lambda r: -r["self_us"])


def _model_and_input(a):
    """The optimized model of the arguments (features_only with --features) on the GPU, a channels_last input
    of --batch x --hw (parsed: (H, W)) in --dtype, and (H, W)."""
    dtype = getattr(torch, a.dtype)
    hw = a.hw
    model = (dla_fast.create_model(a.model, features_only=True, out_indices=(2, 3, 4, 5)) if a.features
             else dla_fast.create_model(a.model))
    fast = dla_fast.optimize(model, dtype=dtype, backend=a.backend, device="cuda")
    x = torch.randn(a.batch, 3, *hw, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    return fast, x, hw


def _profile_host(a) -> int:
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from dla_fast.bench import host_once  # from an idle GPU: the launch queue never blocks the host

    fast, x, hw = _model_and_input(a)
    with torch.inference_mode():
        for _ in range(5):
            fast(x)
        plain = sorted(host_once(fast, x) for _ in range(a.iters))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = sorted(host_once(fast, x) for _ in range(a.iters))
        pr = cProfile.Profile()
        for _ in range(a.iters):
            torch.cuda.synchronize()
            pr.enable()
            fast(x)
            pr.disable()
        torch.cuda.synchronize()
        used = collections.Counter(fast.backends(a.batch, hw).values())
    ops = host_rows(prof.key_averages(), a.iters)
    launches = sum(r["calls"] for r in ops if r["op"] in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                          "cuLaunchKernelEx"))
    med = lambda v: 1e3 * v[len(v) // 2]  # noqa: E731
    feats = " features_only" if a.features else ""
    print(f"{a.model}{feats} {a.dtype} batch {a.batch} at {hw[0]}x{hw[1]}, backend={a.backend} ({dict(used)}) on "
          f"{torch.cuda.get_device_name()}")
    print(f"host time to issue one forward: {med(plain):.3f} ms ({med(profiled):.3f} ms under torch.profiler); "
          f"{launches:.0f} kernel launches recorded a forward")
    print(f"{'own us/fwd':>11} {'calls':>7} {'own us/call':>12} {'incl us/fwd':>12}  op (torch.profiler, CPU)")
    for r in ops[:a.top]:
        print(f"{r['self_us']:11.1f} {r['calls']:7.1f} {r['self_us_per_call']:12.2f} {r['total_us']:12.1f}  "
              f"{r['op'][:80]}")
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(a.top)
    print(f"Python functions by own time over {a.iters} forwards (cProfile):")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "features": bool(a.features), "dtype": a.dtype, "batch": a.batch,
                       "hw": list(hw), "backend": a.backend, "mode": "host", "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "backends": dict(used), "issue_ms": med(plain),
                       "issue_ms_profiled": med(profiled), "launches": launches, "ops": ops,
                       "python": text.getvalue()}, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dla34")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hw", default="224", help="input size, N or HxW (HxW: not with --train)")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "eager"))
    ap.add_argument("--iters", type=int, default=20, help="profiled forwards (training steps with --train)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave torch.backends.cudnn.benchmark off (default: on, as in `python -m dla_fast bench`)")
    ap.add_argument("--train", default=None, metavar="IMPLS",
                    help="profile one training step of each of these comma-separated implementations instead "
                         "(bench --train's: timm_eager, torch_compile, dla_fast_fused, ...)")
    ap.add_argument("--host", action="store_true",
                    help="where the host's time to issue one forward goes (no CUDA graph), instead of kernel times")
    ap.add_argument("--features", action="store_true", help="the features_only model (levels 2-5; not with --train)")
    a = ap.parse_args(argv)
    if a.host and a.train is not None:
        ap.error("--host and --train are separate modes: pick one")
    if a.train is not None and ("x" in str(a.hw).lower() or a.features):
        ap.error("--train profiles the classifier at a square --hw N: drop --features and HxW")
    try:
        a.hw = parse_hw(a.hw)
    except ValueError as e:
        ap.error(f"--hw: {e}")
    if a.train is not None:
        a.hw = a.hw[0]
    impls = None
    if a.train is not None:
        from dla_fast.distributed import TRAIN_BUILDERS
        impls = [i for i in a.train.split(",") if i]
        bad = [i for i in impls if i not in TRAIN_BUILDERS or i.endswith("_graph")]
        if not impls or bad:
            ap.error(f"--train: unknown or captured implementation(s) {bad or a.train!r}; profile one of "
                     f"{', '.join(i for i in TRAIN_BUILDERS if not i.endswith('_graph'))}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark  # as `python -m dla_fast bench` runs
    if a.host:
        return _profile_host(a)
    if impls is not None:
        return _profile_train(a, impls)
    fast, x, hw = _model_and_input(a)
    # graph_mode: the profiled eager forwards run the kernels the graph replays (without it, auto at small
    # batches takes the launch-bound choice and the table would describe another forward than graph_ms).
    with torch.inference_mode(), dla_fast.fuse.graph_mode():
        for _ in range(3):
            fast(x)
        torch.cuda.synchronize()
        graph_ms = _graph_ms(fast, x)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.iters):
                fast(x)
            torch.cuda.synchronize()
        used = collections.Counter(fast.backends(a.batch, hw).values())
    per = _kernel_times(prof, a.iters)
    total = sum(v[0] for v in per.values())
    rows = sorted(((n, ms, calls) for n, (ms, calls) in per.items()), key=lambda r: -r[1])
    feats = " features_only" if a.features else ""
    print(f"{a.model}{feats} {a.dtype} batch {a.batch} at {hw[0]}x{hw[1]} backend={a.backend} ({dict(used)}) on "
          f"{torch.cuda.get_device_name()}")
    print(f"kernel time per forward {total:.4f} ms over {sum(r[2] for r in rows):.0f} kernels; "
          f"CUDA-graph replay {graph_ms:.4f} ms")
    print(f"{'ms/fwd':>9} {'calls':>6}  kernel")
    for n, ms, calls in rows[:a.top]:
        print(f"{ms:9.4f} {calls:6.1f}  {n[:110]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "features": bool(a.features), "dtype": a.dtype, "batch": a.batch,
                       "hw": list(hw), "backend": a.backend, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                       "kernel_ms": total, "graph_ms": graph_ms, "backends": dict(used),
                       "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
