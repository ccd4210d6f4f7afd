"""Tuning on the user's GPU: every layer's candidates timed at the input shapes in use, the winners cached.

For each batch size the fused model is traced once on the meta device to find its distinct layer calls (shape,
strides and storage layout of every input, so channel-slice views are reproduced exactly); each call not yet
measured on this GPU gets real random inputs and the candidates of every backend that can run it (the rule's
choice first), which are checked against the rule's output (a fast wrong result never wins) and timed
interleaved; the winner replaces the rule only when it is faster by more than ``margin``. The Triton candidates of
the next few calls are compiled ahead, in threads, so the timing does not wait for each compile in turn. Results
go to the on-disk cache under its inter-process lock: of N processes tuning at once, one measures and the others
find the entries when they get the lock.

The per-layer timings add up only while the GPU is the bottleneck. A call the pixel rule leaves to the measured plans
(a detection input at a small batch) may still be paced by the host, whose cost per layer the isolated timings
do not show in full (a Triton launch costs several times the CUDA extension's, and configurations of one backend
differ in host cost too), so the whole model call is timed once more in each regime of
:data:`~dla_fast.plan.planner.REGIMES`: on its measured plans, on its plans without Triton launches (each layer's
fastest measured candidate on the CUDA extension or torch, no fused front) and on the CUDA extension's default
kernels (what ``backend="cuda"`` runs), and the call keeps the fastest (:func:`check_call`).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import backends as _backends
from .planner import PLANNER, REGIMES, LayerKey, Plan, describe_config, rule, small_call
from .timing import Progress, cuda_event_timer, cuda_graph_timer, pick, time_candidates

MARGIN = 0.03          # a candidate replaces the rule's choice only when this much faster
# Layer calls whose Triton candidates are compiled together before they are timed: enough kernels to keep the
# compile threads busy, few enough that a time budget is not overrun by much (0: each compiles at its first
# timed launch).
COMPILE_AHEAD_CALLS = 8
# Another regime displaces a call's measured plans only when the whole call is this much faster in it.
CALL_MARGIN = 0.02
# What each regime of planner.REGIMES runs, as the whole-call check and its report name it.
REGIME_NAMES = {"measured": "measured plans", "paced": "no Triton launches", "cuda": "the CUDA extension's defaults"}
# A candidate's output must match cuDNN's on the same inputs this closely (relative L2) to be timed at all: a
# check against wrong results, far above the rounding differences of correct kernels (which the test suite
# bounds much more tightly against float64).
CHECK_RTOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-2}


@dataclass
class LayerCall:
    """One distinct fused call: the layer that makes it and its inputs' layout."""

    key: LayerKey
    layer: torch.nn.Module
    inputs: List[Tuple[Tuple[int, ...], Tuple[int, ...], int, int]]   # (shape, stride, storage offset, storage numel)
    residual: Optional[Tuple[Tuple[int, ...], Tuple[int, ...], int, int]]
    names: List[str] = field(default_factory=list)


@dataclass
class TuneReport:
    device: str
    dtype: str
    input_sizes: List[Tuple[int, int, int]]
    layers: int = 0                   # distinct layer calls found
    measured: int = 0                 # of them timed in this call
    reused: int = 0                   # already in the cache
    changed: int = 0                  # measured ones whose winner is not the rule's choice
    skipped: int = 0                  # left to the rule by the time budget
    seconds: float = 0.0
    compiled: int = 0                 # distinct Triton kernels compiled ahead of timing, in threads
    compile_s: float = 0.0            # the time that took (part of ``seconds``)
    plans: Dict[str, dict] = field(default_factory=dict)
    calls: Dict[str, dict] = field(default_factory=dict)   # whole-call regime checks (:func:`check_call`)

    def summary(self) -> str:
        sizes = ", ".join(f"{n}x{h}x{w}" for n, h, w in self.input_sizes)
        extra = f", {self.skipped} left to the rule (time budget)" if self.skipped else ""
        if self.compiled:
            extra += f"; {self.compiled} Triton kernels compiled (or loaded from Triton's cache) ahead of the timing " \
                     f"in {self.compile_s:.1f} s"
        for text, c in self.calls.items():
            size = text.split("|", 3)[3].replace("|n", " batch ")
            ms = ", ".join(f"{'failed' if c[r + '_ms'] is None else format(c[r + '_ms'], '.3f') + ' ms'} "
                           f"{REGIME_NAMES[r]}" for r in REGIMES)
            extra += f"; the whole call at {size}: {ms}; {REGIME_NAMES[c['regime']]} kept"
        return (f"tuned {self.layers} distinct layer calls at {sizes} ({self.dtype}, {self.device}) in "
                f"{self.seconds:.1f} s: {self.measured} measured ({self.changed} differ from the rule), "
                f"{self.reused} reused from the cache{extra}")


