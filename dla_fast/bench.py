"""End-to-end benchmark: timm eager, torch.compile and dla_fast's backends side by side, in one process.

For each (model, dtype, batch size) every implementation is built from the same random weights and timed on
the same input, interleaved (round-robin over the implementations, several rounds, median), after warm-up.
GPU times come from CUDA events; CPU times from ``time.perf_counter``. ``first_s`` is the time from building an
implementation to its first result at this input size (torch.compile's compilation, dla_fast's planning and,
with ``tune``, its tuning, also given alone as ``tune_s`` with the layers it measured and found in the cache);
``peak_mem_mb`` the GPU memory the implementation's weights and activations took.
With ``features`` every implementation is the ``features_only`` backbone (levels 2-5, the way detectors use DLA).
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .verify import calibrated_random_weights, dtype_name, reference_output, rel_err

IMPLS = ("timm_eager", "torch_compile", "torch_compile_reduce_overhead", "dla_fast_triton", "dla_fast_cuda",
         "dla_fast_auto", "dla_fast_eager", "dla_fast_cudagraph", "dla_fast_aoti")
GPU_DEFAULT_IMPLS = ("timm_eager", "torch_compile", "dla_fast_triton", "dla_fast_cuda", "dla_fast_auto",
                     "dla_fast_cudagraph")
CPU_DEFAULT_IMPLS = ("timm_eager", "dla_fast_eager")
FEATURE_LEVELS = (2, 3, 4, 5)


@dataclass
class Row:
    model: str
    dtype: str
    batch_size: int
    impl: str
    img_per_s: Optional[float] = None
    ms: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    rel_err: Optional[float] = None
    first_s: Optional[float] = None
    tune_s: Optional[float] = None          # of first_s, the tuning (``tune``): measuring and cache lookups
    tune_measured: Optional[int] = None     # layer calls it measured
    tune_reused: Optional[int] = None       # layer calls it found in the plan cache
    tune_regime: Optional[str] = None       # the regime the whole-call check kept (planner.REGIMES)
    tune_call_ms: Optional[Dict[str, Optional[float]]] = None  # that check's time of the call in each regime
    host_ms: Optional[float] = None         # the host's time to issue one call (GPU only; median of rounds)
    host_load: Optional[float] = None       # the host's 1-minute load average as the timed rounds began
    error: Optional[str] = None
    hw: Tuple[int, int] = (224, 224)
    features: bool = False
    backends_used: Optional[str] = None


def environment(device: str) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = None
    from . import __version__
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda,
            # cuDNN only where it runs: asking for its version with CUDA built in but no device visible raises
            "cudnn": torch.backends.cudnn.version() if device == "cuda" and torch.backends.cudnn.is_available()
            else None,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "dla_fast": __version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable, x, iters: int, device: str) -> float:
    """Seconds per call, averaged over ``iters`` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - t) / iters


def host_once(fn: Callable, x) -> float:
    """Seconds the host spends issuing one call from an idle GPU (no wait for the kernels): a call whose host
    time is near its GPU time is paced by its launches, and moves with the CPU's speed and load."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn(x)
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host


def host_load() -> Optional[float]:
    """The host's 1-minute load average (None where the OS has none): other processes busy on the CPU slow every
    call paced by its launches, so a row timed under load says so."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_host(load: Optional[float], cpus: Optional[int]) -> bool:
    """Whether a load average of ``load`` on ``cpus`` CPUs means other work competes with the timing process
    (more than a quarter of the CPUs busy, and more than one)."""
    return load is not None and load > max(1.0, (cpus or 1) / 4)


def _flat(y) -> torch.Tensor:
    """One tensor of every output (a features model returns a list)."""
    if isinstance(y, (list, tuple)):
        return torch.cat([t.float().flatten() for t in y])
    return y.float().flatten()


