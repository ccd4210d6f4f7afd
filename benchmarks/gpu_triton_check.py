#!/usr/bin/env python
"""GPU check of the Triton backend: correctness at the DLA shapes and timing against cuDNN and eager.

    python benchmarks/gpu_triton_check.py            # ~3-4 min on an H100; JSON to $OUT/triton_ops.json
    python benchmarks/gpu_triton_check.py --no-sweep --workers 0

Sections, in this order (each item is guarded: a failure is reported and the script goes on; a time budget,
GPU_CHECK_BUDGET_S (default 225 s), drops whatever is left once spent):

0. warm-up: the kernels of every later job are compiled by --workers parallel processes (each runs its
   share of the jobs once), which fills Triton's on-disk cache; the main process then only loads them.
1. timing at batch 256, fp16 and bf16, with triton.testing.do_bench (median, L2 flushed):
   ours (one fused kernel) vs cuDNN conv alone (F.conv2d, channels_last, cudnn.benchmark on) vs eager
   conv + BatchNorm(eval) + ReLU; for roots ours vs eager cat + conv1x1 + BN (+ residual) + ReLU.
   Reported: ms, TFLOP/s (useful FLOPs), GB/s (minimum bytes: inputs + weights + output [+ residual]),
   and the roofline time max(FLOPs / 740 TFLOP/s, bytes / 3.0 TB/s) of the fused op.
2. correctness at batch 8 of every DLA shape in fp16/bf16/fp32 (+TF32 for some): relative error vs a
   float64 reference, next to eager PyTorch's error in the same dtype. Outputs start as NaN.
3. a small tile sweep at batch 256 fp16 on key shapes (heuristic vs alternatives), to tune the heuristic.
4. smoke tests: CUDA-graph capture and torch.compile(fullgraph=True).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PEAK_TFLOPS = 740.0  # H100 SXM dense bf16/fp16
PEAK_GBS = 3000.0    # device-to-device copy measured on these machines
DEVICE = "cuda"
DRY = False  # --dry-run: the script's logic on CPU under TRITON_INTERPRET=1, tiny shapes, few jobs
T0 = time.time()
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "225"))


def left() -> float:
    return BUDGET - (time.time() - T0)


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ jobs

def _dt(name):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


TIMING_CONVS = ["stem 7x7 (all)", "level0 3x3 (all)", "level1 3x3 s2 (all)", "dla34 l2 3x3 s2", "dla34 l2 3x3",
                "dla34 l2 proj 1x1", "dla34 l3 3x3 s2", "dla34 l3 3x3", "dla34 l4 3x3", "dla34 l5 3x3",
                "dla60 l2 conv1b 1x1", "dla60 l2 conv3 1x1", "dla60 l5 conv3 1x1",
                "dla60x l2 g32 3x3 s2 (4/grp)", "dla60x l2 g32 3x3 (4/grp)", "dla60x l3 g32 3x3 (8/grp)",
                "dla60x l4 g32 3x3 (16/grp)", "dla60x l5 g32 3x3 (32/grp)", "res2next g8 3x3 (4/grp)",
                "res2net 3x3 (28 ch)"]
TIMING_AGGS = ["dla34 root l2", "dla34 root l3", "dla34 root l4", "dla34 root l5", "dla60 root l2",
               "dla60 root l4", "dla169 root l4 (7 children)", "res2net conv3 l2 (4 splits)"]
TF32_CHECKS = {"level0 3x3 (all)", "dla34 l3 3x3", "dla60x l2 g32 3x3 (4/grp)", "dla34 root l3"}

SWEEP = {
    # shape name -> list of configs (conv_launch/aggregate_launch ``config``)
    "level0 3x3 (all)": [dict(kind="dense", MODE=0, GB=1, BLOCK_M=bm, BLOCK_N=16, BLOCK_K=16, num_warps=w,
                              num_stages=s) for bm, w, s in ((64, 4, 4), (128, 4, 3), (256, 8, 4))],
    "dla34 l2 3x3": [dict(kind="dense", MODE=0, GB=1, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk, num_warps=w,
                          num_stages=s) for bm, bk, w, s in ((128, 32, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3),
                                                             (128, 64, 8, 4))],
    "dla34 l3 3x3": [dict(kind="dense", MODE=0, GB=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in ((128, 64, 64, 4, 3), (128, 128, 32, 8, 4),
                                                                 (64, 128, 64, 4, 3), (128, 128, 64, 4, 3))],
    "dla34 l5 3x3": [dict(kind="dense", MODE=0, GB=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                                                 (128, 64, 64, 4, 4))],
    "stem 7x7 (all)": [dict(kind="flat", MODE=1, GB=1, BLOCK_M=bm, BLOCK_N=16, BLOCK_K=bk, num_warps=w,
                            num_stages=s) for bm, bk, w, s in ((64, 32, 4, 2), (128, 64, 4, 2), (256, 32, 8, 2),
                                                               (128, 32, 4, 1))],
    "dla60x l2 g32 3x3 (4/grp)": (
        [dict(kind="blockdiag", MODE=2, GB=gb, BLOCK_M=bm, BLOCK_N=4 * gb, BLOCK_K=4 * gb, num_warps=w,
              num_stages=s) for gb, bm, w, s in ((4, 128, 4, 3), (16, 128, 4, 3), (8, 64, 4, 4), (8, 256, 8, 3))]
        + [dict(kind="direct", BLOCK_M=bm, GB=gb, COG=4, num_warps=w, num_stages=1)
           for bm, gb, w in ((64, 16, 4), (32, 32, 4), (128, 8, 4))]
        + [dict(kind="dense", MODE=0, GB=1, BLOCK_M=128, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=4)]),
    "dla60x l4 g32 3x3 (16/grp)": [
        dict(kind="blockdiag", MODE=2, GB=gb, BLOCK_M=128, BLOCK_N=16 * gb, BLOCK_K=16 * gb, num_warps=4,
             num_stages=3) for gb in (2, 4)] + [
        dict(kind="dense", MODE=0, GB=1, BLOCK_M=bm, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=s)
        for bm, s in ((64, 4), (256, 4))],
    "dla34 root l3": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                      for bm, bn, bk, w, s in ((128, 64, 64, 4, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3),
                                               (256, 128, 64, 8, 3))],
    "dla60 root l2": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                      for bm, bn, bk, w, s in ((128, 64, 64, 4, 3), (128, 128, 32, 8, 4), (256, 128, 64, 8, 3))],
}


def build_jobs(args):
    from dla_fast.backends.triton._shapes import AGG_SHAPES, CONV_SHAPES
    convs = {s["name"]: s for s in CONV_SHAPES}
    aggs = {s["name"]: s for s in AGG_SHAPES}
    jobs = []
    if not args.no_timing:
        for dt in ("fp16", "bf16"):
            for n in TIMING_CONVS:
                jobs.append(dict(section="timing", op="conv", shape=convs[n], dtype=dt, batch=args.batch))
            for n in TIMING_AGGS:
                jobs.append(dict(section="timing", op="agg", shape=aggs[n], dtype=dt, batch=args.batch))
    if not args.no_correctness:
        for dt in ("fp16", "bf16", "fp32"):
            for s in CONV_SHAPES:
                jobs.append(dict(section="correct", op="conv", shape=s, dtype=dt, batch=8, tf32=False))
            for s in AGG_SHAPES:
                jobs.append(dict(section="correct", op="agg", shape=s, dtype=dt, batch=8, tf32=False))
        for n in TF32_CHECKS:
            op = "agg" if n in aggs else "conv"
            jobs.append(dict(section="correct", op=op, shape=(aggs if op == "agg" else convs)[n], dtype="fp32",
                             batch=8, tf32=True))
    if not args.no_sweep:
        for n, cfgs in SWEEP.items():
            op = "agg" if n in aggs else "conv"
            for cfg in [None] + cfgs:
                jobs.append(dict(section="sweep", op=op, shape=(aggs if op == "agg" else convs)[n], dtype="fp16",
                                 batch=args.batch, config=cfg))
    if DRY:
        keep, seen = [], {}
        for j in jobs:
            if j["dtype"] == "bf16":
                continue  # the interpreter has no bf16
            k = (j["section"], j["op"])
            if seen.get(k, 0) < 2:
                seen[k] = seen.get(k, 0) + 1
                j = dict(j, batch=1, shape=dict(j["shape"], h=min(j["shape"]["h"], 6)))
                keep.append(j)
        jobs = keep
    return jobs


# ---------------------------------------------------------------------------------------------- inputs

def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_conv(s, batch, dtype, residual=False, device=None):
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(1234)  # on the device: batch-256 inputs are large
    cin, cout, h, k, st, p, grp = s["cin"], s["cout"], s["h"], s["k"], s["stride"], s["pad"], s["groups"]
    ho = (h + 2 * p - k) // st + 1
    fan = cin // grp * k * k

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype=dt)

    x = rnd(batch, cin, h, h).contiguous(memory_format=torch.channels_last)
    w = rnd(cout, cin // grp, k, k, scale=fan ** -0.5).contiguous(memory_format=torch.channels_last)
    b = rnd(cout, scale=0.1, dt=torch.float32)
    r = rnd(batch, cout, ho, ho).contiguous(memory_format=torch.channels_last) if residual else None
    return x, w, b, r, ho


def make_agg(s, batch, dtype, device=None):
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(4321)
    h, cout, chans = s["h"], s["cout"], s["children"]

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype=dt)

    kids = [rnd(batch, c, h, h).contiguous(memory_format=torch.channels_last) for c in chans]
    w = rnd(cout, sum(chans), scale=sum(chans) ** -0.5)
    b = rnd(cout, scale=0.1, dt=torch.float32)
    if s["shortcut"] == "res":
        res = rnd(batch, cout, h, h).contiguous(memory_format=torch.channels_last)
    else:
        res = kids[0] if s["shortcut"] else None
    return kids, w, b, res


def conv_cost(s, batch, ho, esize, residual):
    cin, cout, k, grp = s["cin"], s["cout"], s["k"], s["groups"]
    flops = 2.0 * batch * ho * ho * cout * (cin // grp) * k * k
    nbytes = esize * (batch * cin * s["h"] ** 2 + cout * (cin // grp) * k * k + batch * cout * ho * ho
                      * (2 if residual else 1))
    return flops, nbytes


def agg_cost(s, batch, esize):
    h, cout, ktot = s["h"], s["cout"], sum(s["children"])
    flops = 2.0 * batch * h * h * cout * ktot
    res = 1 if s["shortcut"] == "res" else 0  # a shortcut child is read once anyway
    nbytes = esize * (batch * h * h * (ktot + cout * (1 + res)) + cout * ktot)
    return flops, nbytes


# -------------------------------------------------------------------------------------------- runners

def _ours_conv(x, w, b, s, r, tf32, config=None):
    from dla_fast.backends.triton import _launch
    if config is None:
        return lambda: torch.ops.dla_fast_triton.conv_bn_act(x, w, b, [s["stride"]] * 2, [s["pad"]] * 2,
                                                             s["groups"], r, True, tf32)
    return lambda: _launch.conv_launch(x, w, b, [s["stride"]] * 2, [s["pad"]] * 2, s["groups"], r, True, tf32,
                                       config=config)


def _ours_agg(kids, w, b, res, tf32, config=None):
    from dla_fast.backends.triton import _launch
    if config is None:
        return lambda: torch.ops.dla_fast_triton.aggregate(kids, w, b, res, True, tf32)
    return lambda: _launch.aggregate_launch(kids, w, b, res, True, tf32, config=config)


def _plan_of(job, x_or_kids, w):
    from dla_fast.backends.triton import _launch
    s = job["shape"]
    if job.get("config"):
        return dict(job["config"])
    if job["op"] == "conv":
        x = x_or_kids
        ho = (s["h"] + 2 * s["pad"] - s["k"]) // s["stride"] + 1
        return _launch.conv_plan(x.shape[0] * ho * ho, s["cin"] // s["groups"], s["cout"] // s["groups"],
                                 s["groups"], s["k"], s["k"], x.dtype, job.get("tf32", False), False)
    kids = x_or_kids
    return _launch.aggregate_plan(kids[0].shape[0] * s["h"] ** 2, list(s["children"]), s["cout"], kids[0].dtype,
                                  False, job.get("tf32", False))


def run_once(job):
    """Compile and run the job's kernel once (warm-up workers)."""
    dtype = _dt(job["dtype"])
    tf32 = job.get("tf32", False)
    if job["op"] == "conv":
        x, w, b, r, _ = make_conv(job["shape"], job["batch"], dtype, residual=job["section"] == "correct")
        _ours_conv(x, w, b, job["shape"], r, tf32, job.get("config"))()
    else:
        kids, w, b, res = make_agg(job["shape"], job["batch"], dtype)
        _ours_agg(kids, w, b, res, tf32, job.get("config"))()
    _sync()


