"""Per-op benchmarks of the fused kernels on the real layer shapes of DLA variants; the one op harness.

For every distinct shape (:mod:`dla_fast.shapes`) and dtype, this times:

* ``dla_fast`` per backend (``triton``, ``cuda`` when its extension can run, ``auto``; ``eager`` on CPU): the
  backend's kernel called the way :class:`dla_fast.fuse.FusedDLA` calls it (the backend chosen once, no
  per-call argument validation), so the numbers are the kernels' and match what the model runs;
* ``cudnn_conv``: ``F.conv2d`` alone with the folded weight and bias (channels_last; for an aggregate, on the
  already concatenated input): the GEMM part without the epilogue, a lower bound for unfused code;
* ``eager_seq``: what timm's eager model runs: conv2d (no bias) -> batch_norm (eval) -> (+= residual) ->
  relu_, and for an aggregate torch.cat first.

Inputs are random (never zeros, so no kernel can profit from sparsity), channels_last, with real random BN
statistics folded into the weight. GPU times are ``triton.testing.do_bench`` medians (L2 flushed before
each call); without Triton CUDA events with the same protocol; on CPU a ``time.perf_counter`` median. Up to
batch 16 (``--timer auto``) GPU times are CUDA-graph replays instead: there a kernel takes 3-30 us and its
Python launch longer, so per-call events would time the launch, which a graph (cuda_graph=True) never pays.
``--timer host`` times what a launch-bound caller pays instead: the wall clock of back-to-back calls.

    python benchmarks/opbench.py --models all --dtypes float16 bfloat16 --batch 256 \
        --json out.json --md out.md --csv out.csv                 # a full run
    python benchmarks/opbench.py --summary out.json --ref benchmarks/results/h100-ops-bs256.csv
    python benchmarks/opbench.py --from-json old.json --csv old.csv   # an earlier JSON run as op-run CSV
    python benchmarks/opbench.py --sanitize                        # correctness driver for compute-sanitizer
    python benchmarks/opbench.py --front --batch 256 --json f.json # the fused front vs its three layers
    python benchmarks/opbench.py --train --tiles --models dla102 --dtypes bfloat16 --json t.json # training tiles
    python benchmarks/opbench.py --device cpu --batch 2 --hw 64 --dtypes float32    # smoke test

``--csv`` writes the compact op-run format (comment lines with card, versions, date, commit, timer and
command, then one row per shape, dtype and implementation; :func:`read_csv` reads it back). ``--sanitize``
runs every op once per backend and kernel configuration on a few small real shapes and checks each output
against a float64 reference (exit code 1 on a mismatch): the program compute-sanitizer watches.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: the repository's dla_fast even when it is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dla_fast  # noqa: E402
from dla_fast import shapes as _shapes  # noqa: E402
from dla_fast.fuse import LAUNCH_BOUND_BATCH  # noqa: E402
from dla_fast import backends as _backends  # noqa: E402
from dla_fast.plan import PLANNER, aggregate_key, conv_key  # noqa: E402
from dla_fast.ops.reference import aggregate_ref, conv_bn_act_ref  # noqa: E402

OpShape = _shapes.OpShape
ShapeEntry = _shapes.ShapeEntry

# H100 SXM ceilings the achieved numbers are shown against (dense tensor-core math; a plain copy's bandwidth).
# fp32 convs run as TF32 on tensor cores when cuDNN/Triton allow it, hence its entry.
PEAK_TFLOPS = {"float16": 740.0, "bfloat16": 740.0, "float32": 370.0}
PEAK_GBPS = 3000.0

# A result this far from eager_seq (relative L2) is flagged: a fast wrong kernel must not look like a win.
# Loose enough for bf16 rounding of long reductions, far below the O(1) error of a broken kernel.
REL_ERR_FLAG = 5e-2

BACKEND_IMPLS = ("triton", "cuda", "auto", "eager")
BASELINES = ("cudnn_conv", "eager_seq")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "half": torch.float16, "float": torch.float32}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def default_impls(device: torch.device) -> Tuple[str, ...]:
    # On the GPU "eager" is the reference path, already covered by eager_seq/cudnn_conv; on the CPU it is the
    # only dla_fast path that runs (triton joins it under TRITON_INTERPRET=1, and skips itself otherwise).
    if device.type == "cuda":
        return ("triton", "cuda", "auto") + BASELINES
    return ("eager", "triton") + BASELINES


# ---------------------------------------------------------------------------------------------------- inputs

@dataclass
class Case:
    """Device tensors for one shape at one batch and dtype, shared by every implementation."""

    shape: OpShape
    batch: int
    dtype: torch.dtype
    device: torch.device
    inputs: List[torch.Tensor]            # children of an aggregate, or [x]
    residual: Optional[torch.Tensor]      # the tensor added (children[0] itself for a "child0" root)
    weight: torch.Tensor                  # BN-folded, in dtype, prepared like the fused model's
    bias: torch.Tensor                    # BN-folded, fp32
    raw_weight: torch.Tensor              # the unfolded conv weight (4-D, channels_last) for eager_seq
    bn: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # mean, var, gamma, beta in dtype
    eps: float
    cat: Optional[torch.Tensor] = None    # aggregate's concatenated input, for cudnn_conv
    extra: Dict = field(default_factory=dict)

    @property
    def x(self) -> torch.Tensor:
        return self.inputs[0]


def _nhwc_input(n: int, c: int, pitch: int, h: int, w: int, dtype, device, gen, offset: int = 0) -> torch.Tensor:
    # Drawn on the device, directly in NHWC order (a 256x16x224x224 input would take seconds on the host).
    # A Res2Net piece is a channel slice of a wider NHWC tensor; pitch and offset reproduce its strides and
    # its (possibly not 16-byte aligned) start.
    base = torch.randn(n, h, w, max(c, pitch), generator=gen, device=device, dtype=dtype).permute(0, 3, 1, 2)
    return base[:, offset:offset + c] if pitch > c else base


def _rand_bn(c: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    return bn


def build_case(shape: OpShape, batch: int, dtype: torch.dtype, device, seed: int = 0) -> Case:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)  # parameters: small, drawn on the host
    dgen = torch.Generator(device=device).manual_seed(seed)
    n, (h, w) = int(batch), shape.hw
    inputs = [_nhwc_input(n, c, p, h, w, dtype, device, dgen, o)
              for c, p, o in zip(shape.cin, shape.pitches, shape.offsets)]
    torch.manual_seed(seed)
    conv = nn.Conv2d(shape.cin_total, shape.cout, shape.kernel, stride=shape.stride, padding=shape.padding,
                     groups=shape.groups, bias=False)
    bn = _rand_bn(shape.cout, gen)
    w, b = dla_fast.fold_bn(conv, bn)
    if shape.op == "aggregate":
        w = w.reshape(shape.cout, shape.cin_total)
    weight = w.to(device=device, dtype=dtype)
    weight = weight.contiguous(memory_format=torch.channels_last) if weight.dim() == 4 else weight.contiguous()
    bias = b.to(device).float().contiguous()
    raw = conv.weight.detach().to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    bnp = tuple(t.detach().to(device=device, dtype=dtype) for t in
                (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    if shape.residual == "tensor":
        ho, wo = shape.out_hw
        residual = _nhwc_input(n, shape.cout, shape.cout, ho, wo, dtype, device, dgen)
    elif shape.residual == "child0":
        if shape.cin[0] != shape.cout:
            raise ValueError(f"{shape.label()}: a child0 residual needs children[0] to have {shape.cout} channels")
        residual = inputs[0]
    else:
        residual = None
    case = Case(shape, n, dtype, device, inputs, residual, weight, bias, raw, bnp, float(bn.eps))
    if shape.op == "aggregate":
        case.cat = torch.cat(inputs, 1).contiguous(memory_format=torch.channels_last)
    return case


# ---------------------------------------------------------------------------------------------- implementations

def _select(case: Case, backend: str):
    """(backend module, config) the fused model would run this layer with: the plan's under "auto" (keyed like
    FusedDLA, at this batch and input size), the backend's own rule otherwise."""
    s = case.shape
    if backend != "auto":
        return _backends.get(backend), ()
    if case.device.type != "cuda":
        return _backends.get("eager"), ()
    if s.op == "aggregate":
        kind = {"none": 0, "child0": 1, "tensor": 2}[s.residual]
        key = aggregate_key(s.cin, s.cout, kind, case.dtype, case.batch, s.hw)
    else:
        key = conv_key(case.raw_weight.shape, s.stride, s.padding, s.groups, s.residual != "none", case.dtype,
                       case.batch, s.hw)
    plan = PLANNER.plan(key, case.device)  # kernel time: opbench times small batches by graph replay
    return _backends.get(plan.backend), plan.config


def skip_reason(impl: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``impl`` cannot run on this device/dtype (None: it can)."""
    if impl in BASELINES:
        return None
    if impl not in BACKEND_IMPLS:
        return f"unknown implementation {impl!r}"
    if impl in ("auto", "eager"):
        return None
    return _backends.reason_unavailable(impl, torch.empty(0, device=device, dtype=dtype))


def impl_fn(case: Case, impl: str) -> Tuple[Callable[[], torch.Tensor], str]:
    """A no-argument callable running ``impl`` on ``case``, and the backend it resolved to."""
    s, ins, res, relu = case.shape, case.inputs, case.residual, case.shape.relu
    w, b = case.weight, case.bias
    if impl == "cudnn_conv":
        if s.op == "aggregate":
            w4 = w.reshape(s.cout, s.cin_total, 1, 1).contiguous(memory_format=torch.channels_last)
            b16, xcat = b.to(case.dtype), case.cat
            return (lambda: F.conv2d(xcat, w4, b16)), "aten"
        b16, x = b.to(case.dtype), case.x
        return (lambda: F.conv2d(x, w, b16, s.stride, s.padding, 1, s.groups)), "aten"
    if impl == "eager_seq":
        raw, (mean, var, gamma, beta), eps = case.raw_weight, case.bn, case.eps

        def seq():
            x = torch.cat(ins, 1) if s.op == "aggregate" else ins[0]
            y = F.conv2d(x, raw, None, s.stride, s.padding, 1, s.groups)
            y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, eps)
            if res is not None:
                y += res
            return torch.relu_(y) if relu else y
        return seq, "aten"
    mod, cfg = _select(case, impl)
    if s.op == "aggregate":
        return (lambda: mod.aggregate(ins, w, b, res, relu, cfg)), mod.NAME
    return (lambda: mod.conv_bn_act(ins[0], w, b, s.stride, s.padding, s.groups, res, relu, cfg)), mod.NAME


# ---------------------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_cuda_events(fn, warmup: float, rep: float) -> float:
    """do_bench's protocol without Triton: L2 flushed before each call, per-call events, median in ms."""
    fn()
    torch.cuda.synchronize()
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-4)
    n_warm, n_rep = max(1, int(warmup / est)), max(1, int(rep / est))
    for _ in range(n_warm):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_rep)]
    for s, e in ev:
        cache.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