def _timm(name: str, features: bool):
    import timm
    if features:
        return timm.create_model(name, features_only=True, out_indices=FEATURE_LEVELS)
    return timm.create_model(name)


def _ours(name: str, ours_fp32: torch.nn.Module, features: bool) -> torch.nn.Module:
    import dla_fast
    if not features:
        return ours_fp32
    m = dla_fast.create_model(name, features_only=True, out_indices=FEATURE_LEVELS)
    own = m.state_dict()
    m.load_state_dict({k: v for k, v in ours_fp32.state_dict().items() if k in own}, strict=True)
    return m.eval()


def _aoti(fast, x: torch.Tensor):
    """An AOTInductor package of the optimized model (its fused ops exported as dla_fast ops), loaded back."""
    path = os.path.join(tempfile.mkdtemp(prefix="dla_fast_aoti_"), "model.pt2")
    with torch.no_grad():
        ep = torch.export.export(fast, (x,))
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return torch._inductor.aoti_load_package(path)


def build_impl(impl: str, name: str, ours_fp32: torch.nn.Module, dtype: torch.dtype, device: str,
               batch: int, hw: Tuple[int, int], features: bool = False, x: Optional[torch.Tensor] = None,
               tune: bool = False, tuned: Optional[dict] = None):
    """(callable, backends string or None) for one implementation; the backends are those used at ``batch``.
    ``tuned``: a dict that receives the tuning's seconds and layer counts, where it tunes."""
    import dla_fast

    if impl in ("timm_eager", "torch_compile", "torch_compile_reduce_overhead"):
        m = _timm(name, features)
        own = m.state_dict()
        m.load_state_dict({k: v for k, v in ours_fp32.state_dict().items() if k in own}, strict=True)
        m = m.eval().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
        if impl == "timm_eager":
            return m, None
        torch._dynamo.reset()  # a fresh cache per model, so the recompile limit is never hit
        mode = "reduce-overhead" if impl.endswith("reduce_overhead") else None
        return torch.compile(m, mode=mode), None
    if impl.startswith("dla_fast_"):
        kind = impl[len("dla_fast_"):]
        backend = "auto" if kind in ("cudagraph", "aoti") else kind
        model = _ours(name, ours_fp32, features)
        fast = dla_fast.optimize(model, dtype=dtype, backend=backend, device=torch.device(device),
                                 cuda_graph=(kind == "cudagraph"))
        if tune and backend == "auto" and device == "cuda":
            rep = dla_fast.tune(fast, hw, [batch], progress=False)
            if tuned is not None:
                from .fuse import CudaGraphRunner
                from .plan.planner import REGIMES
                inner = fast.module if isinstance(fast, CudaGraphRunner) else fast
                checked = next(iter(rep.calls.values()), None)  # None: a small call, or its verdict was cached
                tuned.update(seconds=rep.seconds, measured=rep.measured, reused=rep.reused,
                             regime=inner._call_regime(batch, *hw),
                             call_ms=None if checked is None else {r: checked[f"{r}_ms"] for r in REGIMES})
            if torch.cuda.is_available():
                # the peak is this model's, not the tuning's (the largest layer's inputs, its candidates' outputs)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        used = "+".join(sorted(set(fast.backends(batch, hw).values())))
        if kind == "aoti":
            return _aoti(fast, x), used
        return fast, used
    raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")


def _regime_name(regime: str) -> str:
    from .plan.tuner import REGIME_NAMES
    return REGIME_NAMES.get(regime, regime)