def bench(fn):
    fn()
    _sync()
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def _rates(ms, flops, nbytes):
    return dict(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1), gbs=round(nbytes / ms / 1e6, 1))


def timing_job(job):
    s, dtype = job["shape"], _dt(job["dtype"])
    esize = torch.tensor([], dtype=dtype).element_size()
    out = dict(name=s["name"], op=job["op"], dtype=job["dtype"], batch=job["batch"])
    if job["op"] == "conv":
        x, w, b, _, ho = make_conv(s, job["batch"], dtype)
        flops, nbytes = conv_cost(s, job["batch"], ho, esize, False)
        cout = s["cout"]
        gamma, beta = torch.rand(cout, device=DEVICE) + 0.5, torch.randn(cout, device=DEVICE)
        rm, rv = torch.randn(cout, device=DEVICE), torch.rand(cout, device=DEVICE) + 0.5
        gamma, beta, rm, rv = (t.to(dtype) for t in (gamma, beta, rm, rv))
        st, p, grp = s["stride"], s["pad"], s["groups"]

        def cudnn():
            return F.conv2d(x, w, None, st, p, 1, grp)

        def eager():
            y = F.conv2d(x, w, None, st, p, 1, grp)
            y = F.batch_norm(y, rm, rv, gamma, beta, False, 0.0, 1e-5)
            return F.relu(y, inplace=True)

        ours = _ours_conv(x, w, b, s, None, False)
        out["plan"] = _plan_of(job, x, w)
        out["ours"] = _rates(bench(ours), flops, nbytes)
        out["cudnn_conv"] = _rates(bench(cudnn), flops, nbytes)
        out["eager_conv_bn_relu"] = _rates(bench(eager), flops, nbytes)
    else:
        kids, w, b, res = make_agg(s, job["batch"], dtype)
        flops, nbytes = agg_cost(s, job["batch"], esize)
        cout = s["cout"]
        w4 = w[:, :, None, None]
        gamma, beta = torch.rand(cout, device=DEVICE) + 0.5, torch.randn(cout, device=DEVICE)
        rm, rv = torch.randn(cout, device=DEVICE), torch.rand(cout, device=DEVICE) + 0.5
        gamma, beta, rm, rv = (t.to(dtype) for t in (gamma, beta, rm, rv))
        cat = torch.cat(kids, 1).contiguous(memory_format=torch.channels_last)

        def cudnn():  # the GEMM alone, on a concat made beforehand
            return F.conv2d(cat, w4)

        def eager():
            y = F.conv2d(torch.cat(kids, 1), w4)
            y = F.batch_norm(y, rm, rv, gamma, beta, False, 0.0, 1e-5)
            if res is not None:
                y += res
            return F.relu(y, inplace=True)

        ours = _ours_agg(kids, w, b, res, False)
        out["plan"] = _plan_of(job, kids, w)
        out["ours"] = _rates(bench(ours), flops, nbytes)
        out["cudnn_conv"] = _rates(bench(cudnn), flops, nbytes)
        out["eager_conv_bn_relu"] = _rates(bench(eager), flops, nbytes)
    roof = max(flops / (PEAK_TFLOPS * 1e12), nbytes / (PEAK_GBS * 1e9)) * 1e3
    out.update(gflop=round(flops / 1e9, 2), mbytes=round(nbytes / 1e6, 1), roofline_ms=round(roof, 4),
               bound="compute" if flops / (PEAK_TFLOPS * 1e12) > nbytes / (PEAK_GBS * 1e9) else "memory")
    return out