def _bench_cpu(fn, warmup: float, rep: float, min_reps: int = 3) -> float:
    t0 = time.perf_counter()
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(0, int(warmup / est) - 1)):
        fn()
    times = []
    for _ in range(max(min_reps, int(rep / est))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bench_cudagraph(fn, warmup: float, rep: float, inner: int = 20) -> float:
    """GPU time per call with the launch cost taken out: ``inner`` back-to-back calls captured in one CUDA
    graph, replayed; median over replays / ``inner``. No L2 flush: at batch 1 a layer's weights stay in L2
    between graph replays of the whole model too. For small batches, where the Python launch of a 5 us kernel
    takes longer than the kernel and do_bench would time the launch."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup / est))):
        graph.replay()
    samples = []
    for _ in range(max(5, int(rep / est))):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    del graph
    return statistics.median(samples)


def _bench_host(fn, device: torch.device, warmup: float, rep: float, calls: int = 50) -> float:
    """Wall-clock ms per call of ``calls`` back-to-back calls, synchronised once at the end: what a caller
    without CUDA graphs pays, the larger of the host's launch cost and the kernel's GPU time (the launch-bound
    regime of batch 1 and of the small late layers; see LAUNCH_BOUND_BATCH). Median over samples."""
    def sample() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) * 1e3 / calls

    est = max(sample(), 1e-4)
    for _ in range(int(warmup / (est * calls))):
        sample()
    return statistics.median(sample() for _ in range(max(3, int(rep / (est * calls)))))


TIMERS = ("auto", "do_bench", "cudagraph", "host", "none")
# timer "auto": CUDA-graph timing up to this batch size, do_bench above -- the batches where a launch costs more
# than its kernel, the same bound as the fused layers' launch-bound rule
SMALL_BATCH = LAUNCH_BOUND_BATCH


def timer_name(device: torch.device, timer: str = "do_bench", batch: Optional[int] = None) -> str:
    if timer in ("host", "none"):
        return timer
    if device.type != "cuda":
        return "perf_counter"
    if timer == "cudagraph" or (timer == "auto" and batch is not None and batch <= SMALL_BATCH):
        return "cudagraph"
    try:
        import triton.testing  # noqa: F401
        return "triton.testing.do_bench"
    except ImportError:
        return "cuda_events"


def time_ms(fn, device, warmup: float = 25, rep: float = 100, timer: str = "do_bench") -> float:
    """Median milliseconds per call of ``fn``; ``warmup``/``rep`` are time budgets in ms, as in do_bench.
    ``timer`` "cudagraph" (CUDA only) times graph replays instead (see _bench_cudagraph), "host" the wall clock
    of back-to-back calls (see _bench_host)."""
    device = torch.device(device)
    if timer == "host":
        return _bench_host(fn, device, warmup, rep)
    if device.type == "cuda" and timer == "cudagraph":
        return _bench_cudagraph(fn, warmup, rep)
    if device.type == "cuda":
        try:
            import triton.testing  # lazy: the CPU path and ``import opbench`` must not need Triton
        except ImportError:
            return _bench_cuda_events(fn, warmup, rep)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    return _bench_cpu(fn, warmup, rep)


# ---------------------------------------------------------------------------------------------- measurement

def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def metrics(shape: OpShape, batch: int, dtype: torch.dtype, ms: float) -> Dict:
    flops = shape.flops(batch)
    nbytes = shape.min_bytes(batch, torch.empty(0, dtype=dtype).element_size())
    tflops = flops / (ms * 1e-3) / 1e12
    gbps = nbytes / (ms * 1e-3) / 1e9
    peak = PEAK_TFLOPS.get(dtype_name(dtype))
    return {"tflops": tflops, "gbps": gbps, "pct_peak_tflops": 100 * tflops / peak if peak else None,
            "pct_peak_gbps": 100 * gbps / PEAK_GBPS}


def bench_shape(entry: ShapeEntry, dtype: torch.dtype, device, impls: Sequence[str], warmup: float = 25,
                rep: float = 100, check: bool = True, seed: int = 0, timer: str = "do_bench") -> List[Dict]:
    """One result row per implementation: ms, TFLOP/s, GB/s, rel_err vs eager_seq, speedups; or the error."""
    device = torch.device(device)
    shape, n = entry.shape, entry.batch
    base = {"shape_id": shape.ident(), "label": shape.label(), "op": shape.op, "batch": n,
            "dtype": dtype_name(dtype), "count": entry.count, "flops": shape.flops(n),
            "min_bytes": shape.min_bytes(n, torch.empty(0, dtype=dtype).element_size())}
    rows: List[Dict] = []
    try:
        case = build_case(shape, n, dtype, device, seed)
    except Exception as e:  # e.g. out of memory for the inputs: every impl of this shape fails the same way
        _recover(device)
        return [dict(base, impl=i, ms=None, error=f"building inputs: {_short(e)}") for i in impls]
    ref = None
    if check:
        try:
            with torch.no_grad():
                ref = impl_fn(case, "eager_seq")[0]().float()
        except Exception:
            ref = None
    for impl in impls:
        row = dict(base, impl=impl, ms=None)
        why = skip_reason(impl, device, dtype)
        if why is not None:
            row["skipped"] = why
            rows.append(row)
            continue
        try:
            with torch.no_grad():
                fn, backend = impl_fn(case, impl)
                row["backend"] = backend
                same = next((r for r in rows if r["impl"] == backend and r.get("ms")), None)
                if impl == "auto" and same is not None:
                    # The very call already timed under the backend's own name: reuse it, saving budget.
                    row.update({k: same[k] for k in ("ms", "rel_err", "tflops", "gbps", "pct_peak_tflops",
                                                     "pct_peak_gbps") if k in same}, same_as=backend)
                    rows.append(row)
                    continue
                out = fn()  # compiles / picks algorithms outside the timed region, and gives the check's output
                _sync(device)
                if ref is not None and impl != "cudnn_conv":
                    row["rel_err"] = rel_err(out, ref)
                del out
                if timer == "none":  # one call each, for a profiler (gpu.sh ncu)
                    rows.append(row)
                    continue
                ms = time_ms(fn, device, warmup, rep, timer)
            if not (ms > 0 and math.isfinite(ms)):
                raise RuntimeError(f"timer returned {ms!r}")
            row["ms"] = ms
            row.update(metrics(shape, n, dtype, ms))
        except Exception as e:
            _recover(device)
            row["error"] = _short(e)
        rows.append(row)
    times = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
    for r in rows:
        if r.get("ms") and r["impl"] not in BASELINES:
            # Speedups (higher = ours faster): baseline time / our time.
            for b in BASELINES:
                if b in times:
                    r[f"speedup_vs_{b}"] = times[b] / r["ms"]
    del case, ref
    return rows


def _recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass  # a sticky error (illegal address) cannot be undone; the next rows will record it too
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ precompile

def _precompile_worker(items: List[Tuple[Dict, int, str]]) -> int:
    """Run each shape's Triton kernel once, so its compiled binary lands in Triton's on-disk cache."""
    done = 0
    dev = torch.device("cuda")
    for shape_d, batch, dt in items:
        try:
            dtype = DTYPES[dt]
            if skip_reason("triton", dev, dtype) is not None:
                continue
            case = build_case(OpShape.from_dict(shape_d), batch, dtype, dev)
            with torch.no_grad():
                impl_fn(case, "triton")[0]()
            torch.cuda.synchronize()
            del case
            done += 1
        except Exception:
            pass  # the main run reports it, with the shape it belongs to
    return done


def precompile(entries: Sequence[ShapeEntry], dtypes: Sequence[torch.dtype], workers: int, log=print) -> None:
    """Compile the Triton kernels of all shapes in ``workers`` processes before timing anything.

    A fresh machine compiles one kernel variant per tile config / specialisation, serially, a second or more
    each: for two models and two dtypes that is most of the run. Spread over processes (at the real batch, so
    the plan and specialisation are the ones timed later), the main process then loads them from the cache.
    """
    import concurrent.futures
    import multiprocessing

    items = [(e.shape.to_dict(), e.batch, dtype_name(dt)) for dt in dtypes for e in entries]
    workers = max(1, min(workers, len(items)))
    chunks = [items[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            n = sum(ex.map(_precompile_worker, chunks))
        log(f"# precompiled Triton kernels for {n}/{len(items)} shape x dtype in {time.perf_counter() - t0:.1f} s "
            f"({workers} processes)")
    except Exception as e:  # only a speed-up: the timed run compiles whatever is missing itself
        log(f"# precompile skipped ({_short(e)})")


# --------------------------------------------------------------------------------------------------- run-all

def environment(device: torch.device) -> Dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, cap = (platform.processor() or platform.machine() or "cpu"), None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {"device": name, "device_type": device.type, "capability": cap, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_v,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "python": platform.python_version(), "dla_fast": dla_fast.__version__, "git_commit": commit,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def model_totals(result: Dict) -> List[Dict]:
    """Per model, dtype and impl: the sum over the model's layers of the op time (count x ms).

    It is the time the model's fused layers alone would take back to back, a first check of how the per-op
    gains add up before the end-to-end numbers. ``complete`` is False when some shape has no time.
    """
    rows = {(r["shape_id"], r["dtype"], r["impl"]): r for r in result["rows"]}
    out = []
    keys = sorted({(r["dtype"], r["impl"]) for r in result["rows"]}, key=lambda k: (k[0], _impl_order(k[1])))
    for model in result["models"]:
        for dt, impl in keys:
            total, missing = 0.0, 0
            # Walk the shapes, not the rows: a shape an interrupted run never reached counts as missing.
            for s in result["shapes"]:
                cnt = s["model_counts"].get(model, 0)
                if not cnt:
                    continue
                r = rows.get((s["id"], dt, impl))
                if r is not None and r.get("ms"):
                    total += cnt * r["ms"]
                else:
                    missing += cnt
            if total:  # an impl skipped (or failing) everywhere has no total worth a row
                out.append({"model": model, "dtype": dt, "impl": impl, "ms": total, "complete": missing == 0,
                            "missing_layers": missing})
    return out


def _impl_order(impl: str) -> int:
    order = list(BACKEND_IMPLS) + list(BASELINES)
    return order.index(impl) if impl in order else len(order)


def _fmt(v, spec=".3f", none="-") -> str:
    return none if v is None else format(v, spec)


def _ours(rows: List[Dict]) -> Optional[Dict]:
    """The dla_fast row a shape is summarised by: "auto" (what the model uses), else the fastest backend."""
    mine = [r for r in rows if r["impl"] not in BASELINES and r.get("ms")]
    auto = [r for r in mine if r["impl"] == "auto"]
    if auto:
        return auto[0]
    return min(mine, key=lambda r: r["ms"]) if mine else None


def to_markdown(result: Dict) -> str:
    env = result["env"]
    impls = [i for i in result["impls"]]
    lines = [f"### Fused-op benchmark: {', '.join(result['models'])} at batch {result['batch']}, "
             f"{result['hw'][0]}x{result['hw'][1]}",
             "",
             f"{env['device']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, {env['date']}; "
             f"timer {result['timer']} (median, warmup {result['warmup']} ms, rep {result['rep']} ms). "
             f"Times in ms. \"ours\" = `auto` (else the fastest dla_fast backend); TFLOP/s and GB/s (minimum "
             f"bytes) are ours, vs H100 ceilings {PEAK_TFLOPS['float16']:.0f} TFLOP/s fp16/bf16 dense, "
             f"{PEAK_GBPS / 1000:.1f} TB/s. x = baseline time / our time (>1: ours faster).",
             ""]
    head = ["#", "shape", "layers", "dtype"] + impls + ["ours TFLOP/s", "ours GB/s", "x eager_seq", "x cudnn"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "--:" for i in range(len(head))) + "|")
    errors = []
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["dtype"], r["shape_id"]), []).append(r)
    idx = {s["id"]: i for i, s in enumerate(result["shapes"])}
    for (dt, sid), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], idx.get(kv[0][1], 0))):
        cells = {}
        for r in rows:
            if r.get("ms"):
                c = f"{r['ms']:.3f}"
                if r["impl"] == "auto" and r.get("backend"):
                    c += f" ({r['backend']})"
                if (r.get("rel_err") or 0) > REL_ERR_FLAG:
                    errors.append(f"- {sid} {dt} {r['impl']}: rel_err {r['rel_err']:.2e} vs eager_seq")
                    c += f" !err[{len(errors)}]"
            elif r.get("error"):
                errors.append(f"- {sid} {dt} {r['impl']}: {r['error']}")
                c = f"err[{len(errors)}]"
            else:
                c = "n/a"
            cells[r["impl"]] = c
        o = _ours(rows)
        r0 = rows[0]
        lines.append("| " + " | ".join(
            [str(idx.get(sid, "?")), r0["label"], str(r0["count"]), dt] + [cells.get(i, "-") for i in impls]
            + [_fmt(o and o.get("tflops"), ".3g"), _fmt(o and o.get("gbps"), ".4g"),
               _fmt(o and o.get("speedup_vs_eager_seq"), ".2f"), _fmt(o and o.get("speedup_vs_cudnn_conv"), ".2f")])
            + " |")
    totals = result.get("totals") or model_totals(result)
    if totals:
        lines += ["", "Sum over each model's benchmarked layers of count x op time (ms); * = some layer has no time:",
                  ""]
        t_impls = [i for i in impls if any(t["impl"] == i for t in totals)]
        lines.append("| model | layers | dtype | " + " | ".join(t_impls) + " | x eager_seq | x cudnn |")
        lines.append("|---|--:|---|" + "--:|" * (len(t_impls) + 2))
        covered = {m: sum(s["model_counts"].get(m, 0) for s in result["shapes"]) for m in result["models"]}
        of = result.get("model_layers", {})
        tab = {(t["model"], t["dtype"], t["impl"]): t for t in totals}
        for model in result["models"]:
            for dt in result["dtypes"]:
                if not any((model, dt, i) in tab for i in t_impls):
                    continue
                cells = []
                for i in t_impls:
                    t = tab.get((model, dt, i))
                    cells.append("-" if t is None else f"{t['ms']:.2f}{'' if t['complete'] else '*'}")
                # Summarised like the per-shape table: auto when it ran everywhere, else the fastest backend.
                done = [tab[(model, dt, i)] for i in BACKEND_IMPLS
                        if (model, dt, i) in tab and tab[(model, dt, i)]["complete"]]
                auto = [t for t in done if t["impl"] == "auto"]
                ours = auto[0] if auto else (min(done, key=lambda t: t["ms"]) if done else None)
                sp = []
                for b in ("eager_seq", "cudnn_conv"):  # the header's order
                    bt = tab.get((model, dt, b))
                    sp.append(_fmt(bt["ms"] / ours["ms"] if ours and bt and bt["complete"] and ours["ms"] else None,
                                   ".2f"))
                lay = f"{covered[model]}/{of[model]}" if model in of else str(covered[model])
                lines.append(f"| {model} | {lay} | {dt} | " + " | ".join(cells + sp) + " |")
    skipped = sorted({f"- {r['impl']} ({r['dtype']}): {r['skipped']}" for r in result["rows"] if r.get("skipped")})
    if skipped:
        lines += ["", "Skipped:", *skipped]
    if errors:
        lines += ["", "Errors (and results off eager_seq by more than rel_err %g):" % REL_ERR_FLAG, *errors]
    return "\n".join(lines) + "\n"


def _write_json(path: str, obj: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a run killed by a timeout leaves the last complete file, never a torn one


def _progress_line(i: int, total: int, entry: ShapeEntry, dt: str, rows: List[Dict]) -> str:
    parts = []
    for r in rows:
        if r.get("ms"):
            b = f"({r['backend']})" if r["impl"] == "auto" and r.get("backend") else ""
            bad = f" BAD(rel_err {r['rel_err']:.1e})" if (r.get("rel_err") or 0) > REL_ERR_FLAG else ""
            parts.append(f"{r['impl']} {r['ms']:.3f}{b}{bad}")
        elif r.get("error"):
            parts.append(f"{r['impl']} ERR")
    o = _ours(rows)
    extra = f" | {o['tflops']:.3g} TF/s {o['gbps']:.4g} GB/s" if o else ""
    return f"[{i:>3}/{total}] {dt:<8} {entry.shape.label():<52} x{entry.count:<2} | " + " | ".join(parts) + extra


# ------------------------------------------------------------------------------------------- op-run CSV

CSV_COLUMNS = ("op", "in_channels", "out_channels", "kernel", "stride", "padding", "groups", "in_hw", "residual",
               "relu", "dtype", "batch", "impl", "ms", "count", "pitches")
CSV_TITLE = "dla_fast op benchmark (benchmarks/opbench.py)"


def _pair(v: Sequence[int]) -> str:
    return f"{v[0]}x{v[1]}"


def _pitches_cell(s: OpShape) -> str:
    # Empty for dense inputs; else each input's channel pitch (and first channel when not 0): the Res2Net
    # slices share every other column with a dense shape, and their timing differs.
    if s.pitches == s.cin:
        return ""
    return "+".join(f"{p}@{o}" if o else str(p) for p, o in zip(s.pitches, s.offsets))


def _ms_cell(ms: float) -> str:
    # Fixed point with at least 5 significant digits: 1.76560 at batch 256, 0.0031200 at batch 1.
    return f"{ms:.{max(5, 4 - math.floor(math.log10(ms)))}f}"


def _command_of(result: Dict) -> Tuple[str, bool]:
    """The command that made ``result`` and whether it was recorded (False: rebuilt from the run's settings)."""
    if result.get("command"):
        return result["command"], True
    models = result["models"]
    parts = ["python", "benchmarks/opbench.py", "--models",
             *(["all"] if sorted(models) == sorted(dla_fast.list_models()) else models),
             "--dtypes", *result["dtypes"], "--batch", str(result["batch"])]
    if list(result["hw"]) != [224, 224]:
        parts += ["--hw", _pair(result["hw"])]
    parts += ["--impls", *result["impls"]]
    timer, small = result["timer"], result["batch"] <= SMALL_BATCH
    if timer == "host" or (timer == "cudagraph" and not small) or (timer != "cudagraph" and small):
        parts += ["--timer", "cudagraph" if timer == "cudagraph" else "host" if timer == "host" else "do_bench"]
    for k, default in (("warmup", 25), ("rep", 100)):
        if result.get(k, default) != default:
            parts += [f"--{k}", f"{result[k]:g}"]
    return " ".join(parts), False


def csv_rows(result: Dict) -> Tuple[List[Dict[str, str]], List[str]]:
    """The CSV cells of every timed row of ``result`` (the ``--json`` dict), and the comment lines for the rows
    left out: skipped implementations, errors, and results off eager_seq by more than REL_ERR_FLAG (a fast
    wrong kernel must not look like a win in a table built from the CSV)."""
    shapes = {d["id"]: OpShape.from_dict(d["shape"]) for d in result["shapes"]}
    out, notes, skipped = [], [], set()
    for r in result["rows"]:
        what = f"{r['shape_id']} {r['dtype']} {r['impl']}"
        if r.get("skipped"):
            skipped.add(f"skipped: {r['impl']} ({r['dtype']}): {r['skipped']}")
            continue
        if r.get("error") or not r.get("ms"):
            notes.append(f"error: {what}: {r.get('error') or 'no time'}")
            continue
        if (r.get("rel_err") or 0) > REL_ERR_FLAG:
            notes.append(f"wrong: {what}: rel_err {r['rel_err']:.2e} vs eager_seq")
            continue
        s = shapes[r["shape_id"]]
        out.append({"op": s.op, "in_channels": "+".join(map(str, s.cin)), "out_channels": str(s.cout),
                    "kernel": _pair(s.kernel), "stride": _pair(s.stride), "padding": _pair(s.padding),
                    "groups": str(s.groups), "in_hw": _pair(s.hw), "residual": s.residual,
                    "relu": str(int(s.relu)), "dtype": r["dtype"], "batch": str(r["batch"]), "impl": r["impl"],
                    "ms": _ms_cell(r["ms"]), "count": str(r["count"]), "pitches": _pitches_cell(s)})
    return out, sorted(skipped) + notes


def csv_text(result: Dict, source: Optional[str] = None) -> str:
    """``result`` (the ``--json`` dict) in the op-run CSV format; ``source``: the JSON file it was converted
    from, named in the header."""
    env = result.get("env") or result
    rows, notes = csv_rows(result)
    cap = f" (compute capability {env['capability']})" if env.get("capability") else ""
    command, recorded = _command_of(result)
    head = [CSV_TITLE, f"device: {env['device']}{cap}",
            f"versions: torch {env.get('torch')}, triton {env.get('triton')}, cuDNN {env.get('cudnn')}, "
            f"CUDA {env.get('cuda')}, dla_fast {env.get('dla_fast')}",
            f"date: {str(env.get('date'))[:10]}; commit: {env.get('git_commit')}; timer: {result['timer']} median, "
            f"warmup {result['warmup']:g} ms, rep {result['rep']:g} ms",
            f"command: {command}"]
    planned = len(result["shapes"]) * len(result["dtypes"]) * len(result["impls"])
    if len(result["rows"]) < planned:
        head.append(f"partial: {len(result['rows'])} of {planned} rows (the run stopped before it measured every "
                    f"shape)")
    if source:
        head.append(f"source: {source}, converted by opbench.py --from-json"
                    + ("" if recorded else "; command rebuilt from the run's settings"))
    lines = [f"# {h}" for h in head + notes]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return "\n".join(lines) + "\n" + buf.getvalue()


def write_csv(path: str, result: Dict, source: Optional[str] = None) -> None:
    _write_text(path, csv_text(result, source))


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a run killed by a timeout leaves the last complete file, never a torn one


def _ints(cell: str, sep: str, n: Optional[int], what: str) -> Tuple[int, ...]:
    try:
        v = tuple(int(x) for x in cell.split(sep))
    except ValueError:
        v = ()
    if not v or (n is not None and len(v) != n) or min(v) < 0:
        raise ValueError(f"{what} {cell!r} is not {n or 'some'} non-negative integers separated by {sep!r}")
    return v


def _shape_of(row: Dict[str, str]) -> OpShape:
    cin = _ints(row["in_channels"], "+", None, "in_channels")
    pitches, offsets = cin, (0,) * len(cin)
    if row.get("pitches"):
        parts = [p.partition("@") for p in row["pitches"].split("+")]
        pitches = _ints("+".join(p for p, _, _ in parts), "+", len(cin), "pitches")
        offsets = _ints("+".join(o or "0" for _, _, o in parts), "+", len(cin), "pitch offsets")
    if row["relu"] not in ("0", "1"):
        raise ValueError(f"relu {row['relu']!r} is not 0 or 1")
    return OpShape(row["op"], cin, _ints(row["in_hw"], "x", 2, "in_hw"), int(row["out_channels"]),
                   _ints(row["kernel"], "x", 2, "kernel"), _ints(row["stride"], "x", 2, "stride"),
                   _ints(row["padding"], "x", 2, "padding"), int(row["groups"]), row["residual"], row["relu"] == "1",
                   pitches, offsets)


def read_csv(path: str) -> Tuple[Dict, List[Dict]]:
    """An op-run CSV (``--csv``) as ``(meta, rows)``. ``meta``: the header's ``key: value`` fields ("device",
    "versions", "date", "commit", "timer", "command", "partial", "source"; "title" for the first line) and the
    lists "skipped", "error" and "wrong" of the rows left out. ``rows``: dicts with the columns typed (tuples for
    in_channels and the NxM pairs, ints, bool relu, float ms) and "shape", the row's :class:`OpShape`."""
    meta: Dict = {"skipped": [], "error": [], "wrong": []}
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    body = 0
    while body < len(lines) and lines[body].startswith("#"):
        text = lines[body][1:].strip()
        body += 1
        key, sep, value = text.partition(": ")
        if body == 1 and not sep:
            meta["title"] = text
        elif key in ("skipped", "error", "wrong"):
            meta[key].append(value)
        elif key == "date":  # "date: D; commit: C; timer: T"
            for part in text.split("; "):
                k, _, v = part.partition(": ")
                meta[k] = v
        elif sep:
            meta[key] = value
    if meta.get("title") != CSV_TITLE:
        raise ValueError(f"{path}: not an op-run CSV of opbench.py (its first line must be '# {CSV_TITLE}')")
    reader = csv.DictReader(lines[body:])
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path}: the column header lacks {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")
    rows = []
    for i, raw in enumerate(reader):
        try:
            shape = _shape_of(raw)
            row = {"op": shape.op, "in_channels": shape.cin, "out_channels": shape.cout, "kernel": shape.kernel,
                   "stride": shape.stride, "padding": shape.padding, "groups": shape.groups, "in_hw": shape.hw,
                   "residual": shape.residual, "relu": shape.relu, "dtype": raw["dtype"], "batch": int(raw["batch"]),
                   "impl": raw["impl"], "ms": float(raw["ms"]), "count": int(raw["count"]),
                   "pitches": raw.get("pitches") or "", "shape": shape}
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}, line {body + 2 + i}: {e}") from None
        if not (row["ms"] > 0 and math.isfinite(row["ms"])) or row["batch"] < 1 or row["count"] < 1:
            raise ValueError(f"{path}, line {body + 2 + i}: ms, batch and count must be positive")
        rows.append(row)
    return meta, rows


def json_to_csv(json_path: str, csv_path: str) -> int:
    """Convert an opbench ``--json`` run to the op-run CSV; returns the number of rows written."""
    with open(json_path) as f:
        result = json.load(f)
    if not isinstance(result, dict) or not {"shapes", "rows", "dtypes", "impls", "timer"} <= set(result):
        raise ValueError(f"{json_path}: not an opbench --json run (needs shapes, rows, dtypes, impls and timer)")
    write_csv(csv_path, result, source=os.path.basename(json_path))
    return len(csv_rows(result)[0])


# ------------------------------------------------------------------------------------------------- summary

def load_times(path: str, impl: str) -> Dict[Tuple[str, str], float]:
    """``{(shape id, dtype): ms}`` of ``impl`` in an opbench run, ``--json`` or ``--csv``."""
    if path.endswith(".csv"):
        return {(r["shape"].ident(), r["dtype"]): r["ms"] for r in read_csv(path)[1] if r["impl"] == impl}
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {(r["shape_id"], r["dtype"]): r["ms"] for r in rows if r["impl"] == impl and r.get("ms")}


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(run_path: str, ref_path: Optional[str] = None, impl: str = "cuda", show: Optional[str] = None,
            log=print) -> int:
    """One screen on a run: how many (shape, dtype) rows ``impl`` wins against eager_seq, geomean ratios against
    Triton and against an earlier run, and every losing row. Returns 2 when the rows it needs are missing."""
    ours, eager, triton = load_times(run_path, impl), load_times(run_path, "eager_seq"), load_times(run_path, "triton")
    if not ours or not eager:
        log(f"{run_path}: needs '{impl}' and 'eager_seq' rows")
        return 2
    both = [k for k in ours if k in eager]
    lose = sorted(k for k in both if ours[k] > eager[k])
    log(f"{impl}: {len(both) - len(lose)} of {len(both)} rows beat eager_seq; geomean eager_seq/{impl} "
        f"{geomean([eager[k] / ours[k] for k in both]):.3f}")
    if triton and impl != "triton":
        tk = [k for k in ours if k in triton]
        log(f"geomean triton/{impl} {geomean([triton[k] / ours[k] for k in tk]):.3f}; triton faster on "
            f"{sum(triton[k] < ours[k] for k in tk)} of {len(tk)}")
    if ref_path:
        ref = load_times(ref_path, impl)
        rk = [k for k in ours if k in ref]
        log(f"geomean ref/{impl} {geomean([ref[k] / ours[k] for k in rk]):.3f} over {len(rk)} rows")
    for k in lose:
        log(f"LOSE {k[0]} {k[1]}: {ours[k]:.4f} ms, eager_seq {eager[k]:.4f} ({eager[k] / ours[k]:.3f}x)")
    if show:
        pat = re.compile(show)
        for k in sorted(k for k in both if pat.search(k[0])):
            log(f"     {k[0]} {k[1]}: {ours[k]:.4f} ms, eager_seq {eager[k]:.4f} ({eager[k] / ours[k]:.3f}x)")
    return 0


# ------------------------------------------------------------------------------------------------ sanitize

# The sanitizer's input size: the smallest odd sizes the models accept (32k - 1) with a non-square map, so the
# tiles' edges, the odd 63x95 front layers and the 2x3 last level are all reached, at a few KB per tensor.
SANITIZE_HW = (63, 95)
SANITIZE_BATCH = 2
SANITIZE_BACKENDS = ("cuda", "triton", "eager")
# max |out - ref| / max |ref| against the float64 reference of the same (rounded) inputs and weights: the
# output's own rounding (fp16 2^-11, bf16 2^-8) with room for fp32 accumulation order; fp32 runs with TF32 off.
SANITIZE_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}