def bench_one(name: str, dtype: torch.dtype, batch: int, impls: Sequence[str], device: str, hw: Tuple[int, int],
              rounds: int, iters: int, warmup: int, log: Callable[[str], None], features: bool = False,
              tune: bool = False) -> List[Row]:
    import dla_fast

    torch.manual_seed(0)
    ours = calibrated_random_weights(dla_fast.create_model(name), 0).eval()
    x32 = torch.randn(batch, 3, hw[0], hw[1], generator=torch.Generator().manual_seed(1))
    ref = _flat(reference_output(_ours(name, ours, features), x32, device, torch.float32)).cpu()
    x = x32.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    rows: Dict[str, Row] = {}
    fns: Dict[str, Callable] = {}
    for impl in impls:
        row = rows[impl] = Row(name, dtype_name(dtype), batch, impl, hw=tuple(hw), features=features)
        if impl in ("dla_fast_cudagraph", "dla_fast_aoti", "torch_compile_reduce_overhead") and device != "cuda":
            row.error = "skipped: needs a GPU"
            continue
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device == "cuda" else 0
            t = time.perf_counter()
            tuned: dict = {}
            fn, used = build_impl(impl, name, ours, dtype, device, batch, hw, features, x, tune, tuned)
            row.backends_used = used
            if tuned:
                row.tune_s = round(tuned["seconds"], 3)
                row.tune_measured, row.tune_reused = tuned["measured"], tuned["reused"]
                row.tune_regime, row.tune_call_ms = tuned["regime"], tuned["call_ms"]
            with torch.inference_mode() if not impl.startswith(("torch_compile", "dla_fast_aoti")) \
                    else torch.no_grad():
                # copied out at once: CUDA-graph runners (reduce-overhead) overwrite their output on the next call
                y = _flat(fn(x)).cpu()
                _sync(device)
                row.first_s = round(time.perf_counter() - t, 3)
                for _ in range(warmup):
                    fn(x)
                _sync(device)
            row.rel_err = rel_err(y, ref)
            if device == "cuda":
                # this implementation's own weights + activations, not what the others hold
                row.peak_mem_mb = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
            fns[impl] = fn
            log(f"  built {impl:<30} first result {row.first_s:7.2f}s  rel_err {row.rel_err:.2e}"
                + (f"  [{used}]" if used else "")
                + (f"  tuning {row.tune_s:.1f}s: {row.tune_measured} layer calls measured, {row.tune_reused} from "
                   "the cache" if tuned else "")
                + (f"; the whole call kept {_regime_name(row.tune_regime)}" if row.tune_regime else "")
                + (" (" + ", ".join(f"{_regime_name(r)} {'failed' if v is None else format(v, '.3f') + ' ms'}"
                                    for r, v in row.tune_call_ms.items()) + ")" if row.tune_call_ms else ""))
        except Exception as e:  # one broken implementation must not sink the whole run
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(f"  FAILED {impl}: {row.error}")
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    host: Dict[str, List[float]] = {k: [] for k in fns}
    load = host_load()
    if busy_host(load, os.cpu_count()):
        log(f"  note: the host's load average is {load} on {os.cpu_count()} CPUs: other processes compete with this "
            "one, and calls paced by their launches time slower (rows keep it as host_load)")
    for impl in fns:
        rows[impl].host_load = load
    for _ in range(rounds):
        for impl, fn in fns.items():
            with torch.no_grad():
                samples[impl].append(_time_once(fn, x, iters, device))
                if device == "cuda":
                    host[impl].append(host_once(fn, x))
    for impl, s in samples.items():
        med = statistics.median(s)
        rows[impl].ms = round(med * 1e3, 4)
        rows[impl].img_per_s = round(batch / med, 1)
        if host[impl]:
            rows[impl].host_ms = round(statistics.median(host[impl]) * 1e3, 4)
            log(f"  {impl:<36} {rows[impl].ms:8.3f} ms a call, {rows[impl].host_ms:8.3f} ms of it to issue on the "
                "host")
    del fns
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def run(models: Sequence[str], dtypes: Sequence[torch.dtype], batch_sizes: Sequence[int], impls: Sequence[str],
        device: str, hw: Tuple[int, int], rounds: int, iters: Optional[int], warmup: int,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
        on_partial: Optional[Callable[[dict], None]] = None, features: bool = False, tune: bool = False) -> dict:
    """All rows; ``on_partial`` gets the result so far after each (model, dtype, batch), so a long run that is
    cut off still leaves its finished part behind."""
    rows: List[Row] = []
    env = environment(device)
    env["hw"] = list(hw)
    env["features"] = list(FEATURE_LEVELS) if features else None
    env["tune"] = tune
    for name, dt, bs in each_case(models, dtypes, batch_sizes, log,
                                  lambda bs: f"batch {bs} {hw[0]}x{hw[1]}{' features' if features else ''}"):
        rows += bench_one(name, dt, bs, impls, device, hw, rounds, iterations(iters, device, bs), warmup, log,
                          features, tune)
        env["rows"] = [r.__dict__ for r in rows]
        if on_partial is not None:
            on_partial(env)
    env["rows"] = [r.__dict__ for r in rows]
    return env


