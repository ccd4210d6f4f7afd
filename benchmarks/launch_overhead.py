"""Host-side cost of one fused-op call, per path: where the CPU, not the GPU, sets the pace (batch 1 without
CUDA graphs, the small 7x7 layers of the "_c" variants at any batch).

    python benchmarks/launch_overhead.py [--calls 300]

Each path is called back to back on a tiny problem (the GPU finishes each kernel before the next launch is
issued), so wall time / calls is the per-call host cost. Also times whole eager forwards at batch 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dla_fast  # noqa: E402
from dla_fast.ops import _backends  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args(argv)
    dt = torch.float16
    x = torch.randn(1, 64, 7, 7, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, device="cuda", dtype=dt) * 0.05).contiguous(memory_format=torch.channels_last)
    b = torch.randn(64, device="cuda")
    kids = [x, x]
    w2 = torch.randn(64, 128, device="cuda", dtype=dt) * 0.05
    tb = _backends.get("triton")
    cb = _backends.get("cuda")
    paths = {
        "eager F.conv2d(bias) + relu_": lambda: F.conv2d(x, w, b.half(), 1, 1).relu_(),
        "ops.conv_bn_act(backend='triton') (public, validated)":
            lambda: dla_fast.ops.conv_bn_act(x, w, b, stride=1, padding=1, backend="triton"),
        "triton backend conv (what FusedDLA calls)": lambda: tb.conv_bn_act(x, w, b, (1, 1), (1, 1), 1, None, True),
        "torch.ops.dla_fast_triton.conv_bn_act (registered op)":
            lambda: torch.ops.dla_fast_triton.conv_bn_act(x, w, b, [1, 1], [1, 1], 1, None, True, True),
        "triton backend aggregate": lambda: tb.aggregate(kids, w2, b, None, True),
        "torch.ops.dla_fast_triton.aggregate (registered op)":
            lambda: torch.ops.dla_fast_triton.aggregate(kids, w2, b, None, True, True),
        "triton max_pool2d": lambda: tb.max_pool2d(x, 2),
        "F.max_pool2d": lambda: F.max_pool2d(x, 2, 2),
    }
    if cb is not None and cb.unavailable_reason(x) is None:
        paths["cuda backend conv"] = lambda: cb.conv_bn_act(x, w, b, (1, 1), (1, 1), 1, None, True)
        paths["cuda backend aggregate"] = lambda: cb.aggregate(kids, w2, b, None, True)
    print(f"host cost per call, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with torch.inference_mode():
        for name, fn in paths.items():
            try:
                print(f"{per_call_us(fn, a.calls):8.1f} us  {name}")
            except Exception as e:  # report and go on
                print(f"     ERR  {name}: {type(e).__name__}: {e}")
        xi = torch.randn(1, 3, 224, 224, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
        for backend in ("auto", "triton", "cuda", "eager"):
            try:
                fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=dt, backend=backend, device="cuda")
                print(f"{per_call_us(lambda: fast(xi), 30) / 1000:8.3f} ms  dla34 bs1 eager forward, backend={backend}")
            except Exception as e:
                print(f"     ERR  dla34 backend={backend}: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