def _features(s: OpShape) -> set:
    """What decides a kernel's path: the op, the kernel and stride, grouping (channels per group), the channel
    counts' alignment and the output tile widths they get, residual kind, ReLU, channel-slice inputs, the number
    of children."""
    pitched = (s.pitches != s.cin, any(o % 8 for o in s.offsets))  # a slice; one not starting 16-byte aligned
    cout = min(w for w in (16, 32, 64, 128, 256, 10 ** 9) if s.cout <= w)
    if s.op == "aggregate":
        return {("n", min(len(s.cin), 8)), ("res", s.residual), ("pitched", pitched), ("cout", cout),
                ("aligned", all(c % 64 == 0 for c in s.cin)), ("vec", all(c % 8 == 0 for c in s.cin))}
    cin_g = s.cin_total // s.groups
    kind = "rgb" if s.cin_total < 8 else "dense" if s.groups == 1 else f"{min(cin_g, 64)}/group"
    return {("path", kind, s.kernel, s.stride), ("cout", kind, cout), ("res", kind, s.residual), ("relu", s.relu),
            ("aligned", kind, s.kernel, s.stride, cin_g % 64 == 0, cin_g % 8 == 0), ("pitched", kind, pitched)}


def sanitize_shapes(models: Sequence[str], batch: int = SANITIZE_BATCH, hw=SANITIZE_HW) -> List[ShapeEntry]:
    """A few small real shapes that between them reach every kernel path: a greedy cover of the shapes' features
    (see _features) over ``models`` at input size ``hw``, the cheapest shape first among equals."""
    pool = sorted(_shapes.distinct_shapes(models, batch=batch, hw=hw), key=lambda e: e.shape.flops(1))
    need = {(e.shape.op, f) for e in pool for f in _features(e.shape)}
    picked = []
    while need:
        best = max(pool, key=lambda e: len(need & {(e.shape.op, f) for f in _features(e.shape)}))
        picked.append(best)
        need -= {(best.shape.op, f) for f in _features(best.shape)}
    return sorted(picked, key=lambda e: (e.shape.op, e.shape.flops(1)))


