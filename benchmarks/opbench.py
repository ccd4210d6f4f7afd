"""Per-op benchmarks of the fused kernels on the real layer shapes of DLA variants.

For every distinct shape (see ``shapes.py``) and dtype, this times:

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

    python benchmarks/opbench.py --models dla34 dla60 --dtypes float16 bfloat16 --batch 256 \
        --json out.json --md out.md
    python benchmarks/opbench.py --device cpu --batch 2 --hw 64 --dtypes float32    # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
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

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, _here)
    sys.path.insert(0, os.path.dirname(_here))
    import shapes as _shapes  # noqa: E402
else:  # pragma: no cover - imported as part of a package
    from . import shapes as _shapes  # noqa: E402

import dla_fast  # noqa: E402
from dla_fast.fuse import LAUNCH_BOUND_BATCH  # noqa: E402
from dla_fast.ops import _backends  # noqa: E402
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
    weight = _backends.prep_weight(w.to(device=device, dtype=dtype))
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
    """The backend module the fused model would use for this layer (None: eager), keyed like FusedDLA."""
    s = case.shape
    if s.op == "aggregate":
        key = _backends.aggregate_key(s.cin, s.cout, case.dtype, s.hw)
    else:
        key = _backends.conv_key(case.raw_weight.shape, s.stride, s.padding, s.groups, case.dtype, s.hw)
    return _backends.select(s.op, backend, case.x, False, key=key)


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
    mod = _select(case, impl)
    if mod is None:
        if s.op == "aggregate":
            return (lambda: aggregate_ref(ins, w, b, res, relu)), "eager"
        return (lambda: conv_bn_act_ref(ins[0], w, b, s.stride, s.padding, s.groups, res, relu)), "eager"
    if s.op == "aggregate":
        return (lambda: mod.aggregate(ins, w, b, res, relu)), mod.NAME
    return (lambda: mod.conv_bn_act(ins[0], w, b, s.stride, s.padding, s.groups, res, relu)), mod.NAME


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


TIMERS = ("auto", "do_bench", "cudagraph")
# timer "auto": CUDA-graph timing up to this batch size, do_bench above -- the batches where a launch costs more
# than its kernel, the same bound as the fused layers' launch-bound rule
SMALL_BATCH = LAUNCH_BOUND_BATCH


def timer_name(device: torch.device, timer: str = "do_bench", batch: Optional[int] = None) -> str:
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
    ``timer`` "cudagraph" (CUDA only) times graph replays instead (see _bench_cudagraph)."""
    device = torch.device(device)
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
            "triton_interpret": _backends.interpreter_on(),
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


