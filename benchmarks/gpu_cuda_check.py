#!/usr/bin/env python3
"""Correctness and speed of the CUDA C++ backend (``dla_fast._C``) at the real DLA layer shapes, on a GPU.

    python3 -m pip install --no-build-isolation --no-deps -e .       # builds dla_fast._C
    python3 benchmarks/gpu_cuda_check.py                 # (a) correctness, batch 8; (b) timing, batch 256
    python3 benchmarks/gpu_cuda_check.py --no-timing     # (a) only
    python3 benchmarks/gpu_cuda_check.py --sanitize      # tiny driver for compute-sanitizer, see below

(a) every distinct fused-op shape of the DLA variants in MODELS (read off the models by benchmarks/shapes.py,
    with a built-in list as fallback) at batch 8 in fp16/bf16/fp32: our error vs a float64 reference, next
    to eager PyTorch's error in the same dtype (fp32 with TF32 off). Outputs are poisoned with NaN first.
(b) at batch 256, fp16 then bf16, as long as the time budget lasts: ours vs cuDNN conv alone vs eager
    conv+BN(+res)+ReLU, and aggregate vs eager cat+conv+BN(+res)+ReLU; ms (median of CUDA-event timings),
    TFLOP/s, GB/s of the minimum traffic, and the fraction of the H100 roofline (740 TFLOP/s, 3.0 TB/s).
A failing shape is reported, never a crash. The compact table prints last; JSON goes to $OUT/cuda_ops.json.

Sanitizers (each a few seconds; PYTORCH_NO_CUDA_MEMORY_CACHING makes every tensor its own allocation, so
memcheck sees out-of-bounds accesses that the caching allocator would otherwise hide):

    S=/usr/local/cuda/bin/compute-sanitizer
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 $S --tool memcheck  --error-exitcode 9 python3 benchmarks/gpu_cuda_check.py --sanitize
    $S --tool racecheck --error-exitcode 9 python3 benchmarks/gpu_cuda_check.py --sanitize
    $S --tool synccheck --error-exitcode 9 python3 benchmarks/gpu_cuda_check.py --sanitize
    $S --tool initcheck --error-exitcode 9 python3 benchmarks/gpu_cuda_check.py --sanitize

DLA_FAST_CUDA_KERNEL=wgmma|tc|simt|direct forces a kernel family (a failing tensor-core shape is re-run with
``simt`` automatically, to tell a tiling bug from a gather bug).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dla_fast.ops as ops  # noqa: E402
from dla_fast.ops.reference import aggregate_ref, conv_bn_act_ref  # noqa: E402

MODELS = ("dla34", "dla46x_c", "dla60", "dla60x", "dla102x2", "dla169", "dla60_res2net", "dla60_res2next")
PEAK_FLOPS = 740e12  # H100 SXM dense bf16/fp16 (brief's figure)
PEAK_BW = 3.0e12     # achievable copy bandwidth
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Case:
    op: str                       # "conv_bn_act" | "aggregate"
    cin: Tuple[int, ...]
    hw: Tuple[int, int]
    cout: int
    kernel: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    groups: int = 1
    residual: str = "none"        # none | tensor | child0
    relu: bool = True
    pitches: Tuple[int, ...] = ()  # channel pitch of each input (> cin: a channel slice of a wider tensor)
    count: int = 1                 # layers with this shape over MODELS

    @property
    def out_hw(self):
        (h, w), (kh, kw), (sh, sw), (ph, pw) = self.hw, self.kernel, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def flops(self, n):
        ho, wo = self.out_hw
        return 2 * n * ho * wo * self.cout * (sum(self.cin) // self.groups) * self.kernel[0] * self.kernel[1]

    def min_bytes(self, n, itemsize):
        h, w = self.hw
        ho, wo = self.out_hw
        out = n * ho * wo * self.cout * itemsize
        wgt = self.cout * (sum(self.cin) // self.groups) * self.kernel[0] * self.kernel[1] * itemsize
        return n * h * w * sum(self.cin) * itemsize + wgt + self.cout * 4 + out * (2 if self.residual == "tensor" else 1)

    def label(self):
        h, w = self.hw
        cin = "+".join(map(str, self.cin))
        res = {"none": "", "tensor": " +res", "child0": " +c0"}[self.residual]
        act = "" if self.relu else " norelu"
        pit = "" if self.pitches == self.cin else " p" + "/".join(map(str, self.pitches))
        if self.op == "aggregate":
            return f"agg {cin}->{self.cout} @{h}{res}{act}{pit}"
        kh, kw = self.kernel
        g = f" g{self.groups}" if self.groups > 1 else ""
        s = f" s{self.stride[0]}" if self.stride != (1, 1) else ""
        return f"conv {cin}->{self.cout} k{kh}{s}{g} @{h}{res}{act}{pit}"


def _fallback_cases() -> List[Case]:
    """The distinct shapes of timm's DLA variants (collected once from timm 1.0 with forward hooks)."""
    def C(cin, cout, k, s, g, h, role):
        return Case("conv_bn_act", (cin,), (h, h), cout, (k, k), (s, s), ((k - 1) // 2,) * 2, g,
                    "tensor" if role == "res" else "none", role != "norelu", (cin,))

    def A(ch, cout, h, res):
        return Case("aggregate", tuple(ch), (h, h), cout, residual={"none": "none", "shortcut": "child0",
                                                                      "tensor": "tensor"}[res], pitches=tuple(ch))
    return [
        C(3, 16, 7, 1, 1, 224, 'plain'), C(16, 16, 3, 1, 1, 224, 'plain'), C(16, 32, 3, 2, 1, 224, 'plain'),
        C(32, 64, 1, 1, 1, 56, 'norelu'), C(32, 64, 3, 2, 1, 112, 'plain'), C(64, 64, 3, 1, 1, 56, 'res'),
        C(64, 64, 3, 1, 1, 56, 'plain'), C(64, 128, 1, 1, 1, 28, 'norelu'), C(64, 128, 3, 2, 1, 56, 'plain'),
        C(128, 128, 3, 1, 1, 28, 'res'), C(128, 128, 3, 1, 1, 28, 'plain'), C(128, 256, 1, 1, 1, 14, 'norelu'),
        C(128, 256, 3, 2, 1, 28, 'plain'), C(256, 256, 3, 1, 1, 14, 'res'), C(256, 256, 3, 1, 1, 14, 'plain'),
        C(256, 512, 1, 1, 1, 7, 'norelu'), C(256, 512, 3, 2, 1, 14, 'plain'), C(512, 512, 3, 1, 1, 7, 'res'),
        C(512, 512, 3, 1, 1, 7, 'plain'), C(512, 1000, 1, 1, 1, 1, 'plain'), C(32, 32, 1, 1, 1, 112, 'plain'),
        C(32, 32, 3, 2, 1, 112, 'plain'), C(32, 64, 1, 1, 1, 56, 'res'), C(64, 32, 1, 1, 1, 56, 'plain'),
        C(32, 32, 3, 1, 1, 56, 'plain'), C(64, 64, 3, 2, 32, 112, 'plain'), C(64, 64, 1, 1, 1, 56, 'res'),
        C(64, 64, 3, 1, 32, 56, 'plain'), C(128, 128, 3, 2, 32, 28, 'plain'), C(128, 128, 3, 1, 32, 14, 'plain'),
        C(1024, 1024, 3, 2, 32, 14, 'plain'), C(1024, 1024, 3, 1, 32, 7, 'plain'),
        C(256, 256, 3, 2, 64, 112, 'plain'), C(2048, 2048, 3, 1, 64, 7, 'plain'), C(128, 128, 1, 1, 1, 56, 'plain'),
        C(128, 128, 3, 2, 1, 56, 'plain'), C(128, 256, 1, 1, 1, 28, 'res'), C(256, 128, 1, 1, 1, 28, 'plain'),
        C(512, 1024, 1, 1, 1, 7, 'res'), C(1024, 512, 1, 1, 1, 7, 'plain'), C(1024, 1000, 1, 1, 1, 1, 'plain'),
        C(32, 112, 1, 1, 1, 112, 'plain'), C(28, 28, 3, 2, 1, 112, 'plain'), C(28, 28, 3, 1, 1, 56, 'plain'),
        C(56, 56, 3, 2, 1, 56, 'plain'), C(224, 224, 3, 1, 1, 7, 'plain'), C(32, 32, 3, 2, 8, 112, 'plain'),
        C(32, 32, 3, 1, 8, 56, 'plain'), C(256, 256, 3, 1, 8, 7, 'plain'),
        A((64, 64), 64, 56, 'none'), A((128, 128, 64, 128), 128, 28, 'none'), A((512, 512, 256), 512, 7, 'none'),
        A((128, 128), 128, 56, 'shortcut'), A((512, 512, 256, 512, 512, 512, 512), 512, 14, 'shortcut'),
        A((1024, 1024, 512), 1024, 7, 'shortcut'), A((28, 28, 28, 28), 128, 56, 'tensor'),
        A((224, 224, 224, 224), 1024, 7, 'tensor'), A((32, 32, 32, 32), 128, 56, 'tensor'),
        A((256, 256, 256, 256), 1024, 7, 'tensor'),
    ]


def load_cases(models: Sequence[str]) -> Tuple[List[Case], str]:
    try:
        import shapes  # benchmarks/shapes.py: the fused model's own layers
        entries = shapes.distinct_shapes(tuple(models), batch=8)
        cases = [Case(e.shape.op, tuple(e.shape.cin), tuple(e.shape.hw), int(e.shape.cout), tuple(e.shape.kernel),
                      tuple(e.shape.stride), tuple(e.shape.padding), int(e.shape.groups), e.shape.residual,
                      bool(e.shape.relu), tuple(e.shape.pitches), int(e.count)) for e in entries]
        return cases, f"benchmarks/shapes.py over {', '.join(models)}"
    except Exception as e:  # the model code is someone else's moving target: never let it stop this script
        print(f"[warn] benchmarks/shapes.py unavailable ({type(e).__name__}: {e}); using the built-in shape list",
              file=sys.stderr)
        return _fallback_cases(), "built-in list (timm 1.0 DLA variants)"


# ----------------------------------------------------------------------------------------------- inputs
def _nhwc(n, c, h, w, pitch, dtype, device, gen):
    """(n, c, h, w) channels_last; a channel slice of a (n, pitch, h, w) tensor when pitch > c (the last c
    channels, so the slice starts at a non-zero channel offset like Res2Net's torch.split views)."""
    full = torch.randn(n, pitch, h, w, generator=gen, device=device, dtype=torch.float32)
    full = full.to(dtype=dtype).contiguous(memory_format=torch.channels_last)
    return full[:, pitch - c:] if pitch > c else full


def make_inputs(case: Case, n: int, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: batch-256 inputs are ~1 GB
    h, w = case.hw
    ho, wo = case.out_hw
    pitches = case.pitches or case.cin
    xs = [_nhwc(n, c, h, w, p, dtype, device, g) for c, p in zip(case.cin, pitches)]
    cin_g = sum(case.cin) // case.groups
    fan_in = cin_g * case.kernel[0] * case.kernel[1]
    wshape = (case.cout, sum(case.cin)) if case.op == "aggregate" else (case.cout, cin_g, *case.kernel)
    wt = (torch.randn(*wshape, generator=g, device=device) / math.sqrt(fan_in)).to(dtype=dtype)
    if wt.dim() == 4:
        wt = wt.contiguous(memory_format=torch.channels_last)
    b = 0.1 * torch.randn(case.cout, generator=g, device=device)
    res = None
    if case.residual == "tensor":
        res = _nhwc(n, case.cout, ho, wo, case.cout, dtype, device, g)
    elif case.residual == "child0":
        res = xs[0]
    return xs, wt, b, res


def run_ours(case, xs, wt, b, res):
    if case.op == "aggregate":
        r = True if case.residual == "child0" else (res if res is not None else False)
        return ops.aggregate(xs, wt, b, residual=r, relu=case.relu, backend="cuda")
    return ops.conv_bn_act(xs[0], wt, b, stride=case.stride, padding=case.padding, groups=case.groups,
                           residual=res, relu=case.relu, backend="cuda")


def run_ref(case, xs, wt, b, res, dtype=None):
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)
    xs = [cast(x) for x in xs]
    if case.op == "aggregate":
        return aggregate_ref(xs, cast(wt), cast(b), cast(res), case.relu)
    return conv_bn_act_ref(xs[0], cast(wt), cast(b), case.stride, case.padding, case.groups, cast(res), case.relu)


def poison(numel, dtype, device):
    """Leave NaN garbage in the caching allocator where the next output of this size will be placed."""
    junk = torch.full((numel,), float("nan"), dtype=dtype, device=device)
    del junk


def max_err(y, ref):
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def last_kernel():
    try:
        import dla_fast._C as C
        return C.last_kernel()
    except Exception:
        return "?"


# ----------------------------------------------------------------------------------------------- (a)
def check_case(case: Case, n: int, dtype, device="cuda") -> Dict:
    rec = {"label": case.label(), "dtype": str(dtype).replace("torch.", ""), "batch": n}
    try:
        xs, wt, b, res = make_inputs(case, n, dtype, device)
        ref64 = run_ref(case, xs, wt, b, res, torch.float64)
        eager = run_ref(case, xs, wt, b, res)
        poison(ref64.numel(), dtype, device)
        y = run_ours(case, xs, wt, b, res)
        torch.cuda.synchronize()
        rec["kernel"] = last_kernel()
        ok_layout = y.shape == ref64.shape and y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
        e_ours, e_eager = max_err(y, ref64), max_err(eager, ref64)
        tol = max(2 * e_eager, 0.0) + FLOOR[dtype]
        rec.update(err=e_ours, eager_err=e_eager, tol=tol, ok=bool(ok_layout and e_ours <= tol))
        if not ok_layout:
            rec["error"] = f"bad output: shape {tuple(y.shape)} dtype {y.dtype} strides {y.stride()}"
        if not rec["ok"] and os.environ.get("DLA_FAST_CUDA_KERNEL", "auto") == "auto":
            # Re-run on the other kernel families to localise the bug (tiling vs gather vs epilogue).
            alt = {}
            for k in ("simt", "direct") if case.op == "conv_bn_act" else ("simt",):
                os.environ["DLA_FAST_CUDA_KERNEL"] = k
                try:
                    poison(ref64.numel(), dtype, device)
                    alt[k] = max_err(run_ours(case, xs, wt, b, res), ref64)
                except Exception as e:
                    alt[k] = f"{type(e).__name__}: {e}"
                finally:
                    os.environ.pop("DLA_FAST_CUDA_KERNEL", None)
            rec["alt_kernels"] = alt
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=3))
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    return rec