def iterations(iters: Optional[int], device_type: str, batch: int) -> int:
    """Calls per timing sample: ``iters`` if given, else enough that a GPU sample is not one short call."""
    return iters or (1 if device_type == "cpu" else max(3, min(50, 512 // batch)))


def each_case(models: Sequence[str], dtypes: Sequence[torch.dtype], batch_sizes: Sequence[int],
              log: Callable[[str], None], describe: Callable[[int], str]):
    """(model, dtype, batch) of a run in order, with a progress line before each."""
    total = len(models) * len(dtypes) * len(batch_sizes)
    k = 0
    t0 = time.perf_counter()
    for name in models:
        for dt in dtypes:
            for bs in batch_sizes:
                k += 1
                log(f"[{k}/{total}] {name} {dtype_name(dt)} {describe(bs)} ({time.perf_counter() - t0:.0f}s elapsed)")
                yield name, dt, bs


def cudnn_mode(result: dict) -> str:
    """How cuDNN chose its algorithms in a result, for a table's header (absent from results written before the
    benchmark recorded it, which ran with cudnn.benchmark off)."""
    on = result.get("cudnn_benchmark")
    return "" if on is None else " (benchmark on)" if on else " (benchmark off)"


def format_table(result: dict) -> str:
    rows = result["rows"]
    hw = result.get("hw", [224, 224])
    hw = (hw, hw) if isinstance(hw, int) else hw
    feats = result.get("features")
    out = [f"device: {result['device']} | torch {result['torch']} | triton {result['triton']} | "
           f"cuDNN {result['cudnn']}{cudnn_mode(result)} | {result['date']} | input {hw[0]}x{hw[1]}"
           + (f" | features_only levels {feats}" if feats else ""),
           "",
           "| model | dtype | batch | impl | img/s | ms | vs timm_eager | vs torch_compile | first result s | "
           "peak MB | rel err |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"], r["batch_size"]), []).append(r)
    for (m, d, b), rs in groups.items():
        by = {r["impl"]: r for r in rs}

        def ratio(r, peer):
            p = by.get(peer)
            if not p or not p.get("img_per_s") or not r.get("img_per_s"):
                return "-"
            return f"{r['img_per_s'] / p['img_per_s']:.2f}x"
        for r in rs:
            if r.get("error"):
                out.append(f"| {m} | {d} | {b} | {r['impl']} | - | - | - | - | - | - | {r['error'][:60]} |")
                continue
            first = r.get("first_s", r.get("compile_s"))
            first = "-" if first is None else str(first)
            if r.get("tune_s") is not None:
                first += f" (tuning {r['tune_s']}: {r.get('tune_measured')} measured, {r.get('tune_reused')} cached)"
            out.append(f"| {m} | {d} | {b} | {r['impl']} | {r['img_per_s']:.1f} | {r['ms']:.3f} | "
                       f"{ratio(r, 'timm_eager')} | {ratio(r, 'torch_compile')} | {first} | "
                       f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else '-'} | {r['rel_err']:.1e} |")
    return "\n".join(out)
