"""Where a forward's GPU time goes: per-kernel device time of one optimized model, plus the CUDA-graph
replay time of the same forward (what ``cuda_graph=True`` costs end to end).

    python benchmarks/profile_model.py --model dla34 --dtype float16 --batch 1 [--backend auto] [--json out.json]

The kernel table comes from torch.profiler over a few eager (non-graph) forwards, so its sum is pure kernel
time; replay minus that sum is what launch gaps and dependencies cost inside the graph.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dla_fast  # noqa: E402


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dla34")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hw", type=int, default=224)
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "eager"))
    ap.add_argument("--iters", type=int, default=20, help="profiled forwards")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    dtype = getattr(torch, a.dtype)
    torch.backends.cudnn.benchmark = True
    fast = dla_fast.optimize(dla_fast.create_model(a.model), dtype=dtype, backend=a.backend, device="cuda")
    x = torch.randn(a.batch, 3, a.hw, a.hw, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
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
        used = collections.Counter(fast.backends(a.batch).values())
    per = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time_total / 1000.0 / a.iters
            per[ev.name][1] += 1
    total = sum(v[0] for v in per.values())
    rows = sorted(((n, ms, cnt / a.iters) for n, (ms, cnt) in per.items()), key=lambda r: -r[1])
    print(f"{a.model} {a.dtype} batch {a.batch} backend={a.backend} ({dict(used)}) on {torch.cuda.get_device_name()}")
    print(f"kernel time per forward {total:.4f} ms over {sum(r[2] for r in rows):.0f} kernels; "
          f"CUDA-graph replay {graph_ms:.4f} ms")
    print(f"{'ms/fwd':>9} {'calls':>6}  kernel")
    for n, ms, calls in rows[:a.top]:
        print(f"{ms:9.4f} {calls:6.1f}  {n[:110]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "dtype": a.dtype, "batch": a.batch, "backend": a.backend,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "kernel_ms": total, "graph_ms": graph_ms, "backends": dict(used),
                       "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