def correctness(cases: List[Case], n: int, dtypes) -> List[Dict]:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out = []
    for dt in dtypes:
        t0 = time.time()
        recs = [check_case(c, n, dt) for c in cases]
        bad = [r for r in recs if not r["ok"]]
        worst = max((r.get("err", 0) / max(r.get("tol", 1), 1e-30) for r in recs if "err" in r), default=0)
        print(f"(a) {str(dt):15s} {len(recs) - len(bad)}/{len(recs)} shapes pass, worst err/tol {worst:.3f} "
              f"({time.time() - t0:.1f}s)", flush=True)
        for r in bad:
            print(f"    FAIL {r['label']:48s} {r.get('kernel', '')}: err {r.get('err')} (eager {r.get('eager_err')}, "
                  f"tol {r.get('tol')}) {r.get('error', '')} {r.get('alt_kernels', '')}", flush=True)
        out += recs
    return out


# ----------------------------------------------------------------------------------------------- (b)
def cuda_time_ms(fn, budget_ms=60.0, max_reps=40) -> float:
    """Median of per-call CUDA-event timings after a warm-up; reps adapted to the budget."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e), 1e-3)
    reps = int(max(5, min(max_reps, budget_ms / est)))
    for _ in range(min(3, reps)):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def bench_case(case: Case, n: int, dtype) -> Dict:
    rec = {"label": case.label(), "dtype": str(dtype).replace("torch.", ""), "batch": n, "count": case.count,
           "flops": case.flops(n), "min_bytes": case.min_bytes(n, torch.finfo(dtype).bits // 8)}
    try:
        dev = "cuda"
        xs, wt, b, res = make_inputs(case, n, dtype, dev)
        # BN parameters for the eager baselines (values are irrelevant to timing)
        gamma, beta = torch.rand(case.cout, device=dev, dtype=dtype) + 0.5, torch.randn(case.cout, device=dev, dtype=dtype)
        mean, var = torch.randn(case.cout, device=dev, dtype=dtype), torch.rand(case.cout, device=dev, dtype=dtype) + 0.5
        if case.op == "aggregate":
            w4 = wt[:, :, None, None].contiguous(memory_format=torch.channels_last)

            def eager():
                y = F.conv2d(torch.cat(xs, 1), w4)
                y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-5)
                if res is not None:
                    y = y + res
                return torch.relu(y) if case.relu else y

            xcat = torch.cat(xs, 1)  # conv alone: the concat is not timed

            def cudnn():
                return F.conv2d(xcat, w4)
        else:
            x = xs[0]

            def eager():
                y = F.conv2d(x, wt, None, case.stride, case.padding, 1, case.groups)
                y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-5)
                if res is not None:
                    y = y + res
                return torch.relu(y) if case.relu else y

            def cudnn():
                return F.conv2d(x, wt, None, case.stride, case.padding, 1, case.groups)

        def ours():
            return run_ours(case, xs, wt, b, res)

        with torch.inference_mode():
            rec["ours_ms"] = cuda_time_ms(ours)
            rec["kernel"] = last_kernel()
            rec["cudnn_ms"] = cuda_time_ms(cudnn)
            rec["eager_ms"] = cuda_time_ms(eager)
        t = rec["ours_ms"] * 1e-3
        rec["tflops"] = rec["flops"] / t / 1e12
        rec["gbps"] = rec["min_bytes"] / t / 1e9
        rec["roofline_ms"] = 1e3 * max(rec["flops"] / PEAK_FLOPS, rec["min_bytes"] / PEAK_BW)
        rec["roofline_frac"] = rec["roofline_ms"] / rec["ours_ms"]
        rec["ok"] = True
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        torch.cuda.empty_cache()
    return rec


def timing(cases: List[Case], n: int, dtypes, budget_s: float) -> List[Dict]:
    torch.backends.cudnn.benchmark = True
    t0 = time.time()
    out = []
    for dt in dtypes:
        for i, c in enumerate(cases):
            if time.time() - t0 > budget_s:
                print(f"(b) time budget {budget_s:.0f}s spent: {dt} timed {i}/{len(cases)} shapes", flush=True)
                break
            out.append(bench_case(c, n, dt))
    return out


def print_table(timings: List[Dict]):
    if not timings:
        return
    print("\n(b) batch %d. ms = median CUDA-event time; x = eager/ours; roof = roofline time / ours "
          "(740 TFLOP/s, 3.0 TB/s)" % timings[0]["batch"])
    hdr = f"{'shape':50s} {'dt':4s} {'n':>2s} {'ours':>7s} {'cudnn':>7s} {'eager':>7s} {'x':>5s} {'TF/s':>6s} " \
          f"{'GB/s':>6s} {'roof':>5s}  kernel"
    print(hdr)
    print("-" * len(hdr))
    tot = {}
    for r in timings:
        dt = {"float16": "f16", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"])
        if not r.get("ok"):
            print(f"{r['label'][:50]:50s} {dt:4s} ERROR {r.get('error', '')[:80]}")
            continue
        print(f"{r['label'][:50]:50s} {dt:4s} {r['count']:2d} {r['ours_ms']:7.3f} {r['cudnn_ms']:7.3f} "
              f"{r['eager_ms']:7.3f} {r['eager_ms'] / r['ours_ms']:5.2f} {r['tflops']:6.1f} {r['gbps']:6.0f} "
              f"{r['roofline_frac']:5.2f}  {r.get('kernel', '')}")
        t = tot.setdefault(dt, [0.0, 0.0, 0.0, 0.0])
        t[0] += r["count"] * r["ours_ms"]
        t[1] += r["count"] * r["cudnn_ms"]
        t[2] += r["count"] * r["eager_ms"]
        t[3] += r["count"] * r["roofline_ms"]
    for dt, (o, c, e, rf) in tot.items():
        print(f"TOTAL {dt} (each shape x its layer count over the models): ours {o:.2f} ms, cuDNN conv alone "
              f"{c:.2f} ms, eager {e:.2f} ms, eager/ours {e / o:.2f}x, roofline {rf:.2f} ms ({rf / o:.0%})")


# ----------------------------------------------------------------------------------------------- sanitize
SANITIZE_CASES = [
    Case("conv_bn_act", (16,), (9, 11), 32, (3, 3), (1, 1), (1, 1), 1, "tensor", True),     # tc vw8 bn32 / narrow wgmma bn32
    Case("conv_bn_act", (3,), (13, 15), 16, (7, 7), (2, 2), (3, 3), 1, "none", True),       # tc vw1 bn16 (stem)
    Case("conv_bn_act", (20,), (7, 9), 24, (3, 3), (2, 2), (1, 1), 1, "tensor", False),     # tc vw4
    Case("conv_bn_act", (64,), (6, 5), 200, (1, 1), (1, 1), (0, 0), 1, "tensor", True),     # tc bn64/128 tails
    Case("conv_bn_act", (32,), (7, 7), 32, (3, 3), (1, 1), (1, 1), 8, "tensor", True),      # block-diagonal, 4 ch/group
    Case("conv_bn_act", (64,), (6, 6), 64, (3, 3), (2, 2), (1, 1), 4, "none", True),        # tc / narrow wgmma bn16 grouped, 16/grp
    Case("conv_bn_act", (28,), (8, 8), 28, (3, 3), (1, 1), (1, 1), 1, "none", True, (112,)),  # slice, vw4
    Case("conv_bn_act", (128,), (6, 5), 136, (3, 3), (1, 1), (1, 1), 1, "tensor", True),    # wgmma, 18 k tiles; 192x256
    Case("conv_bn_act", (64,), (7, 6), 64, (3, 3), (2, 2), (1, 1), 8, "tensor", True),      # block-diagonal, 8 ch/group
    Case("aggregate", (32, 16), (5, 7), 32, residual="child0"),
    Case("aggregate", (28, 28, 28, 28), (6, 6), 128, residual="tensor", pitches=(28, 28, 28, 112)),
    Case("aggregate", (13, 7, 20), (3, 5), 24, residual="tensor", relu=False),               # vw1
    Case("aggregate", (160, 64, 32, 64, 64, 64, 64, 64), (3, 3), 160, residual="child0"),    # 8 children
]


def sanitize() -> int:
    """Few small shapes, all kernel families, CPU float64 reference (so that only our kernels run on the GPU
    besides copies)."""
    fails = 0
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for case in SANITIZE_CASES:
            forces = ("auto", "wgmma", "tc", "simt") + (("direct",) if case.op == "conv_bn_act" else ())
            if case.op == "conv_bn_act" and case.cout > 64 and case.groups == 1:
                forces += ("wgmma256",)  # the 192x256 tile (DLA_FAST_CUDA_WIDE_BN=256)
            for force in forces:
                os.environ["DLA_FAST_CUDA_KERNEL"] = force.replace("256", "")
                if force.endswith("256"):
                    os.environ["DLA_FAST_CUDA_WIDE_BN"] = "256"
                try:
                    xs, wt, b, res = make_inputs(case, 2, dt, "cuda")
                    y = run_ours(case, xs, wt, b, res)
                    torch.cuda.synchronize()
                    kern = last_kernel()
                    cpu = lambda t: None if t is None else t.cpu().double()
                    ref = run_ref(case, [cpu(x) for x in xs], cpu(wt), cpu(b), cpu(res))
                    err = max_err(y.cpu(), ref)
                    ok = err <= {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dt]
                except Exception as e:
                    ok, err, kern = False, f"{type(e).__name__}: {e}", "?"
                finally:
                    os.environ.pop("DLA_FAST_CUDA_KERNEL", None)
                    os.environ.pop("DLA_FAST_CUDA_WIDE_BN", None)
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {str(dt):15s} {force:6s} {case.label():44s} {kern:22s} err {err}",
                      flush=True)
    print(f"sanitize driver: {fails} failures")
    return 1 if fails else 0


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sanitize", action="store_true", help="tiny shapes of both ops on every kernel family")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--check-batch", type=int, default=8)
    p.add_argument("--bench-batch", type=int, default=256)
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds for (b) (stops timing new shapes)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    import dla_fast.backends.cuda as cu
    if cu.unavailable_reason(torch.empty(1, device="cuda")) is not None:
        print("CUDA backend unavailable:", cu.unavailable_reason(torch.empty(1, device="cuda")))
        return 3
    if a.sanitize:
        return sanitize()
    t0 = time.time()
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}", flush=True)
    cases, src = load_cases(a.models)
    print(f"{len(cases)} distinct shapes from {src} ({time.time() - t0:.1f}s)", flush=True)
    with torch.inference_mode():
        corr = correctness(cases, a.check_batch, (torch.float16, torch.bfloat16, torch.float32))
    tim = [] if a.no_timing else timing(cases, a.bench_batch, (torch.float16, torch.bfloat16), a.time_budget)
    print_table(tim)
    nfail = sum(not r["ok"] for r in corr)
    nbad_t = sum(not r.get("ok") for r in tim)
    print(f"\nSUMMARY: correctness {len(corr) - nfail}/{len(corr)} pass; timing {len(tim) - nbad_t}/{len(tim)} ran; "
          f"total {time.time() - t0:.0f}s on {dev}")
    outdir = os.environ.get("OUT")
    if outdir:
        os.makedirs(outdir, exist_ok=True)
        with open(os.path.join(outdir, "cuda_ops.json"), "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "shape_source": src, "correctness": corr,
                       "timing": tim}, f, indent=1, default=str)
        print(f"wrote {os.path.join(outdir, 'cuda_ops.json')}")
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