def _max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.detach().cpu().double()
    if y.shape != ref.shape or not torch.isfinite(y).all():
        return math.inf
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _poison(numel: int, dtype: torch.dtype, device: torch.device) -> None:
    # NaN left in the caching allocator where the next output of this size lands: an element the kernel never
    # writes then fails the check instead of passing on stale memory.
    if device.type == "cuda":
        junk = torch.full((numel,), float("nan"), dtype=dtype, device=device)
        del junk


def _kernel_configs(mod, backend: str, case: "Case") -> List[Tuple[tuple, str]]:
    """``(config, label)`` for every kernel configuration of ``backend`` that can run ``case``: for the CUDA
    extension what ``conv_candidates`` / ``aggregate_candidates`` return (the rule's choice first); one entry,
    the backend's own rule, for the others (and for an extension without the candidate queries)."""
    s = case.shape
    query = getattr(mod, "aggregate_candidates" if s.op == "aggregate" else "conv_candidates", None)
    if backend != "cuda" or query is None:
        return [((), "rule")]
    if s.op == "aggregate":
        cands = query(case.inputs, case.weight, case.bias, case.residual)
    else:
        cands = query(case.x, case.weight, case.bias, s.stride, s.padding, s.groups, case.residual)
    describe = getattr(mod, "describe", lambda c: "/".join(map(str, c)))
    return [(tuple(c), describe(tuple(c)) + (" =rule" if i == 0 else "")) for i, c in enumerate(cands)] or [
        ((), "rule")]


def _backend_call(mod, case: "Case", config: tuple) -> Callable[[], torch.Tensor]:
    s, ins, res = case.shape, case.inputs, case.residual
    if mod is None:
        if s.op == "aggregate":
            return lambda: aggregate_ref(ins, case.weight, case.bias, res, s.relu)
        return lambda: conv_bn_act_ref(ins[0], case.weight, case.bias, s.stride, s.padding, s.groups, res, s.relu)
    # An empty config is the backend's own rule: called without one, so wrappers without the argument work too.
    extra = (list(config),) if config else ()
    if s.op == "aggregate":
        return lambda: mod.aggregate(ins, case.weight, case.bias, res, s.relu, *extra)
    return lambda: mod.conv_bn_act(ins[0], case.weight, case.bias, s.stride, s.padding, s.groups, res, s.relu,
                                   *extra)


def _reference64(case: "Case") -> torch.Tensor:
    """The float64 result on the CPU, from the inputs and folded weights as rounded to the tested dtype (so only
    the kernel's accumulation and output rounding count; and the GPU runs nothing but the kernels under test)."""
    s = case.shape
    d = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    kids = [d(t) for t in case.inputs]
    res = kids[0] if s.residual == "child0" else d(case.residual)
    if s.op == "aggregate":
        return aggregate_ref(kids, d(case.weight), d(case.bias), res, s.relu)
    return conv_bn_act_ref(kids[0], d(case.weight), d(case.bias), s.stride, s.padding, s.groups, res, s.relu)


def _max_pool_fn(mod, backend: str) -> Optional[Callable]:
    if mod is None:
        return lambda x, k: F.max_pool2d(x, k, k)
    return getattr(mod, "max_pool", None) or getattr(mod, "max_pool2d", None)


def _check_and_log(run: Callable[[], Tuple[bool, str]], device, log, dt, backend: str, label: str,
                   what: str) -> bool:
    """One sanitize check: ``run()`` gives (ok, message); an exception fails it (and the device is recovered).
    Logs one ok/FAIL line; returns ok."""
    try:
        ok, msg = run()
    except Exception as ex:
        ok, msg = False, _short(ex)
        _recover(device)
    log(f"{'ok  ' if ok else 'FAIL'} {dtype_name(dt):8} {backend:6} {label:18} {what:54} {msg}")
    return ok


def sanitize(entries: Sequence[ShapeEntry], dtypes: Sequence[torch.dtype], backends: Sequence[str], device,
             log=print) -> int:
    """Every op once per backend and kernel configuration on each shape (see :func:`sanitize_shapes`), each
    output checked against the float64 reference; also the trees' 2x2 max pool on the strided convs' inputs.
    Returns the number of failed checks. The program that compute-sanitizer runs (``gpu.sh sanitize``)."""
    device = torch.device(device)
    fails = checks = 0
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        for dt in dtypes:
            for be in backends:
                why = None if be == "eager" else _backends.reason_unavailable(be, torch.empty(0, device=device,
                                                                                                   dtype=dt))
                if why is not None:
                    log(f"skip {dtype_name(dt):8} {be}: {why}")
                    continue
                mod = None if be == "eager" else _backends.get(be)
                if be == "cuda" and not hasattr(mod, "conv_candidates"):
                    log("note: this CUDA extension has no candidate queries: its own rule only")
                for e in entries:
                    case = build_case(e.shape, e.batch, dt, device)
                    ref = _reference64(case)
                    try:
                        configs = _kernel_configs(mod, be, case)
                    except Exception as ex:  # the query itself failing is a finding too
                        configs = [((), f"candidates query failed: {_short(ex)}")]
                    for cfg, label in configs:
                        checks += 1

                        def run(cfg=cfg, case=case, ref=ref):
                            _poison(ref.numel(), dt, device)
                            with torch.no_grad():
                                y = _backend_call(mod, case, cfg)()
                            _sync(device)
                            err = _max_err(y, ref)
                            kernel = getattr(mod, "last_kernel", lambda: "")() if be == "cuda" else ""
                            return (err <= SANITIZE_TOL[dt] and y.dtype == dt,
                                    f"err {err:.2e}{'  [' + kernel + ']' if kernel else ''}")
                        fails += not _check_and_log(run, device, log, dt, be, label, e.shape.label())
                    del case, ref
                pool = _max_pool_fn(mod, be)
                if pool is None:
                    log(f"note: the {be} backend has no max_pool: not checked")
                seen = set()
                for e in entries:
                    s = e.shape
                    if pool is None or s.op != "conv_bn_act" or s.stride == (1, 1) or (s.cin, s.hw) in seen:
                        continue
                    seen.add((s.cin, s.hw))
                    checks += 1
                    # dense, as a tree's input is when it is pooled
                    x = build_case(s, e.batch, dt, device).x.contiguous(memory_format=torch.channels_last)

                    def run(x=x):
                        with torch.no_grad():
                            y = pool(x, 2)
                        _sync(device)
                        ok = torch.equal(y.cpu().double(), F.max_pool2d(x.cpu().double(), 2, 2))
                        return ok, "exact" if ok else "differs from F.max_pool2d"
                    fails += not _check_and_log(run, device, log, dt, be, "max_pool k2",
                                                f"{s.cin[0]} ch @{s.hw[0]}x{s.hw[1]}")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    log(f"sanitize: {checks - fails} of {checks} checks pass ({len(entries)} shapes, "
        f"{', '.join(dtype_name(d) for d in dtypes)}; {', '.join(backends)}); {fails} failures")
    return fails