FLOOR = {"fp16": 1e-3, "bf16": 4e-3, "fp32": 1e-3}


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def correct_job(job):
    from dla_fast import ops
    from dla_fast.ops.reference import aggregate_ref, conv_bn_act_ref
    s, dtype, tf32 = job["shape"], _dt(job["dtype"]), job.get("tf32", False)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    d = lambda t: None if t is None else t.double()  # noqa: E731
    try:
        if job["op"] == "conv":
            x, w, b, r, _ = make_conv(s, job["batch"], dtype, residual=True)
            st, p, grp = (s["stride"],) * 2, (s["pad"],) * 2, s["groups"]
            out = ops.conv_bn_act(x, w, b, stride=st, padding=p, groups=grp, residual=r, relu=True,
                                  backend="triton")
            ref = conv_bn_act_ref(d(x), d(w), d(b), st, p, grp, d(r), True)
            eager = conv_bn_act_ref(x, w, b, st, p, grp, r, True)
        else:
            kids, w, b, res = make_agg(s, job["batch"], dtype)
            out = ops.aggregate(kids, w, b, residual=res if res is not None else False, relu=True,
                                backend="triton")
            ref = aggregate_ref([k.double() for k in kids], w.double(), b.double(), d(res), True)
            eager = aggregate_ref(kids, w, b, res, True)
        _sync()
    finally:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
    finite = bool(torch.isfinite(out).all())
    err, err_eager = _rel(out, ref), _rel(eager, ref)
    if dtype == torch.float32 and not tf32:
        tol = 1e-5
    else:
        tol = 2 * err_eager + FLOOR[job["dtype"]]
    ok = finite and err <= tol and out.is_contiguous(memory_format=torch.channels_last)
    return dict(name=s["name"], op=job["op"], dtype=job["dtype"] + ("-tf32" if tf32 else ""), err=err,
                err_eager=err_eager, tol=tol, finite=finite, ok=ok)