def _spec(t: torch.Tensor):
    return (tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), int(t.untyped_storage().nbytes()
                                                                            // t.element_size()))


def _materialise(spec, dtype: torch.dtype, device: torch.device, gen: Optional[torch.Generator]) -> torch.Tensor:
    """A tensor of ``spec``'s layout, random from ``gen`` (drawn on the generator's device, then moved); without
    one, uninitialised (for recording launches)."""
    shape, stride, offset, numel = spec
    if gen is None:
        base = torch.empty(max(numel, 1), dtype=dtype, device=device)
    else:
        base = torch.randn(max(numel, 1), generator=gen, dtype=torch.float32, device=gen.device).to(
            device=device, dtype=dtype)
    return base.as_strided(shape, stride, offset)


def collect_calls(fused, n: int, hw: Tuple[int, int]) -> List[LayerCall]:
    """The distinct fused calls of ``fused`` (a FusedDLA) for an input of batch ``n`` and spatial size ``hw``,
    found by one forward on the meta device; a size the network cannot take is refused as its forward refuses it."""
    from ..fuse import FusedAggregate, FusedConvBnAct, FusedMaxPool
    from ..models.dla import check_input

    check_input(torch.empty(n, fused.in_chans, *hw, device="meta"), fused.in_chans)

    calls: Dict[str, LayerCall] = {}
    hooks = []

    def record(name, key, layer, inputs, residual):
        c = calls.get(key.text())
        if c is None:
            c = calls[key.text()] = LayerCall(key, layer, [_spec(t) for t in inputs],
                                              None if residual is None else _spec(residual))
        c.names.append(name)

    for name, m in fused.named_modules():
        if isinstance(m, (FusedConvBnAct, FusedAggregate, FusedMaxPool)):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: record(name, mod.layer_key(*args), mod,
                                                         mod.call_inputs(*args), mod.call_residual(*args))))
    try:
        with torch.no_grad():
            fused._levels(torch.empty(n, fused.in_chans, hw[0], hw[1], device="meta", dtype=fused.dtype)
                          .contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    return list(calls.values())


def _candidates(call: LayerCall, args, available: Dict[str, bool]) -> List[Tuple[str, Tuple[int, ...]]]:
    """(backend, config) pairs to time, the rule's choice first."""
    key = call.key
    base = rule(key, available)
    out: List[Tuple[str, Tuple[int, ...]]] = [(base.backend, ())]
    for name in _backends.NAMES:
        if not available.get(name):
            continue
        mod = _backends.get(name)
        if key.op == "max_pool":
            configs = [()]
        elif key.op == "conv_bn_act":
            x, w, b, stride, padding, groups, res = args
            configs = mod.conv_candidates(x, w, b, stride, padding, groups, res)
        else:
            kids, w, b, res = args
            configs = mod.aggregate_candidates(kids, w, b, res)
        for i, cfg in enumerate(configs):
            # The backend's first config is its own rule's choice, the same kernel as ().
            pair = (name, () if i == 0 else tuple(cfg))
            if pair not in out:
                out.append(pair)
    return out


def _runner(call: LayerCall, backend: str, config: Tuple[int, ...], args) -> Callable[[], torch.Tensor]:
    mod = _backends.get(backend)
    layer = call.layer
    if call.key.op == "max_pool":
        (x,) = args

        def fn():
            return mod.max_pool(x, layer.k)
    elif call.key.op == "conv_bn_act":
        x, w, b, stride, padding, groups, res = args

        def fn():
            return mod.conv_bn_act(x, w, b, stride, padding, groups, res, layer.relu, config)
    else:
        kids, w, b, res = args

        def fn():
            return mod.aggregate(kids, w, b, res, layer.relu, config)
    fn.backend, fn.config = backend, config  # what it runs (timers and tests read these)
    return fn


def _args(call: LayerCall, device: torch.device, dtype: torch.dtype, gen: Optional[torch.Generator]):
    inputs = [_materialise(s, dtype, device, gen) for s in call.inputs]
    res = None if call.residual is None else _materialise(call.residual, dtype, device, gen)
    layer = call.layer
    if call.key.op == "max_pool":
        return (inputs[0],)
    if call.key.op == "conv_bn_act":
        return (inputs[0], layer.weight, layer.bias, layer.stride, layer.padding, layer.groups, res)
    return (inputs, layer.weight, layer.bias, res)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tune_calls(calls: Sequence[LayerCall], device: torch.device, dtype: torch.dtype, *, budget_s: Optional[float],
               timer=None, progress: bool = True, force: bool = False, margin: float = MARGIN,
               rounds: int = 7, clock: Callable[[], float] = time.perf_counter,
               report: Optional[TuneReport] = None, replayed: bool = False) -> Dict[LayerKey, Plan]:
    """Measure ``calls`` (those not yet in the cache, or all with ``force``) and cache the winners.

    ``replayed``: the calls belong to a small model call, whose measured plans run only where a CUDA graph or
    torch.compile hides the launches (eagerly such a call takes the launch-bound plans): each layer's candidates
    are then timed by graph replay (:func:`cuda_graph_timer`), since an eager timer would time the host's launches.
    ``timer``, where given, times every call."""
    available = PLANNER.available(device, dtype)
    cache = PLANNER.cache(device, dtype)
    event_timer = timer or (None if replayed else cuda_event_timer(device))
    t0 = clock()
    new: Dict[LayerKey, Plan] = {}
    lock = cache.lock() if cache is not None else _NullLock()
    with lock:
        if cache is not None:
            cache.reload()
            PLANNER.reload()
            available = PLANNER.available(device, dtype)
        todo = [c for c in calls if force or not PLANNER.known(c.key, device)]
        if report is not None:
            report.reused += len(calls) - len(todo)
        bar = Progress(len(todo), enabled=progress, prefix="tuning ")
        # Inputs drawn on the GPU: a detection shape's layer inputs hold hundreds of millions of values, seconds of
        # CPU sampling a tuning run.
        gen = torch.Generator(device=device).manual_seed(0)
        for i, call in enumerate(todo):
            if budget_s is not None and clock() - t0 > budget_s:
                if report is not None:
                    report.skipped += len(todo) - i
                break
            if COMPILE_AHEAD_CALLS and i % COMPILE_AHEAD_CALLS == 0:
                _compile_ahead(todo[i:i + COMPILE_AHEAD_CALLS], device, dtype, available, report)
            bar.step(call.key.label())
            args = _args(call, device, dtype, gen)
            cands = _candidates(call, args, available)
            fns = [_runner(call, b, c, args) for b, c in cands]
            with torch.no_grad():
                ref = _runner(call, "eager", (), args)()
                ok = []
                for fn in fns:
                    try:
                        ok.append(_rel_err(fn(), ref) <= CHECK_RTOL[dtype])
                    except Exception:  # a candidate that cannot run this call is never picked
                        ok.append(False)
                remaining = None if budget_s is None else max(0.0, budget_s - (clock() - t0))
                # a graph timer per call: it holds the call's graphs until the call is timed
                call_timer = event_timer or cuda_graph_timer(device)
                results = time_candidates([fn if good else _failing(fn) for fn, good in zip(fns, ok)],
                                          timer=call_timer, rounds=rounds, budget_s=remaining, clock=clock)
            win = pick(results, margin=margin)
            backend, config = cands[win]
            times = {f"{b}{' ' + describe_config(b, c, call.key.op) if c else ''}": round(r.ms, 5)
                     for (b, c), r in zip(cands, results) if r.error is None}
            why = f"{results[win].ms:.4f} ms; rule's choice {results[0].ms:.4f} ms"
            plan = Plan(backend, tuple(config), "tuned", why, results[win].ms,
                        _paced_alternative(cands, results) if backend == "triton" else None)
            new[call.key] = plan
            if report is not None:
                report.measured += 1
                report.changed += int(win != 0)
                report.plans[call.key.text()] = dict(plan.to_json(), candidates=times, layers=call.names)
        bar.close()
        if cache is not None and new:
            cache.update({k.text(): p.to_json() for k, p in new.items()})
    PLANNER.record(device, dtype, new)
    return new


def _paced_alternative(cands: Sequence[Tuple[str, Tuple[int, ...]]], results) -> Optional[Plan]:
    """The fastest of the candidates that ran and launch no Triton kernel (:attr:`Plan.paced`), or None."""
    ran = [(r.ms, i) for i, ((b, _), r) in enumerate(zip(cands, results))
           if b != "triton" and r.error is None and math.isfinite(r.ms)]
    if not ran:
        return None
    ms, i = min(ran)
    backend, config = cands[i]
    return Plan(backend, tuple(config), "tuned", f"{ms:.4f} ms", ms)


def _compile_ahead(calls: Sequence[LayerCall], device: torch.device, dtype: torch.dtype,
                   available: Dict[str, bool], report: Optional[TuneReport]) -> None:
    """Compile the Triton candidates' kernels of ``calls`` at once (:func:`dla_fast.backends.triton.compile_ahead`),
    on uninitialised inputs of the calls' layouts, so that timing them does not wait for each compile in turn."""
    if not available.get("triton"):
        return
    mod = _backends.get("triton")
    if not mod.compiled(device):
        return
    t0 = time.perf_counter()
    runs = []
    for call in calls:
        args = _args(call, device, dtype, None)
        runs += [_runner(call, b, c, args) for b, c in _candidates(call, args, available) if b == "triton"]
    n = mod.compile_ahead(runs, device)
    if report is not None:
        report.compiled += n
        report.compile_s += time.perf_counter() - t0


def _failing(fn):
    def failed():
        raise RuntimeError(f"{fn.backend} {list(fn.config)} failed its check against cuDNN's result on the same "
                           "inputs (or raised)")
    failed.backend, failed.config = fn.backend, fn.config
    return failed


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _hw(input_size) -> Tuple[int, int]:
    if isinstance(input_size, int):
        return int(input_size), int(input_size)
    t = tuple(int(v) for v in input_size)
    if len(t) in (2, 3):
        return t[-2], t[-1]
    raise ValueError(f"input_size must be H, (H, W) or (C, H, W), got {input_size!r}")


def tune(model, input_size: Union[int, Sequence[int]] = (224, 224), batch_sizes: Sequence[int] = (1,),
         dtype: Optional[torch.dtype] = None, *, device: Optional[Union[str, torch.device]] = None,
         budget_s: Optional[float] = 60.0, force: bool = False, progress: bool = True, timer=None) -> TuneReport:
    """Time every layer's candidate kernels on the GPU in use at the given input sizes and cache the winners.

    ``model``: an optimized model (:func:`dla_fast.optimize`) or a DLA (ours or timm's: an optimized copy is made
    for the measurement, the model is not touched). Later :func:`dla_fast.optimize` calls, in this and other
    processes, use the cached plans. ``budget_s`` bounds the measuring time (None: no bound); layers left over
    keep the rule. Returns a :class:`TuneReport`; ``report.summary()`` says what was done.
    """
    from ..fuse import CudaGraphRunner, FusedDLA, optimize

    if isinstance(model, CudaGraphRunner):
        model = model.module
    if not isinstance(model, FusedDLA):
        model = optimize(model, dtype=dtype or torch.float16, device=device or "cuda")
    elif dtype is not None and dtype != model.dtype:
        raise ValueError(f"the optimized model computes in {model.dtype}, not {dtype}; optimize it for {dtype}")
    dev = model.weight_device()
    if timer is None and dev.type != "cuda":
        raise RuntimeError(f"tuning times kernels on a GPU; the model is on {dev}. Pass device='cuda' (or an "
                           "optimized model on a GPU)")
    hw = _hw(input_size)
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    report = TuneReport(str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                        _dtype_str(model.dtype), [(n, hw[0], hw[1]) for n in sizes])
    t0 = time.perf_counter()
    for n in sizes:
        calls = collect_calls(model, n, hw)
        report.layers += len(calls)
        remaining = None if budget_s is None else max(0.0, budget_s - (time.perf_counter() - t0))
        tune_calls(calls, dev, model.dtype, budget_s=remaining, timer=timer, progress=progress, force=force,
                   report=report, replayed=small_call(n, hw))
        check_call(model, n, hw, timer=timer, force=force, report=report)
    report.seconds = time.perf_counter() - t0
    model.forget_plans()
    if progress:
        print(report.summary(), file=sys.stderr, flush=True)
    return report


def check_call(model, n: int, hw: Tuple[int, int], *, timer=None, force: bool = False, margin: float = CALL_MARGIN,
               rounds: int = 7, report: Optional[TuneReport] = None) -> Optional[str]:
    """Time the whole call of ``model`` (a FusedDLA under ``backend="auto"``) at ``n`` x ``hw`` without a CUDA
    graph in each regime of :data:`~dla_fast.plan.planner.REGIMES` (its measured plans; its plans without Triton
    launches, each layer's :attr:`Plan.paced` where Triton won it, no fused front; every layer on the CUDA
    extension's default kernels), and cache the fastest (the measured plans unless another is faster by more than
    ``margin``). Only calls the pixel rule leaves to the measured plans are checked (a small call takes the
    launch-bound rule already); returns the regime, or None when the call was not checked (another regime rule
    applies, or it is in the cache and ``force`` is off)."""
    dev = model.weight_device()
    if model.backend != "auto" or (timer is None and dev.type != "cuda") or small_call(n, hw):
        return None
    text = model.call_key(n, hw)
    if not force and PLANNER.regime(text, dev, model.dtype) is not None:
        return None
    timer = timer or cuda_event_timer(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, model.in_chans, *hw, generator=gen, device=dev).to(
        dtype=model.dtype, memory_format=torch.channels_last)
    model.forget_plans()  # layers resolved before this tuning take its plans now
    memo = model._regime_memo
    key = (int(n), int(hw[0]), int(hw[1]))

    def run(regime: str):
        def fn():
            memo[key] = regime
            return model(x)
        fn.backend, fn.config = REGIME_NAMES[regime], ()
        return fn

    try:
        with torch.inference_mode():
            results = time_candidates([run(r) for r in REGIMES], timer=timer, rounds=rounds, min_time_s=0.02)
    finally:
        memo.pop(key, None)
    regime = REGIMES[pick(results, margin=margin)]  # raises, with every error, when no regime ran
    entry = {"regime": regime, **{f"{r}_ms": _finite_ms(t.ms) for r, t in zip(REGIMES, results)}}
    PLANNER.record_regime(dev, model.dtype, text, regime)
    cache = PLANNER.cache(dev, model.dtype)
    if cache is not None:
        cache.update({text: entry})
    if report is not None:
        report.calls[text] = entry
    return regime


def _finite_ms(ms: float) -> Optional[float]:
    return round(float(ms), 5) if math.isfinite(ms) else None


def _dtype_str(dtype) -> str:
    return str(dtype).replace("torch.", "")