# --------------------------------------------------------------------------------------------------- run

# ----------------------------------------------------------------------------------------------- the front

def front_run(dtypes: Sequence[torch.dtype], batch: int, hw, device, warmup: float = 25, rep: float = 100,
              timer: str = "auto", log=print) -> Dict:
    """The fused front (dla34's stem, level 0 and level 1 in one Triton kernel, :func:`dla_fast.ops.front`)
    against the same three layers run separately: per dtype, the front with each tiling worth timing (the
    heuristic's first; on the CPU only that one), the three fused layers on every backend that runs here, and
    the eager sequence. Each result is checked against the eager sequence; on a GPU each row also has the peak
    memory its call allocates beyond its input (the two full-resolution maps, or the front's scratch)."""
    import copy

    import dla_fast.backends.triton as tb
    from dla_fast.backends.triton import _front
    from dla_fast.verify import randomize_bn

    device = torch.device(device)
    h, w = _shapes.parse_hw(hw)
    timer = timer_name(device, timer, batch)
    shape_timer = timer if timer in ("cudagraph", "host", "none") else "do_bench"
    base = randomize_bn(dla_fast.create_model("dla34")).eval()
    result = {"env": environment(device), "batch": int(batch), "hw": [h, w], "timer": timer, "rows": []}
    log(f"# front {batch}x3x{h}x{w} on {result['env']['device']} | torch {result['env']['torch']} | "
        f"triton {result['env']['triton']} | timer {timer}")
    for dt in dtypes:
        fast = dla_fast.optimize(base, dtype=dt, backend="eager", device=device)
        layers = [fast.base_layer[0], fast.level0[0], fast.level1[0]]
        params = [t for m in layers for t in (m.weight, m.bias)]
        seq = copy.deepcopy(nn.Sequential(base.base_layer, base.level0, base.level1)).to(device=device, dtype=dt)
        seq = seq.to(memory_format=torch.channels_last)
        gen = torch.Generator(device=device).manual_seed(0)
        x = _nhwc_input(batch, 3, 3, h, w, dt, device, gen)
        impls: List[Tuple[str, Callable[[], torch.Tensor]]] = []
        if _backends.reason_unavailable("triton", x) is None:
            tf32 = bool(torch.backends.cudnn.allow_tf32)
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
            configs = _front.candidates(dt, tf32, sms) if device.type == "cuda" else [()]
            for cfg in configs:
                label = _front.describe(cfg) if cfg else "front (heuristic)"
                impls.append((label, lambda cfg=cfg: tb.front(x, *params, config=cfg)))
        for name in ("cuda", "triton"):
            if _backends.reason_unavailable(name, x) is None:
                mod = _backends.get(name)

                def three(mod=mod):
                    y = x
                    for m in layers:
                        y = mod.conv_bn_act(y, m.weight, m.bias, m.stride, m.padding, 1, None, True)
                    return y
                impls.append((f"{name} x3", three))
        impls.append(("eager_seq", lambda: seq(x)))
        with torch.no_grad():
            ref = seq(x)
            for name, fn in impls:
                out = fn()
                err = rel_err(out, ref)
                peak = None
                if device.type == "cuda":
                    del out
                    torch.cuda.synchronize(device)
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    fn()
                    torch.cuda.synchronize(device)
                    peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
                ms = None if shape_timer == "none" else time_ms(fn, device, warmup, rep, shape_timer)
                row = {"dtype": dtype_name(dt), "impl": name, "ms": ms, "rel_err": err, "peak_mb": peak}
                result["rows"].append(row)
                flag = "  MISMATCH" if err > REL_ERR_FLAG else ""
                log(f"{dtype_name(dt):<9} {name:<32} {_fmt(ms)} ms  err {err:.1e}"
                    + (f"  peak {peak:.0f} MB" if peak is not None else "") + flag)
    return result


TRAIN_IMPLS = ("stats", "conv", "cudnn", "bn_act", "bn_bwd", "dgrad", "dgrad_ref", "dgrad_bare", "dgrad_bare_ref",
               "dgrad_cuda", "dgrad_bare_cuda", "wgrad", "wgrad_ref")


def _train_calls(case: Case) -> Dict[str, Callable[[], object]]:
    """The training kernels of one layer, each as the fused training step launches it, and the two conv
    baselines: ``stats`` the conv with batch statistics (conv_stats / agg_stats, its combining launches
    included); ``conv`` the inference Triton conv on the statistics conv's tiles without statistics, so that
    ``stats - conv`` is what the statistics cost; ``cudnn`` torch's conv alone; ``bn_act`` BN + residual + ReLU
    on the conv's output; ``bn_bwd`` BN(+ReLU) backward's passes (with the ReLU's mask from z where no residual
    precedes it, the residual's gradient where one does); on convs of the kind whose input the training step
    shares with other readers (:func:`dla_fast.train._autograd.shares_dgrad`), ``dgrad`` the input's gradient
    with the other readers' gradient added in the Triton conv's epilogue, and ``dgrad_ref`` what that replaces,
    cuDNN's data gradient then an add, and ``dgrad_bare`` / ``dgrad_bare_ref`` the same two without the other
    gradient (a conv whose input has no other reader), and where the CUDA extension runs ``dgrad_cuda`` /
    ``dgrad_bare_cuda`` the same data gradients on its conv kernel (the other gradient as its residual); on the
    thin convs of the front
    (:func:`dla_fast.backends.triton._train.wgrad_thin_ok`), ``wgrad`` the weight gradient on the Triton
    split-pixel kernel (DLA_FAST_TRAIN_WGRAD=triton) and ``wgrad_ref`` cuDNN's."""
    from dla_fast.backends.triton import _launch as tl_launch
    from dla_fast.backends.triton import _train as kt
    from dla_fast.train import _autograd as ag

    s, dt = case.shape, case.dtype
    w = case.raw_weight
    res = case.residual
    if s.op == "conv_bn_act":
        x = case.x
        kh, kw = s.kernel
        m = case.batch * s.out_hw[0] * s.out_hw[1]
        plan = kt.train_conv_plan(m, s.cin_total // s.groups, s.cout // s.groups, s.groups, kh, kw, dt, False)

        def stats():
            return kt.conv_stats_launch(x, w, s.stride, s.padding, s.groups, raw=True)

        def conv():
            return tl_launch.conv_launch(x, w, None, s.stride, s.padding, s.groups, None, False, False,
                                         config=plan, raw=True)

        def cudnn():
            return F.conv2d(x, w, None, s.stride, s.padding, 1, s.groups)
    else:
        kids, w2 = case.inputs, w.reshape(s.cout, s.cin_total)

        def stats():
            return kt.agg_stats_launch(kids, w2, raw=True)

        def conv():
            return tl_launch.aggregate_launch(kids, w2, None, None, False, False, raw=True)

        def cudnn():
            return F.conv2d(case.cat, w)
    z, mean, var = stats()
    gamma = case.bn[2].float()
    beta = case.bn[3].float()
    rstd = torch.rsqrt(var + case.eps)
    scale = gamma * rstd
    y = kt.bn_act_launch(z, mean, scale, beta, res, s.relu, dt, raw=True)
    grad = torch.randn_like(y)
    coef = (scale, beta) if s.relu and res is None else None
    y_mask = y if s.relu and res is not None else None
    res_dtype = None if res is None else dt
    calls = {"stats": stats, "conv": conv, "cudnn": cudnn,
             "bn_act": lambda: kt.bn_act_launch(z, mean, scale, beta, res, s.relu, dt, raw=True),
             "bn_bwd": lambda: kt.bn_backward_launch(grad, y_mask, z, mean, rstd, gamma, res_dtype, raw=True,
                                                     relu_coef=coef)}
    if s.op == "conv_bn_act" and ag.shares_dgrad(x, w, s.stride, s.padding, s.groups):
        dz, extra = torch.randn_like(z), torch.randn_like(x)
        def dgrad_bare_ref():
            return torch.ops.aten.convolution_backward(
                dz, x, w, None, list(s.stride), list(s.padding), [1, 1], False, [0, 0], 1, [True, False, False])[0]
        calls["dgrad"] = lambda: ag.dgrad_onto("triton", dz, x, w, extra, False)[0]
        calls["dgrad_ref"] = lambda: dgrad_bare_ref() + extra
        calls["dgrad_bare"] = lambda: ag.dgrad_onto("triton", dz, x, w, None, False)[0]
        calls["dgrad_bare_ref"] = dgrad_bare_ref
        if _backends.reason_unavailable("cuda", dz) is None:
            cuda_be = _backends.get("cuda")
            wt = ag.dgrad_weight(w).contiguous(memory_format=torch.channels_last)
            dzc = dz.contiguous(memory_format=torch.channels_last)
            extc = extra.contiguous(memory_format=torch.channels_last)
            pad = (kh // 2, kw // 2)
            calls["dgrad_cuda"] = lambda: cuda_be.conv_bn_act(dzc, wt, None, (1, 1), pad, 1, extc, False)
            calls["dgrad_bare_cuda"] = lambda: cuda_be.conv_bn_act(dzc, wt, None, (1, 1), pad, 1, None, False)
    if s.op == "conv_bn_act" and kt.wgrad_thin_ok(w.shape, s.groups):
        gz = torch.randn_like(z)
        calls["wgrad"] = lambda: kt.wgrad_thin_launch(gz, x, w, s.stride, s.padding, raw=True)
        calls["wgrad_ref"] = lambda: torch.ops.aten.convolution_backward(
            gz, x, w, None, list(s.stride), list(s.padding), [1, 1], False, [0, 0], 1, [False, True, False])[1]
    return calls


def _train_bytes(case: Case) -> Dict[str, int]:
    """Bytes each training kernel must move at least (activations only): the conv reads its input(s) and writes
    z; bn_act reads z (and the residual) and writes y; bn_bwd reads g and z in each of its two passes (and y
    after a residual, for the mask), and writes dz (and the residual's gradient); the shared input's gradient
    (either way) reads dz and the other gradient and writes the input's; the weight gradient reads dz and the
    input."""
    s = case.shape
    e = torch.empty(0, dtype=case.dtype).element_size()
    out = case.batch * s.cout * s.out_hw[0] * s.out_hw[1] * e
    inp = sum(t.numel() for t in case.inputs) * e
    res = case.residual is not None
    return {"stats": inp + out, "conv": inp + out, "cudnn": inp + out,
            "bn_act": out * (3 if res else 2), "bn_bwd": out * (8 if res else 5),
            "dgrad": out + 2 * inp, "dgrad_ref": out + 2 * inp, "dgrad_bare": out + inp, "dgrad_bare_ref": out + inp,
            "dgrad_cuda": out + 2 * inp, "dgrad_bare_cuda": out + inp,
            "wgrad": out + inp, "wgrad_ref": out + inp}


def train_run(models: Sequence[str], dtypes: Sequence[torch.dtype], batch: int, hw, device, warmup: float = 25,
              rep: float = 100, timer: str = "auto", match: Optional[str] = None, limit: Optional[int] = None,
              log=print, into: Optional[Dict] = None) -> Dict:
    """The training kernels (:mod:`dla_fast.backends.triton._train`) on the distinct layer shapes of ``models``:
    per shape and dtype, the rows of :func:`_train_calls` timed (on a GPU from CUDA-graph replays unless
    ``timer`` says otherwise: one launcher call costs the host more than most of these kernels take), with the
    bytes each moves at least and the bandwidth that gives. The statistics conv's output is checked against
    cuDNN's conv and its mean against the mean of that output. ``into``: a dict filled as rows are measured (what
    an interrupted run still has)."""
    device = torch.device(device)
    timer = timer_name(device, timer if timer != "auto" else "cudagraph", batch)
    entries = select_entries(models, batch, hw, None, match, limit)
    result = into if into is not None else {}
    result.update({"env": environment(device), "batch": int(batch), "hw": list(_shapes.parse_hw(hw)),
                   "timer": timer, "models": list(models), "rows": []})
    log(f"# training kernels, batch {batch} at {result['hw'][0]}x{result['hw'][1]} on {result['env']['device']} | "
        f"torch {result['env']['torch']} | triton {result['env']['triton']} | timer {timer}")
    log(f"{'shape':<44} {'dtype':<8} " + " ".join(f"{k + ' us':>10}" for k in TRAIN_IMPLS) +
        f" {'stats-conv':>10} {'bn_act TB/s':>11} {'bn_bwd TB/s':>11}")
    for i, entry in enumerate(entries):
        for dt in dtypes:
            case = build_case(entry.shape, batch, dt, device)
            nbytes = _train_bytes(case)
            with torch.no_grad():
                calls = _train_calls(case)
                z, mean = calls["stats"]()[:2]
                err = rel_err(z, calls["cudnn"]())
                mean_err = float((mean - z.float().mean((0, 2, 3))).abs().max() / z.float().std().clamp_min(1e-30))
                dgrad_err = rel_err(calls["dgrad"](), calls["dgrad_ref"]()) if "dgrad" in calls else None
                bare_err = rel_err(calls["dgrad_bare"](), calls["dgrad_bare_ref"]()) if "dgrad_bare" in calls else None
                cuda_err = rel_err(calls["dgrad_cuda"](), calls["dgrad_ref"]()) if "dgrad_cuda" in calls else None
                cuda_bare_err = (rel_err(calls["dgrad_bare_cuda"](), calls["dgrad_bare_ref"]())
                                 if "dgrad_bare_cuda" in calls else None)
                wgrad_err = rel_err(calls["wgrad"](), calls["wgrad_ref"]()) if "wgrad" in calls else None
                times = {}
                for name, fn in calls.items():
                    ms = None if timer == "none" else time_ms(fn, device, warmup, rep, timer)
                    times[name] = ms
                    result["rows"].append({"shape_id": entry.shape.ident(), "label": entry.shape.label(),
                                           "layers": entry.model_counts(), "dtype": dtype_name(dt), "impl": name,
                                           "ms": ms, "min_bytes": nbytes[name],
                                           "tbps": None if not ms else nbytes[name] / (ms * 1e-3) / 1e12,
                                           "rel_err": {"stats": err, "dgrad": dgrad_err, "dgrad_bare": bare_err,
                                                       "dgrad_cuda": cuda_err, "dgrad_bare_cuda": cuda_bare_err,
                                                       "wgrad": wgrad_err}.get(name),
                                           "mean_err": mean_err if name == "stats" else None})
            us = {k: (None if times.get(k) is None else times[k] * 1e3) for k in TRAIN_IMPLS}
            epi = None if us["stats"] is None or us["conv"] is None else us["stats"] - us["conv"]
            tb = {k: (None if not times[k] else nbytes[k] / (times[k] * 1e-3) / 1e12) for k in ("bn_act", "bn_bwd")}
            bad = max(err, mean_err, dgrad_err or 0.0, bare_err or 0.0, cuda_err or 0.0, cuda_bare_err or 0.0,
                      wgrad_err or 0.0) > REL_ERR_FLAG
            flag = "  MISMATCH" if bad else ""
            log(f"{entry.shape.label()[:44]:<44} {dtype_name(dt):<8} " +
                " ".join(f"{_fmt(us[k], '.1f'):>10}" for k in TRAIN_IMPLS) +
                f" {_fmt(epi, '.1f'):>10} {_fmt(tb['bn_act'], '.2f'):>11} {_fmt(tb['bn_bwd'], '.2f'):>11}{flag}")
    return result


# The statistics convs' tile candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) that --train --tiles times beside
# each shape's default plan: the training plan is the inference heuristic's, never swept with the statistics
# epilogue, whose transposed-tile staging and reductions change what a tile costs.
TRAIN_TILES = ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 3), (128, 128, 32, 8, 4),
               (128, 128, 32, 4, 5), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 3),
               (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3),
               (64, 256, 64, 8, 3), (256, 64, 64, 8, 3), (128, 128, 128, 8, 2))