def sweep_job(job):
    s, dtype = job["shape"], _dt(job["dtype"])
    if job["op"] == "conv":
        x, w, b, _, _ = make_conv(s, job["batch"], dtype)
        fn = _ours_conv(x, w, b, s, None, False, job.get("config"))
        plan = _plan_of(job, x, w)
    else:
        kids, w, b, res = make_agg(s, job["batch"], dtype)
        fn = _ours_agg(kids, w, b, res, False, job.get("config"))
        plan = _plan_of(job, kids, w)
    return dict(name=s["name"], config=plan, heuristic=job.get("config") is None, ms=round(bench(fn), 4))


# ----------------------------------------------------------------------------------------------- main

def worker_main(args):
    os.environ["DLA_FAST_TRITON_POISON"] = "1"
    import dla_fast.backends.triton  # noqa: F401
    jobs = build_jobs(args)
    mine = jobs[args.worker::args.nworkers]
    done = set()
    for job in mine:
        key = (job["op"], job["shape"]["name"], job["dtype"], job["batch"], job.get("tf32", False),
               json.dumps(job.get("config"), sort_keys=True), job["section"] == "correct")
        if key in done:
            continue
        done.add(key)
        try:
            run_once(job)
        except Exception as e:  # the main process reports it
            print(f"[worker {args.worker}] {job['shape']['name']} {job['dtype']}: {type(e).__name__}: {e}",
                  flush=True)
    return 0