def run(models: Sequence[str] = ("dla34", "dla60"), dtypes: Sequence[str] = ("float16", "bfloat16"),
        batch: int = 256, hw=224, device=None, impls: Optional[Sequence[str]] = None, warmup: float = 25,
        rep: float = 100, check: bool = True, limit: Optional[int] = None, ops: Optional[Sequence[str]] = None,
        match: Optional[str] = None, json_path: Optional[str] = None, log=print, into: Optional[Dict] = None,
        precompile_workers: int = 0, timer: str = "auto") -> Dict:
    """Benchmark every distinct shape of ``models``; returns (and fills ``into``, if given, as it goes) the
    result dict that ``--json`` writes."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    hw2 = _shapes._hw_pair(hw)
    impls = list(impls or default_impls(device))
    entries = _shapes.distinct_shapes(models, batch=batch, hw=hw2)
    if ops:
        entries = [e for e in entries if e.shape.op in ops]
    if match:
        pat = re.compile(match)
        entries = [e for e in entries if pat.search(e.shape.label()) or pat.search(e.shape.ident())]
        if not entries:
            raise SystemExit(f"--match {match!r} selects none of the shapes of {list(models)}")
    if limit is not None:
        entries = entries[:limit]
    dts = [DTYPES[d] for d in dtypes]
    result = {} if into is None else into
    result.update({
        "env": environment(device), "models": list(models), "dtypes": [dtype_name(d) for d in dts],
        "batch": int(batch), "hw": list(hw2), "impls": impls, "warmup": warmup, "rep": rep,
        "timer": timer_name(device, timer, batch),
        "peaks": {"tflops": PEAK_TFLOPS, "gbps": PEAK_GBPS, "what": "H100 SXM dense tensor-core / copy"},
        "shapes": [e.to_dict() for e in entries], "rows": [],
        "model_layers": {m: len(_shapes.layer_records(m, hw2)) for m in models}})
    for k, v in result["env"].items():  # the flat keys report readers expect
        result.setdefault(k, v)
    total, i = len(entries) * len(dts), 0
    log(f"# {result['env']['device']} | torch {result['torch']} | triton {result['triton']} | "
        f"cuDNN {result['cudnn']} | {len(entries)} shapes x {len(dts)} dtypes x {len(impls)} impls")
    if precompile_workers > 0 and device.type == "cuda" and {"triton", "auto"} & set(impls):
        precompile(entries, dts, precompile_workers, log)
    for dt in dts:
        for e in entries:
            i += 1
            rows = bench_shape(e, dt, device, impls, warmup, rep, check,
                               timer="cudagraph" if result["timer"] == "cudagraph" else "do_bench")
            result["rows"].extend(rows)
            log(_progress_line(i, total, e, dtype_name(dt), rows))
            if json_path:
                _write_json(json_path, result)
    result["totals"] = model_totals(result)
    if json_path:
        _write_json(json_path, result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dla34", "dla60"], help="variant names, or 'all'")
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="float16 bfloat16 float32 (default: float16 bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 2 on CPU")
    p.add_argument("--hw", type=int, nargs="+", default=None, help="input H [W]; default 224 on CUDA, 64 on CPU")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--impls", nargs="+", default=None,
                   help=f"subset of {BACKEND_IMPLS + BASELINES} (default: triton cuda auto + baselines on CUDA, "
                        "eager triton + baselines on CPU)")
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
                   help=f"GPU timer: do_bench (L2 flushed, per-call events), cudagraph (replays of calls captured "
                        f"in a CUDA graph: no launch cost), auto (cudagraph up to batch {SMALL_BATCH})")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    cpu = device.type != "cuda"
    dtypes = a.dtypes or (["float32"] if cpu else ["float16", "bfloat16"])
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; use float16, bfloat16 or float32")
    if a.models == ["all"]:
        a.models = dla_fast.list_models()
    for m in a.models:
        if m not in dla_fast.list_models():
            p.error(f"unknown model {m!r}; available: {', '.join(dla_fast.list_models())}")
    for i in a.impls or ():
        if i not in BACKEND_IMPLS + BASELINES:
            p.error(f"unknown implementation {i!r}; choose from {BACKEND_IMPLS + BASELINES}")
    batch = a.batch or (2 if cpu else 256)
    hw = a.hw or ([64] if cpu else [224])
    hw = tuple(hw) if len(hw) == 2 else hw[0]
    try:
        for m in a.models:  # fail here, with a usage error, on an input size the model rejects
            _shapes.layer_records(m, _shapes._hw_pair(hw))
    except ValueError as e:
        p.error(str(e))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    for path in (a.json, a.md):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    old_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main_run(a, dtypes, batch, hw, device)
    finally:
        signal.signal(signal.SIGTERM, old_handler)  # main() may be called in-process (the tests do)


def _main_run(a, dtypes, batch, hw, device) -> int:
    res: Dict = {}
    done = False
    try:
        workers = a.precompile_workers if a.precompile_workers is not None else min(8, (os.cpu_count() or 2) // 2)
        run(a.models, dtypes, batch, hw, device, a.impls, a.warmup, a.rep, not a.no_check, a.limit, a.ops,
            a.match, a.json, log=lambda s: print(s, flush=True), into=res, precompile_workers=workers, timer=a.timer)
        done = True
    except KeyboardInterrupt:
        print("interrupted: writing what was measured so far", file=sys.stderr, flush=True)
        if not res.get("rows"):
            return 130
        res["interrupted"] = True
        res["totals"] = model_totals(res)
        if a.json:
            _write_json(a.json, res)
    md = to_markdown(res)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print()
    print(md, end="")
    return 0 if done else 130


def _terminate(signum, frame):
    # `timeout` sends SIGTERM: make it an exception so the rows measured so far still get written.
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