# The elementwise BN kernels' candidates (elements a program, warps, channels a tile at most; the default,
# _train.eltwise_config(), is timed first): programs larger and smaller than the default's, at 8 to 32 elements a
# thread, since these memory-bound kernels' bandwidth depends on the bytes each SM keeps in flight.
TRAIN_ELTWISE = ((2048, 4, 64), (2048, 8, 64), (4096, 8, 64), (4096, 8, 128), (2048, 4, 128), (8192, 16, 128),
                 (1024, 4, 64), (8192, 8, 128))
_TILE_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _tile_key(cfg: Dict) -> Tuple[int, ...]:
    return tuple(cfg[k] for k in _TILE_FIELDS)


def train_tile_configs(shape: OpShape, batch: int, dtype: torch.dtype,
                       tiles: Optional[Sequence[Tuple[int, ...]]] = None) -> Tuple[Optional[Dict], List[Dict]]:
    """(the default config, the candidates) of the statistics conv of one layer shape: the training step's own
    plan first, then each of ``tiles`` (default TRAIN_TILES) that suits the layer
    (:func:`dla_fast.backends.triton._train.tile_fits`), with the transposed tile where the step would use it
    (:func:`dla_fast.backends.triton._train.stats_swap`). (None, []) for a conv other than a dense ungrouped one
    (the thin front convs run on the CUDA stem or the flat walk, grouped ones on the block-diagonal walk)."""
    from dla_fast.backends.triton import _train as kt
    s = shape
    m = batch * s.out_hw[0] * s.out_hw[1]
    if s.op == "conv_bn_act":
        cin_g, cout_g = s.cin_total // s.groups, s.cout // s.groups
        if s.groups != 1 or kt.train_conv_kind(cin_g, cout_g, s.groups) != "dense":
            return None, []
        kh, kw = s.kernel
        base = kt.train_conv_plan(m, cin_g, cout_g, s.groups, kh, kw, dtype, False)
        cin_min = cin_g
    else:
        base = kt.train_agg_plan(m, list(s.cin), s.cout, dtype, False)
        cout_g, cin_min = s.cout, min(s.cin)
    seen, out = {_tile_key(base)}, []
    for bm, bn, bk, warps, stages in (TRAIN_TILES if tiles is None else tiles):
        if not kt.tile_fits(bn, bk, cin_min, cout_g):
            continue
        cfg = dict(base, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        cfg["SWAP"] = kt.stats_swap("dense", bn, False)
        if _tile_key(cfg) not in seen:
            seen.add(_tile_key(cfg))
            out.append(cfg)
    return base, out


def _stats_call(case: Case, cfg: Dict) -> Callable[[], Tuple[torch.Tensor, ...]]:
    from dla_fast.backends.triton import _train as kt
    s = case.shape
    if s.op == "conv_bn_act":
        return lambda: kt.conv_stats_launch(case.x, case.raw_weight, s.stride, s.padding, s.groups, config=cfg,
                                            raw=True)
    w2 = case.raw_weight.reshape(s.cout, s.cin_total)
    return lambda: kt.agg_stats_launch(case.inputs, w2, config=cfg, raw=True)


def _with_eltwise(cfg: Tuple[int, int, int], fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the elementwise BN kernels at ``cfg`` (what DLA_FAST_TRAIN_ELTWISE sets)."""
    from dla_fast.backends.triton import _train as kt

    def run():
        old = kt.eltwise_config
        kt.eltwise_config = lambda: tuple(cfg)
        try:
            return fn()
        finally:
            kt.eltwise_config = old
    return run


def _eltwise_candidates(tiles: Optional[Sequence[Tuple[int, int, int]]] = None) -> List[Tuple[int, int, int]]:
    from dla_fast.backends.triton import _train as kt
    base = tuple(kt.eltwise_config())
    return [base] + [tuple(t) for t in (TRAIN_ELTWISE if tiles is None else tiles) if tuple(t) != base]


def _train_tiles_worker(items: List[Tuple[Dict, int, str]]) -> int:
    """Launch every candidate of each shape once (no timing), so that the compiled kernels are in Triton's
    on-disk cache before the timing process asks for them."""
    done = 0
    dev = torch.device("cuda")
    for shape_d, batch, dt in items:
        shape = OpShape.from_dict(shape_d)
        base, cands = train_tile_configs(shape, batch, DTYPES[dt])
        case = build_case(shape, batch, DTYPES[dt], dev)
        with torch.no_grad():
            calls = [_stats_call(case, cfg) for cfg in ([base] + cands if base is not None else [])]
            bn = _train_calls(case)
            calls += [_with_eltwise(e, bn[k]) for e in _eltwise_candidates() for k in ("bn_act", "bn_bwd")]
            for fn in calls:
                try:
                    fn()
                    torch.cuda.synchronize()
                    done += 1
                except Exception:
                    _recover(dev)  # out of shared memory or registers: the timing run records it
        del case
    return done


def _precompile_tiles(entries, dtypes, workers: int, log) -> None:
    import concurrent.futures
    import multiprocessing
    items = [(e.shape.to_dict(), e.batch, dtype_name(dt)) for dt in dtypes for e in entries]
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ProcessPoolExecutor(
                min(workers, len(items)), mp_context=multiprocessing.get_context("spawn")) as ex:
            n = sum(ex.map(_train_tiles_worker, [items[i::workers] for i in range(workers)]))
        log(f"# precompiled {n} (shape, config) launches in {time.perf_counter() - t0:.1f} s ({workers} processes)")
    except Exception as e:  # only a speed-up
        log(f"# precompile skipped ({_short(e)})")


def _tile_rows(entry, case, base, cands, device, warmup, rep, timer) -> List[Dict]:
    """The statistics conv at each config, z checked against the default's."""
    from dla_fast.backends.triton import _train as kt
    cls = kt.tile_class(None if entry.shape.op == "aggregate" else entry.shape.kernel)
    rows = []
    z_ref = _stats_call(case, base)()[0]
    for j, cfg in enumerate([base] + cands):
        row = {"kernel": "stats", "class": cls, "default": j == 0,
               "config": list(_tile_key(cfg)), "swap": bool(cfg.get("SWAP", False)), "ms": None, "rel_err": None,
               "error": None}
        try:
            fn = _stats_call(case, cfg)
            row["rel_err"] = rel_err(fn()[0], z_ref)
            row["ms"] = time_ms(fn, device, warmup, rep, timer)
        except Exception as e:  # a config the GPU cannot hold (shared memory, registers)
            row["error"] = _short(e)
            _recover(device)
        rows.append(row)
    return rows


def _eltwise_rows(case, device, warmup, rep, timer) -> List[Dict]:
    """BN apply + BN backward at each elementwise config, y and dz checked against the default's; ``ms`` is the
    two together."""
    rows = []
    calls = _train_calls(case)
    ref = None
    for j, cfg in enumerate(_eltwise_candidates()):
        row = {"kernel": "bn", "class": "all", "default": j == 0, "config": list(cfg), "ms": None, "ms_bn_act": None,
               "ms_bn_bwd": None, "rel_err": None, "error": None}
        try:
            act, bwd = (_with_eltwise(cfg, calls[k]) for k in ("bn_act", "bn_bwd"))
            out = (act(), bwd()[0])
            if ref is None:
                ref = out
            row["rel_err"] = max(rel_err(out[0], ref[0]), rel_err(out[1], ref[1]))
            row["ms_bn_act"] = time_ms(act, device, warmup, rep, timer)
            row["ms_bn_bwd"] = time_ms(bwd, device, warmup, rep, timer)
            if row["ms_bn_act"] is not None and row["ms_bn_bwd"] is not None:
                row["ms"] = row["ms_bn_act"] + row["ms_bn_bwd"]
        except Exception as e:
            row["error"] = _short(e)
            _recover(device)
        rows.append(row)
    return rows


def train_tiles_run(models: Sequence[str], dtypes: Sequence[torch.dtype], batch: int, hw, device,
                    warmup: float = 25, rep: float = 100, match: Optional[str] = None, limit: Optional[int] = None,
                    workers: int = 0, log=print, into: Optional[Dict] = None) -> Dict:
    """Per layer shape of ``models``, from CUDA-graph replays: the statistics conv of every dense ungrouped conv
    and aggregation node at its default tiles and at each candidate of :func:`train_tile_configs`, and the
    elementwise BN kernels (BN apply + BN backward) of every layer at each of TRAIN_ELTWISE, each checked against
    the default's output. ``summary`` per model and dtype: each kernel family's time a step (each shape times its
    layer count) at the defaults, with each shape at its fastest config, and with one config per class, plus the
    DLA_FAST_TRAIN_TILES / DLA_FAST_TRAIN_ELTWISE values that set those classes' choice for an A/B."""
    device = torch.device(device)
    timer = timer_name(device, "cudagraph", batch)
    entries = select_entries(models, batch, hw, None, match, limit)
    result = into if into is not None else {}
    result.update({"env": environment(device), "batch": int(batch), "hw": list(_shapes.parse_hw(hw)),
                   "timer": timer, "models": list(models), "rows": []})
    if workers > 0 and device.type == "cuda":
        _precompile_tiles(entries, dtypes, workers, log)
    log(f"# training tiles, batch {batch} at {result['hw'][0]}x{result['hw'][1]} on {result['env']['device']} | "
        f"torch {result['env']['torch']} | triton {result['env']['triton']} | {timer}")
    n_all = len(entries) * len(dtypes)
    for i, entry in enumerate(entries):
        for dt in dtypes:
            base, cands = train_tile_configs(entry.shape, batch, dt)
            case = build_case(entry.shape, batch, dt, device)
            with torch.no_grad():
                rows = _tile_rows(entry, case, base, cands, device, warmup, rep, timer) if base else []
                rows += _eltwise_rows(case, device, warmup, rep, timer)
            del case
            head = {"shape_id": entry.shape.ident(), "label": entry.shape.label(), "layers": entry.model_counts(),
                    "dtype": dtype_name(dt)}
            result["rows"] += [dict(head, **r) for r in rows]
            parts = []
            for kernel in ("stats", "bn"):
                mine = [r for r in rows if r["kernel"] == kernel]
                ok = [r for r in mine if r["ms"] is not None and r["rel_err"] <= REL_ERR_FLAG]
                if mine and ok and mine[0]["ms"] is not None:
                    best = min(ok, key=lambda r: r["ms"])
                    parts.append(f"{kernel} {mine[0]['ms'] * 1e3:.1f} -> {best['ms'] * 1e3:.1f} us "
                                 f"{tuple(best['config'])}")
            log(f"[{i * len(dtypes) + dtypes.index(dt) + 1}/{n_all}] {entry.shape.label()[:44]:<44} "
                f"{dtype_name(dt):<8} " + "; ".join(parts))
    result["summary"] = train_tiles_summary(result["rows"], models)
    log_tiles_summary(result["summary"], log)
    return result


def log_tiles_summary(summary: List[Dict], log, partial: bool = False) -> None:
    """One line per model, dtype and kernel family of :func:`train_tiles_summary`; ``partial``: from an interrupted
    run (the shapes measured so far)."""
    for r in summary:
        what = f"a step (partial, {r['shapes']} shapes)" if partial else "a step"
        log(f"{r['model']:<16} {r['dtype']:<8} {r['kernel']:<5} {what}: default {r['default_ms']:.2f} ms, best per "
            f"shape {r['best_ms']:.2f} ({r['default_ms'] / r['best_ms']:.3f}x), one config per class "
            f"{r['per_class_ms']:.2f} ({r['default_ms'] / r['per_class_ms']:.3f}x): {r['env']}")


def train_tiles_summary(rows: List[Dict], models: Sequence[str]) -> List[Dict]:
    """Per model, dtype and kernel family, from train_tiles_run's rows: the time a step at the default configs,
    at each shape's fastest candidate, and with the one config per class that minimises the class's sum (over
    the shapes where that config ran; shapes where it did not keep their default), with the environment setting
    that selects those per-class configs. Configs that failed or disagreed with the default's output count
    nowhere."""
    out = []
    for m in models:
        for dt in sorted({r["dtype"] for r in rows}):
            for kernel in ("stats", "bn"):
                shapes: Dict[str, Dict] = {}
                for r in rows:
                    n = r["layers"].get(m, 0)
                    if r["dtype"] != dt or r["kernel"] != kernel or not n:
                        continue
                    sh = shapes.setdefault(r["shape_id"], {"n": n, "cls": r["class"], "default": None, "by": {}})
                    ok = r["ms"] is not None and r["error"] is None and r["rel_err"] <= REL_ERR_FLAG
                    key = tuple(r["config"])
                    if r["default"]:
                        sh["default"] = r["ms"] if ok else None
                    if ok:
                        sh["by"][key] = min(r["ms"], sh["by"].get(key, math.inf))
                shapes = {k: v for k, v in shapes.items() if v["default"] is not None}
                if not shapes:
                    continue
                default = sum(v["n"] * v["default"] for v in shapes.values())
                best = sum(v["n"] * min(v["by"].values()) for v in shapes.values())
                per_class, chosen = 0.0, {}
                for cls in sorted({v["cls"] for v in shapes.values()}):
                    mine = [v for v in shapes.values() if v["cls"] == cls]
                    keys = sorted({k for v in mine for k in v["by"]})
                    cost = {k: sum(v["n"] * v["by"].get(k, v["default"]) for v in mine) for k in keys}
                    k_best = min(keys, key=lambda k: cost[k])
                    chosen[cls] = list(k_best)
                    per_class += cost[k_best]
                if kernel == "stats":
                    env = "DLA_FAST_TRAIN_TILES='" + ";".join(
                        f"{c}={','.join(map(str, v))}" for c, v in chosen.items()) + "'"
                else:
                    env = "DLA_FAST_TRAIN_ELTWISE=" + ",".join(map(str, chosen["all"]))
                out.append({"model": m, "dtype": dt, "kernel": kernel, "default_ms": default, "best_ms": best,
                            "per_class_ms": per_class, "per_class": chosen, "env": env, "shapes": len(shapes)})
    return out


def select_entries(models: Sequence[str], batch: int, hw, ops: Optional[Sequence[str]] = None,
                   match: Optional[str] = None, limit: Optional[int] = None,
                   entries: Optional[List[ShapeEntry]] = None) -> List[ShapeEntry]:
    """The distinct shapes of ``models`` (or ``entries``), filtered by op, a regular expression on the label or
    id, and a count."""
    if entries is None:
        entries = _shapes.distinct_shapes(models, batch=batch, hw=hw)
    if ops:
        entries = [e for e in entries if e.shape.op in ops]
    if match:
        pat = re.compile(match)
        entries = [e for e in entries if pat.search(e.shape.label()) or pat.search(e.shape.ident())]
        if not entries:
            raise ValueError(f"--match {match!r} selects none of the shapes of {', '.join(models)}")
    return entries if limit is None else entries[:limit]


def run(models: Sequence[str] = ("dla34", "dla60"), dtypes: Sequence[str] = ("float16", "bfloat16"),
        batch: int = 256, hw=224, device=None, impls: Optional[Sequence[str]] = None, warmup: float = 25,
        rep: float = 100, check: bool = True, limit: Optional[int] = None, ops: Optional[Sequence[str]] = None,
        match: Optional[str] = None, json_path: Optional[str] = None, log=print, into: Optional[Dict] = None,
        precompile_workers: int = 0, timer: str = "auto", csv_path: Optional[str] = None,
        command: Optional[str] = None) -> Dict:
    """Benchmark every distinct shape of ``models``; returns (and fills ``into``, if given, as it goes) the
    result dict that ``--json`` writes; ``csv_path``: the op-run CSV too, rewritten as rows arrive."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    hw2 = _shapes.parse_hw(hw)
    impls = list(impls or default_impls(device))
    entries = select_entries(models, batch, hw2, ops, match, limit)
    dts = [DTYPES[d] for d in dtypes]
    result = {} if into is None else into
    result.update({
        "env": environment(device), "command": command, "models": list(models),
        "dtypes": [dtype_name(d) for d in dts], "batch": int(batch), "hw": list(hw2), "impls": impls,
        "warmup": warmup, "rep": rep, "timer": timer_name(device, timer, batch),
        "peaks": {"tflops": PEAK_TFLOPS, "gbps": PEAK_GBPS, "what": "H100 SXM dense tensor-core / copy"},
        "shapes": [e.to_dict() for e in entries], "rows": [],
        "model_layers": {m: len(_shapes.layer_records(m, hw2)) for m in models}})
    for k, v in result["env"].items():  # the flat keys report readers expect
        result.setdefault(k, v)
    total, i = len(entries) * len(dts), 0
    shape_timer = result["timer"] if result["timer"] in ("cudagraph", "host", "none") else "do_bench"
    log(f"# {result['env']['device']} | torch {result['torch']} | triton {result['triton']} | "
        f"cuDNN {result['cudnn']} | {len(entries)} shapes x {len(dts)} dtypes x {len(impls)} impls")
    if precompile_workers > 0 and device.type == "cuda" and {"triton", "auto"} & set(impls):
        precompile(entries, dts, precompile_workers, log)
    for dt in dts:
        for e in entries:
            i += 1
            rows = bench_shape(e, dt, device, impls, warmup, rep, check, timer=shape_timer)
            result["rows"].extend(rows)
            log(_progress_line(i, total, e, dtype_name(dt), rows))
            if json_path:
                _write_json(json_path, result)
            if csv_path:
                write_csv(csv_path, result)
    result["totals"] = model_totals(result)
    if json_path:
        _write_json(json_path, result)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="variant names, or 'all' (default: dla34 dla60; all for --sanitize)")
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="float16 bfloat16 float32 (default: float16 bfloat16 on CUDA, float32 on CPU; all three on "
                        "CUDA for --sanitize)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"default 256 on CUDA, 2 on CPU, {SANITIZE_BATCH} for --sanitize")
    p.add_argument("--hw", nargs="+", default=None,
                   help=f"input size: H, HxW or H W (default 224 on CUDA, 64 on CPU, "
                        f"{SANITIZE_HW[0]}x{SANITIZE_HW[1]} for --sanitize)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--impls", nargs="+", default=None,
                   help=f"subset of {BACKEND_IMPLS + BASELINES} (default: triton cuda auto + baselines on CUDA, "
                        f"eager triton + baselines on CPU); for --sanitize backends among {SANITIZE_BACKENDS}")
    p.add_argument("--ops", nargs="+", choices=("conv_bn_act", "aggregate"), default=None)
    p.add_argument("--warmup", type=float, default=25, help="warmup budget per measurement, ms (do_bench's)")
    p.add_argument("--rep", type=float, default=100, help="timed budget per measurement, ms (do_bench's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N distinct shapes")
    p.add_argument("--match", default=None,
                   help="only the shapes whose label or id matches this regular expression (e.g. 'g(32|64) ')")
    p.add_argument("--no-check", action="store_true", help="skip the rel_err check against eager_seq")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (default: on, giving the baselines their best "
                        "algorithms, as a tuned eager deployment would)")
    p.add_argument("--precompile-workers", type=int, default=None,
                   help="processes compiling the Triton kernels before timing (default: min(8, CPUs / 2) on CUDA; "
                        "0 to compile in the timing process)")
    p.add_argument("--timer", choices=TIMERS, default="auto",
                   help=f"do_bench (L2 flushed, per-call events), cudagraph (replays of calls captured in a CUDA "
                        f"graph: no launch cost), host (wall clock of back-to-back calls: the launch cost where it "
                        f"exceeds the kernel's), auto (cudagraph up to batch {SMALL_BATCH}, else do_bench), none "
                        f"(one call each, nothing timed: for a profiler)")
    p.add_argument("--json", default=None, help="the full result (every field of every row)")
    p.add_argument("--md", default=None, help="the per-shape and per-model tables")
    p.add_argument("--csv", default=None, help="the compact op-run CSV (see read_csv)")
    p.add_argument("--ref", default=None, help="an earlier run (.json or .csv): print the summary against it last")
    g = p.add_argument_group("other modes (nothing is timed)")
    g.add_argument("--from-json", metavar="RUN.json", default=None,
                   help="convert an earlier --json run to the op-run CSV given by --csv")
    g.add_argument("--summary", metavar="RUN", default=None,
                   help="summarise a run (.json or .csv): wins of --summary-impl against eager_seq, geomeans "
                        "against triton and --ref, every losing row")
    g.add_argument("--summary-impl", default="cuda", help="the implementation --summary and --ref judge (cuda)")
    g.add_argument("--show", default=None, help="--summary: also the rows whose shape id matches this regex")
    g.add_argument("--front", action="store_true",
                   help="time the fused front (stem + level 0 + level 1 in one Triton kernel, every tiling worth "
                        "timing) against the three layers on each backend and the eager sequence, at --batch / "
                        "--hw / --dtypes; --json writes the rows")
    g.add_argument("--train", action="store_true",
                   help="time the training kernels (the conv with batch statistics, the same conv without them, "
                        "cuDNN's conv, BN + ReLU, BN backward) on the distinct layer shapes of --models at "
                        "--batch / --hw / --dtypes, from CUDA-graph replays; --match / --limit select shapes, "
                        "--json writes the rows")
    g.add_argument("--tiles", action="store_true",
                   help="with --train: the statistics conv of each dense conv and aggregation-node shape at its "
                        "default tiles and at the TRAIN_TILES candidates, the elementwise BN kernels of every shape "
                        "at the TRAIN_ELTWISE ones, and per model each family's time a step at the defaults, at each "
                        "shape's best and with one config per class (with the DLA_FAST_TRAIN_TILES / "
                        "DLA_FAST_TRAIN_ELTWISE value that selects it)")
    g.add_argument("--sanitize", action="store_true",
                   help="every op once per backend and kernel configuration on a few small real shapes, each "
                        "output checked against float64; exit code 1 on a mismatch (run under compute-sanitizer)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    timing_outputs = [f"--{k}" for k in ("json", "md") if getattr(a, k)]
    if a.from_json or a.summary:
        if a.from_json and a.summary:
            p.error("--from-json and --summary are separate modes: give one")
        mode = "--from-json" if a.from_json else "--summary"
        extra = timing_outputs + (["--sanitize"] if a.sanitize else []) + (["--csv"] if a.summary and a.csv else [])
        if extra:
            p.error(f"{mode} reads a saved run and times nothing: drop {', '.join(extra)}")
        if a.from_json and not a.csv:
            p.error("--from-json converts to the op-run CSV: give the output file with --csv PATH")
        if not os.path.isfile(a.from_json or a.summary):
            p.error(f"no such run file: {a.from_json or a.summary}")
        try:
            if a.summary:
                return summary(a.summary, a.ref, a.summary_impl, a.show)
            print(f"wrote {a.csv}: {json_to_csv(a.from_json, a.csv)} rows from {a.from_json}")
            return 0
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            p.error(f"cannot read the run: {e}")
    if a.ref and not os.path.isfile(a.ref):
        p.error(f"no such run file for --ref: {a.ref}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    cpu = device.type != "cuda"
    if a.sanitize:
        dtypes = a.dtypes or (["float32"] if cpu else ["float16", "bfloat16", "float32"])
    else:
        dtypes = a.dtypes or (["float32"] if cpu else ["float16", "bfloat16"])
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; use float16, bfloat16 or float32")
    models = a.models or (["all"] if a.sanitize else ["dla34", "dla60"])
    if models == ["all"]:
        models = dla_fast.list_models()
    for m in models:
        if m not in dla_fast.list_models():
            p.error(f"unknown model {m!r}; available: {', '.join(dla_fast.list_models())}")
    try:
        hw = _shapes.parse_hw(a.hw[0] if len(a.hw) == 1 else a.hw) if a.hw else None
    except ValueError as e:
        p.error(f"--hw: {e}")
    if a.batch is not None and a.batch < 1:
        p.error(f"--batch must be at least 1, got {a.batch}")
    if a.sanitize:
        return _main_sanitize(p, a, models, dtypes, hw, device, timing_outputs)
    if a.front:
        if a.train:
            p.error("--front and --train are separate modes: give one")
        return _main_front(p, a, dtypes, hw, device)
    if a.tiles and not a.train:
        p.error("--tiles sweeps the training statistics conv: give it with --train")
    if a.train:
        return _main_train(p, a, models, dtypes, hw, device)
    for i in a.impls or ():
        if i not in BACKEND_IMPLS + BASELINES:
            p.error(f"unknown implementation {i!r}; choose from {BACKEND_IMPLS + BASELINES}")
    batch = a.batch or (2 if cpu else 256)
    hw = hw or ((64, 64) if cpu else (224, 224))
    _check_selection(p, models, batch, hw, a.ops, a.match, a.limit)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    for path in (a.json, a.md, a.csv):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    command = " ".join(["python", "benchmarks/opbench.py", *map(shlex.quote, argv)])
    old_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main_run(a, models, dtypes, batch, hw, device, command)
    finally:
        signal.signal(signal.SIGTERM, old_handler)  # main() may be called in-process (the tests do)


def _check_selection(p, models, batch, hw, ops, match, limit) -> None:
    """A usage error, before anything runs, for an input size a model rejects or a selection of no shapes."""
    try:
        for m in models:
            _shapes.layer_records(m, hw)
        select_entries(models, batch, hw, ops, match, limit)
    except (ValueError, re.error) as e:
        p.error(str(e))


def _main_sanitize(p, a, models, dtypes, hw, device, timing_outputs) -> int:
    drop = timing_outputs + [f"--{k}" for k in ("csv", "ref") if getattr(a, k)]
    if drop:
        p.error(f"--sanitize checks results and times nothing: drop {', '.join(drop)}")
    backends = a.impls or (["cuda", "triton"] if device.type == "cuda" else
                           ["eager"] + (["triton"] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else []))
    for b in backends:
        if b not in SANITIZE_BACKENDS:
            p.error(f"--sanitize runs backends, not {b!r}; choose from {', '.join(SANITIZE_BACKENDS)}")
    cant = {b: _backends.reason_unavailable(b, torch.empty(0, device=device)) for b in backends if b != "eager"}
    cant = {b: why for b, why in cant.items() if why is not None}
    if cant and a.impls:  # asked for by name: say why not instead of checking nothing
        p.error("; ".join(f"the {b} backend cannot run here: {why}" for b, why in cant.items()))
    try:
        entries = sanitize_shapes(models, a.batch or SANITIZE_BATCH, hw or SANITIZE_HW)
        entries = select_entries(models, a.batch or SANITIZE_BATCH, hw, a.ops, a.match, a.limit, entries)
    except (ValueError, re.error) as e:
        p.error(str(e))
    print(f"# sanitize on {environment(device)['device']}: {len(entries)} shapes of {len(models)} models at "
          f"{_shapes.parse_hw(hw or SANITIZE_HW)}, batch {a.batch or SANITIZE_BATCH}", flush=True)
    fails = sanitize(entries, [DTYPES[d] for d in dtypes], backends, device, log=lambda s: print(s, flush=True))
    return 1 if fails else 0


def _main_front(p, a, dtypes, hw, device) -> int:
    drop = [f"--{k}" for k in ("md", "csv", "ref", "ops", "match", "limit", "impls") if getattr(a, k)]
    if drop:
        p.error(f"--front times its own fixed set of implementations: drop {', '.join(drop)}")
    cpu = device.type != "cuda"
    batch, hw = a.batch or (1 if cpu else 256), hw or ((32, 32) if cpu else (224, 224))
    res = front_run([DTYPES[d] for d in dtypes], batch, hw, device, a.warmup, a.rep, a.timer,
                    log=lambda s: print(s, flush=True))
    if a.json:
        _write_json(a.json, res)
    return 1 if any(r["rel_err"] > REL_ERR_FLAG for r in res["rows"]) else 0


def _main_train(p, a, models, dtypes, hw, device) -> int:
    drop = [f"--{k}" for k in ("md", "csv", "ref", "ops", "impls") if getattr(a, k)]
    if drop:
        p.error(f"--train times its own fixed set of kernels: drop {', '.join(drop)}")
    why = _backends.reason_unavailable("triton", torch.empty(0, device=device))
    if why is not None:
        p.error(f"--train times the Triton training kernels, which cannot run here: {why}")
    cpu = device.type != "cuda"
    batch, hw = a.batch or (2 if cpu else 256), hw or ((32, 32) if cpu else (224, 224))
    _check_selection(p, models, batch, hw, None, a.match, a.limit)
    res: Dict = {}
    old_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        if a.tiles:
            workers = a.precompile_workers if a.precompile_workers is not None else min(8, (os.cpu_count() or 2) // 2)
            train_tiles_run(models, [DTYPES[d] for d in dtypes], batch, hw, device, a.warmup, a.rep, a.match,
                            a.limit, workers, log=lambda s: print(s, flush=True), into=res)
        else:
            train_run(models, [DTYPES[d] for d in dtypes], batch, hw, device, a.warmup, a.rep, a.timer, a.match,
                      a.limit, log=lambda s: print(s, flush=True), into=res)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured so far", file=sys.stderr, flush=True)
        res["interrupted"] = True
        if a.tiles and res.get("rows"):
            res["summary"] = train_tiles_summary(res["rows"], models)
            log_tiles_summary(res["summary"], lambda s: print(s, flush=True), partial=True)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    if a.json and res.get("rows") is not None:
        _write_json(a.json, res)
    if res.get("interrupted"):
        return 130
    if a.tiles:
        return 1 if any(r["rel_err"] is not None and r["rel_err"] > REL_ERR_FLAG for r in res["rows"]) else 0
    bad = [r for r in res["rows"] if (r["impl"] == "stats" and (r["rel_err"] > REL_ERR_FLAG or
                                                               r["mean_err"] > REL_ERR_FLAG))
           or (r["impl"] in ("dgrad", "wgrad") and r["rel_err"] > REL_ERR_FLAG)]
    return 1 if bad else 0


def _main_run(a, models, dtypes, batch, hw, device, command) -> int:
    res: Dict = {}
    done = False
    try:
        workers = a.precompile_workers if a.precompile_workers is not None else min(8, (os.cpu_count() or 2) // 2)
        run(models, dtypes, batch, hw, device, a.impls, a.warmup, a.rep, not a.no_check, a.limit, a.ops,
            a.match, a.json, log=lambda s: print(s, flush=True), into=res, precompile_workers=workers, timer=a.timer,
            csv_path=a.csv, command=command)
        done = True
    except KeyboardInterrupt:
        print("interrupted: writing what was measured so far", file=sys.stderr, flush=True)
        if not res.get("rows"):
            return 130
        res["interrupted"] = True
        res["totals"] = model_totals(res)
        if a.json:
            _write_json(a.json, res)
        if a.csv:
            write_csv(a.csv, res)
    md = to_markdown(res)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print()
    print(md, end="")
    if a.ref and a.json:
        print()
        summary(a.json, a.ref, a.summary_impl, a.show)
    elif a.ref and a.csv:
        print()
        summary(a.csv, a.ref, a.summary_impl, a.show)
    return 0 if done else 130


def _terminate(signum, frame):
    # `timeout` sends SIGTERM: make it an exception so the rows measured so far still get written.
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