def warm(args):
    if args.workers <= 0:
        return
    t = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--nworkers", str(args.workers)]
    for flag in ("no_timing", "no_correctness", "no_sweep"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    cmd += ["--batch", str(args.batch)]
    procs = [subprocess.Popen(cmd + ["--worker", str(i)]) for i in range(args.workers)]
    deadline = time.time() + max(30.0, min(args.warm_timeout, left() - 60))
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            log(f"warm-up worker {p.pid} stopped at the deadline; the main process compiles what is left")
    log(f"warm-up: {args.workers} workers, {time.time() - t:.1f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--warm-timeout", type=float, default=120)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--worker", type=int, default=-1)
    ap.add_argument("--nworkers", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE, DRY
    if args.dry_run:
        DEVICE, DRY = "cpu", True
        args.workers = 0
    if args.worker >= 0:
        return worker_main(args)

    import triton
    dev_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    log(f"torch {torch.__version__}, triton {triton.__version__}, {dev_name}")
    torch.backends.cudnn.benchmark = True
    os.environ["DLA_FAST_TRITON_POISON"] = "1"
    import dla_fast.backends.triton  # noqa: F401
    jobs = build_jobs(args)
    warm(args)

    results = dict(env=dict(torch=torch.__version__, triton=triton.__version__,
                            device=dev_name), timing=[], correctness=[], sweep=[],
                   errors=[], skipped=0, smoke={})
    for job in jobs:
        if left() < 15:
            results["skipped"] += 1
            continue
        label = f"{job['section']} {job['op']} {job['shape']['name']} {job['dtype']} b{job['batch']}"
        try:
            if job["section"] == "timing":
                # Timing runs without the NaN pre-fill so it measures the kernel alone.
                os.environ["DLA_FAST_TRITON_POISON"] = "0"
                results["timing"].append(timing_job(job))
                os.environ["DLA_FAST_TRITON_POISON"] = "1"
            elif job["section"] == "correct":
                r = correct_job(job)
                results["correctness"].append(r)
                if not r["ok"]:
                    log(f"MISMATCH {label}: {r}")
            else:
                os.environ["DLA_FAST_TRITON_POISON"] = "0"
                results["sweep"].append(sweep_job(job))
                os.environ["DLA_FAST_TRITON_POISON"] = "1"
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e)[:500]}"
            log(f"ERROR {label}: {msg}")
            traceback.print_exc(limit=3)
            results["errors"].append(dict(job=label, error=msg))
        finally:
            torch.cuda.empty_cache()

    if left() > 10 and not DRY:
        results["smoke"] = smoke()
    report(results)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "triton_ops.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        log(f"wrote {os.path.join(out, 'triton_ops.json')}")
    return 0


def smoke():
    """CUDA-graph capture and torch.compile(fullgraph=True) of the two ops."""
    import dla_fast.backends.triton as tb
    res = {}
    x = torch.randn(2, 32, 14, 14, device=DEVICE, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 32, 3, 3, device=DEVICE) * 0.05).half().contiguous(memory_format=torch.channels_last)
    b = torch.randn(64, device=DEVICE)
    w2 = (torch.randn(64, 96, device=DEVICE) * 0.1).half()

    def f(x):
        y = tb.conv_bn_act(x, w, b, (1, 1), (1, 1), 1, None, True)
        return tb.aggregate([y, x], w2, b, y, True)

    try:
        expect = f(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = f(x)
        g.replay()
        torch.cuda.synchronize()
        res["cuda_graph"] = bool(torch.equal(out, expect))
    except Exception as e:
        res["cuda_graph"] = f"{type(e).__name__}: {str(e)[:300]}"
    if left() > 90:  # Inductor's first compile (worker pool start-up included) can take a minute
        try:
            got = torch.compile(f, fullgraph=True)(x)
            res["torch_compile"] = bool(torch.allclose(got.float(), expect.float(), rtol=1e-2, atol=1e-2))
        except Exception as e:
            res["torch_compile"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def report(results):
    log("")
    log("== correctness (batch 8, rel. Frobenius error vs float64; ok = within tolerance) ==")
    corr = results["correctness"]
    bad = [r for r in corr if not r["ok"]]
    log(f"{len(corr) - len(bad)}/{len(corr)} ok")
    for r in bad:
        log(f"  FAIL {r['op']} {r['name']} {r['dtype']}: err {r['err']:.2e} eager {r['err_eager']:.2e} "
            f"tol {r['tol']:.2e} finite={r['finite']}")
    worst = {}
    for r in corr:
        k = r["dtype"]
        if k not in worst or r["err"] / max(r["tol"], 1e-30) > worst[k]["err"] / max(worst[k]["tol"], 1e-30):
            worst[k] = r
    for k, r in worst.items():
        log(f"  worst {k}: {r['op']} {r['name']} err {r['err']:.2e} (eager {r['err_eager']:.2e}, tol {r['tol']:.2e})")

    if results["sweep"]:
        log("")
        log("== tile sweep (batch 256 fp16, ms; * = heuristic) ==")
        by = {}
        for r in results["sweep"]:
            by.setdefault(r["name"], []).append(r)
        for name, rs in by.items():
            best = min(rs, key=lambda r: r["ms"])
            heur = [r for r in rs if r["heuristic"]]
            log(f"  {name}: heuristic {heur[0]['ms'] if heur else '?'} ms, best {best['ms']} ms "
                f"{_cfg_str(best['config'])}")
            for r in sorted(rs, key=lambda r: r["ms"]):
                log(f"     {'*' if r['heuristic'] else ' '} {r['ms']:8.4f}  {_cfg_str(r['config'])}")

    if results["errors"]:
        log("")
        log(f"== errors ({len(results['errors'])}) ==")
        for e in results["errors"]:
            log(f"  {e['job']}: {e['error']}")
    if results["skipped"]:
        log(f"!! {results['skipped']} jobs skipped: time budget of {BUDGET:.0f} s spent")
    if results.get("smoke"):
        log(f"smoke: {results['smoke']}")

    log("")
    log("== timing (batch 256; ms = do_bench median; TF/s and GB/s of the fused op's useful FLOPs and minimum "
        "bytes; x = eager / ours; roof = roofline ms at 740 TF/s, 3.0 TB/s) ==")
    hdr = (f"{'shape':32s} {'dt':4s} {'kernel':10s} {'ours':>8s} {'cudnn':>8s} {'eager':>8s} {'x':>5s} "
           f"{'TF/s':>6s} {'GB/s':>6s} {'roof':>7s} {'%roof':>5s}")
    log(hdr)
    for r in results["timing"]:
        o, c, e = r["ours"], r["cudnn_conv"], r["eager_conv_bn_relu"]
        kind = r["plan"].get("kind", "agg") if isinstance(r["plan"], dict) else "?"
        log(f"{r['name'][:32]:32s} {r['dtype']:4s} {kind:10s} {o['ms']:8.4f} {c['ms']:8.4f} {e['ms']:8.4f} "
            f"{e['ms'] / o['ms']:5.2f} {o['tflops']:6.1f} {o['gbs']:6.0f} {r['roofline_ms']:7.4f} "
            f"{100 * r['roofline_ms'] / o['ms']:5.0f}")
    if results["timing"]:
        for dt in ("fp16", "bf16"):
            rs = [r for r in results["timing"] if r["dtype"] == dt]
            if rs:
                tot = {k: sum(r[k]["ms"] for r in rs) for k in ("ours", "cudnn_conv", "eager_conv_bn_relu")}
                log(f"sum {dt}: ours {tot['ours']:.3f} ms, cudnn conv alone {tot['cudnn_conv']:.3f} ms, "
                    f"eager {tot['eager_conv_bn_relu']:.3f} ms; geomean eager/ours "
                    f"{math.exp(sum(math.log(r['eager_conv_bn_relu']['ms'] / r['ours']['ms']) for r in rs) / len(rs)):.2f}")
    log(f"total {time.time() - T0:.1f} s")


def _cfg_str(c):
    keys = ("kind", "GB", "COG", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return " ".join(f"{k}={c[k]}" for k in keys if k in c)


if __name__ == "__main__":
    raise SystemExit(main())
