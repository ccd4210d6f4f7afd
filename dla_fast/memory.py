"""Live activation memory of a forward pass, measured without a GPU.

A forward runs on the meta device (shapes, strides and dtypes without memory or arithmetic) under a
``TorchDispatchMode`` that records every tensor storage an op creates, with its true size (``nbytes`` of the
real dtype and shape: 256x16x224x224 fp16 is 411 MB = 392 MiB), and, through a weak-reference finalizer on the
storage, the moment it is freed: when the last tensor or view that uses it dies, which is when PyTorch's caching
allocator gets the block back on a GPU, since the same Python code drops the same references. The result, a
:class:`MemoryReport`, gives the peak of live activation bytes, the allocation that set it, every allocation
alive at that moment (named by the module and op that produced it), and when each was last read, so that a
tensor held past its last reader shows.

    report = dla_fast.memory.trace(model, (256, 3, 224, 224), torch.float16)   # timm's model, ours, optimized
    print(report.summary())

    python -m dla_fast.memory dla34 dla60 [--batch 256] [--hw 224] [--backend auto cuda triton eager]

The fused layers of an optimized model (:class:`~dla_fast.fuse.FusedConvBnAct`, ``FusedAggregate``,
``FusedMaxPool``) run one kernel that allocates only its output; on the meta device they compute their shapes
through the eager reference, whose temporaries a kernel does not have. So a fused layer is traced as one
allocation, its output, made while its inputs are alive, unless the layer would run on the eager backend
(``backend="eager"``, or what ``backend="auto"`` plans for it on the modelled GPU), whose temporaries are real
and are traced op by op.

What is counted: every storage the forward allocates, including the cast of the input and the returned output.
Not counted, and reported separately: the input the caller passes (``input_bytes``) and the weights
(``weight_bytes``). Not modelled at all: the CUDA kernels' workspaces (Triton's fp32 split-K partial sums,
cuDNN's workspace), the caching allocator's rounding (512-byte blocks, 2 MB segments) and fragmentation, CUDA
graph pools, and anything a backend allocates outside PyTorch. ``torch.cuda.max_memory_allocated`` on a GPU
therefore reads somewhat above ``weight_bytes + input_bytes + peak_bytes``.
"""
from __future__ import annotations

import argparse
import bisect
import copy
import functools
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Allocation", "MemoryReport", "ActivationTracer", "trace", "peak_activation_bytes", "main"]

MIB = 2 ** 20  # reports in MiB, as bench's peak_mem_mb


@dataclass(frozen=True)
class Allocation:
    """One storage the forward allocated: who made it, how large it is, and when it lived.

    ``start``, ``end`` and ``last_use`` are positions on the trace's clock, which ticks once per allocation and
    once per free; ``end`` is None for a storage still alive when the trace ended (a returned output, or a leak).
    A storage whose ``end`` comes later than the first free after ``last_use`` outlived its last reader.
    """

    module: str                  # the innermost module running when it was made ("" outside any)
    op: str                      # the aten op, or the fused layer's op for a layer traced as one kernel
    shape: Tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    start: int
    end: Optional[int]
    last_use: int                # clock time of the last op that read it (its own creation if none did)

    @property
    def label(self) -> str:
        return f"{self.module or '<top>'}: {self.op}"

    def alive_at(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)

    def needed_at(self, t: float) -> bool:
        """Alive at ``t`` and read there or later (or never freed: an output)."""
        return self.alive_at(t) and (self.end is None or self.last_use >= t)

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{self.nbytes / MIB:9.1f} MiB  {shape:<20} {str(self.dtype).replace('torch.', ''):<8} {self.label}"


Exclude = Optional[Callable[[Allocation], bool]]


@dataclass
class MemoryReport:
    """The allocations of one traced forward, and the peak of their live bytes.

    ``exclude`` (any method that takes it): allocations to leave out, e.g. ``lambda a: a.module == "level0"``:
    the peak is then recomputed over the rest, wherever it now falls. ``ideal``: as if every storage were freed
    right after the op that last reads it (the floor that lifetimes in Python code can reach; the returned
    outputs still live to the end).
    """

    allocations: List[Allocation]
    input_bytes: int = 0
    weight_bytes: int = 0
    title: str = ""
    input_shape: Tuple[int, ...] = ()

    def _peak(self, exclude: Exclude = None, ideal: bool = False) -> Tuple[int, float]:
        """(peak live bytes, clock time of the allocation that reached it; -1 if nothing was allocated)."""
        events = []
        for a in self.allocations:
            if exclude is not None and exclude(a):
                continue
            events.append((a.start, a.nbytes))
            if a.end is not None:
                # A free and an allocation never share a tick; the ideal free comes just after the last read,
                # before anything the next op allocates.
                events.append((a.last_use + 0.5 if ideal else a.end, -a.nbytes))
        live, best, at = 0, 0, -1
        for t, d in sorted(events):
            live += d
            if live > best:
                best, at = live, t
        return best, at

    def at_input_resolution(self, a: Allocation) -> bool:
        """Whether ``a`` is a map of the input's spatial size: in a DLA the stem's and level 0's outputs (and a
        cast copy of the input), which a fused front kernel keeping them on chip never writes. Pass it as
        ``exclude`` for the peak without them."""
        return len(a.shape) == 4 and len(self.input_shape) == 4 and a.shape[2:] == tuple(self.input_shape[2:])

    def peak(self, exclude: Exclude = None, ideal: bool = False) -> int:
        """The most activation bytes alive at once."""
        return self._peak(exclude, ideal)[0]

    @property
    def peak_bytes(self) -> int:
        return self.peak()

    def peak_allocation(self, exclude: Exclude = None, ideal: bool = False) -> Optional[Allocation]:
        """The allocation that brought the live bytes to their peak (None for an empty trace)."""
        _, t = self._peak(exclude, ideal)
        return next((a for a in self.allocations if a.start == t), None)

    def live_at_peak(self, exclude: Exclude = None) -> List[Allocation]:
        """Every allocation alive at the peak, in allocation order."""
        _, t = self._peak(exclude)
        if t < 0:
            return []
        return [a for a in self.allocations if a.alive_at(t) and not (exclude is not None and exclude(a))]

    def stale_at_peak(self, exclude: Exclude = None) -> List[Allocation]:
        """The allocations alive at the peak that no later op reads: held past their last reader."""
        _, t = self._peak(exclude)
        return [a for a in self.live_at_peak(exclude) if not a.needed_at(t)]

    def outlived(self) -> List[Allocation]:
        """Every allocation freed later than right after its last reader, i.e. alive while some later allocation
        was made (what ``ideal`` removes), in allocation order."""
        starts = sorted(a.start for a in self.allocations)
        out = []
        for a in self.allocations:
            if a.end is None:
                continue
            # any allocation strictly between the last read and the free?
            i = bisect.bisect_right(starts, a.last_use)
            if i < len(starts) and starts[i] < a.end:
                out.append(a)
        return out

    def alive_at_end(self) -> List[Allocation]:
        """Allocations never freed while the trace ran (the returned output, or something a module kept)."""
        return [a for a in self.allocations if a.end is None]

    @property
    def total_bytes(self) -> int:
        """Everything allocated, as if nothing were ever freed."""
        return sum(a.nbytes for a in self.allocations)

    def gpu_estimate(self, exclude: Exclude = None) -> int:
        """weights + input + activation peak: a lower bound of ``torch.cuda.max_memory_allocated`` for the same
        call (workspaces and allocator rounding come on top)."""
        return self.weight_bytes + self.input_bytes + self.peak(exclude)

    def summary(self, exclude: Exclude = None) -> str:
        peak, t = self._peak(exclude)
        ideal = self.peak(exclude, ideal=True)
        lines = [f"{self.title or 'forward'}: peak {peak / MIB:.1f} MiB of activations (freed at last read: "
                 f"{ideal / MIB:.1f}; + input {self.input_bytes / MIB:.1f}, weights {self.weight_bytes / MIB:.1f}; "
                 f"{len(self.allocations)} allocations, {self.total_bytes / MIB:.1f} MiB in all)"]
        if t >= 0:
            top = self.peak_allocation(exclude)
            lines.append(f"  reached at {top.label}; alive then (* = read by nothing later):")
            lines += [f"   {' ' if a.needed_at(t) else '*'}{a.describe()}" for a in self.live_at_peak(exclude)]
        return "\n".join(lines)


class ActivationTracer(TorchDispatchMode):
    """Records the storages allocated by the ops run inside ``with ActivationTracer(...) as tr:``, and when each
    is freed; ``tr.report()`` then gives the :class:`MemoryReport`.

    ``model``: if given, every module of it names the allocations made inside its forward (its qualified name).
    ``opaque(module, args, kwargs)``: True for a module to be traced as one kernel: the ops inside it are not
    recorded, and its output storages are recorded as allocated by it when it returns.

    Storages that exist before the block (inputs, weights) and views of them are never counted.
    """

    def __init__(self, model: Optional[nn.Module] = None,
                 opaque: Optional[Callable[[nn.Module, tuple, dict], bool]] = None):
        super().__init__()
        self._model = model
        self._opaque_fn = opaque
        self._clock = 0
        self._records: List[dict] = []
        self._live: Dict[int, dict] = {}     # storage key -> its record, while alive
        self._stack: List[str] = []
        self._opaque_stack: List[bool] = []  # per running module: whether this call is traced as one kernel
        self._opaque_depth = 0
        self._handles: list = []

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _freed(self, key: int, rec: dict) -> None:
        rec["end"] = self._tick()
        if self._live.get(key) is rec:
            del self._live[key]

    def _note_outputs(self, out, op: str, known: set) -> None:
        """Record the output storages that are new: not an input's (a view or an in-place result) and not
        already traced."""
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in known or key in self._live:
                continue
            known.add(key)
            now = self._tick()
            rec = dict(module=self._stack[-1] if self._stack else "", op=op, shape=tuple(t.shape), dtype=t.dtype,
                       nbytes=int(st.nbytes()), start=now, end=None, last_use=now)
            self._records.append(rec)
            self._live[key] = rec
            # The finalizer fires when the storage itself dies: the last tensor or view of it gone.
            weakref.finalize(st, self._freed, key, rec).atexit = False

    def _read(self, keys: set) -> None:
        for key in keys:
            rec = self._live.get(key)
            if rec is not None:
                rec["last_use"] = self._clock

    @staticmethod
    def _storage_keys(args, kwargs) -> set:
        return {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}

    # ------------------------------------------------------------------------------------------ the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._opaque_depth == 0:
            keys = self._storage_keys(args, kwargs)
            self._note_outputs(out, str(func.overloadpacket.__name__), keys)
            if not func.is_view:  # making a view reads nothing; the ops that use the view do
                self._read(keys)
        return out

    # ------------------------------------------------------------------------------------------ module names
    def _pre(self, name: str, module: nn.Module, args, kwargs):
        self._stack.append(name)
        opaque = self._opaque_depth == 0 and self._opaque_fn is not None and self._opaque_fn(module, args, kwargs)
        self._opaque_stack.append(bool(opaque))
        self._opaque_depth += bool(opaque)
        return None

    def _post(self, name: str, module: nn.Module, args, kwargs, out):
        if self._opaque_stack.pop():
            self._opaque_depth -= 1
            keys = self._storage_keys(args, kwargs)
            self._note_outputs(out, getattr(module, "OP", "") or type(module).__name__, keys)
            self._read(keys)
        self._stack.pop()
        return None

    def __enter__(self):
        if self._model is not None:
            for name, m in self._model.named_modules():
                self._handles.append(m.register_forward_pre_hook(functools.partial(self._pre, name),
                                                                 with_kwargs=True))
                self._handles.append(m.register_forward_hook(functools.partial(self._post, name),
                                                             with_kwargs=True, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def report(self, input_bytes: int = 0, weight_bytes: int = 0, title: str = "",
               input_shape: Sequence[int] = ()) -> MemoryReport:
        """The allocations so far (a snapshot: later frees do not change it)."""
        allocs = [Allocation(**r) for r in self._records]
        return MemoryReport(allocs, input_bytes=input_bytes, weight_bytes=weight_bytes, title=title,
                            input_shape=tuple(input_shape))


# ---------------------------------------------------------------------------------------------- models

def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no data copied), so that
    tracing neither moves nor mutates the caller's model."""
    memo: dict = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    meta = copy.deepcopy(model, memo)
    if hasattr(meta, "fused_layers"):  # FusedDLA: its max-pools plan for the model's device
        meta._apply(lambda t: t)
    return meta


def _weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@functools.lru_cache(maxsize=None)
def _prior_store(capability: Tuple[int, int]):
    from .plan.planner import _Store, load_prior
    raw, _ = load_prior(capability)
    return _Store(raw.get("entries", {}), "prior") if raw is not None else None


def planned_backend(layer: nn.Module, args: tuple, capability: Tuple[int, int] = (9, 0),
                    regime: Optional[Tuple[bool, bool, Optional[str]]] = None) -> str:
    """The backend ``backend="auto"`` gives a fused layer's call on a GPU of ``capability`` with every backend
    available and nothing tuned there: the shipped prior's nearest measurement, else the rule (as
    :class:`dla_fast.plan.planner.Planner` resolves it; a user's tuned or cached plans can differ). ``regime``:
    the model call's (paced by its launches, small, measured regime); None: judged by the layer's batch, as a plain
    eager call."""
    from .plan.planner import LAUNCH_BOUND_BATCH, rule
    key = layer.layer_key(*args)
    available = {"eager": True, "triton": True, "cuda": True}
    paced, small = (key.n <= LAUNCH_BOUND_BATCH, None) if regime is None else regime[:2]
    if paced:
        return rule(key, available, True).backend
    store = _prior_store(tuple(capability))
    hit = store.nearest(key) if store is not None else None
    return hit[2].backend if hit is not None else rule(key, available, small=small).backend


def _eager_forward(layer: nn.Module, *args, **kwargs):
    """A fused layer's call on the eager backend, as its forward makes it off the meta device: its meta branch
    would add a channels_last copy that the GPU's eager path does not make (cuDNN keeps the layout)."""
    from . import backends
    from .fuse import FusedAggregate, FusedConvBnAct

    eager = backends.get("eager")
    names = ("children" if isinstance(layer, FusedAggregate) else "x", "residual")
    call = dict(zip(names, args), **kwargs)
    if isinstance(layer, FusedConvBnAct):
        return eager.conv_bn_act(call["x"], layer.weight, layer.bias, layer.stride, layer.padding, layer.groups,
                                 call.get("residual"), layer.relu)
    if isinstance(layer, FusedAggregate):
        return eager.aggregate(call["children"], layer.weight, layer.bias, call.get("residual"), layer.relu)
    return eager.max_pool(call["x"], layer.k)


def _fused_opaque(model: nn.Module, capability: Tuple[int, int],
                  regime: Optional[Tuple[bool, bool, Optional[str]]] = None):
    """The tracer's ``opaque`` for an optimized model: a fused layer is one kernel unless it runs on the eager
    backend. The layers that may (``backend`` "eager" or "auto") get a forward of the eager path on this (meta)
    copy, used when they do."""
    from .fuse import _Planned

    for m in model.modules():
        if isinstance(m, _Planned) and m.backend in ("eager", "auto"):
            m.forward = functools.partial(_eager_forward, m)

    def opaque(m: nn.Module, args: tuple, kwargs: dict) -> bool:
        if not isinstance(m, _Planned):
            return False
        backend = m.backend
        if backend == "auto":
            backend = planned_backend(m, tuple(args) + tuple(kwargs.values()), capability, regime)
        return backend != "eager"
    return opaque


def trace(model: nn.Module, x_shape: Sequence[int] = (256, 3, 224, 224), dtype: torch.dtype = torch.float16,
          *, channels_last: bool = True, capability: Tuple[int, int] = (9, 0), title: str = "") -> MemoryReport:
    """Trace one inference forward of ``model`` on an input of ``x_shape`` in ``dtype`` on the meta device.

    ``model``: an eager model (timm's DLA or ours; traced in ``dtype``, channels_last when ``channels_last``, as
    ``bench`` runs timm eager) or an optimized one from :func:`dla_fast.optimize` (built for ``dtype``; fused
    layers count as one kernel each, see the module's notes; ``backend="auto"`` as planned on a GPU of
    ``capability``). Nothing is allocated for real and ``model`` is not modified.
    """
    from .fuse import CudaGraphRunner, FusedDLA

    if isinstance(model, CudaGraphRunner):
        raise TypeError("trace() cannot model a CUDA-graph runner's memory pool; trace the optimized model it "
                        "replays instead (runner.module), or optimize() without cuda_graph=True")
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() expects an nn.Module, got {type(model).__name__}")
    shape = tuple(x_shape)
    if len(shape) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ValueError(f"x_shape must be four positive ints (N, C, H, W), got {x_shape!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    fused = isinstance(model, FusedDLA)
    if fused and model.dtype != dtype:
        raise ValueError(f"the optimized model was built for {model.dtype}, not {dtype}; trace it with "
                         f"dtype={model.dtype} or optimize(model, dtype={dtype}) again")
    m = _meta_copy(model)
    if not fused:
        m = m.to(dtype=dtype)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
    m.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)
    # the call traced is a plain one (no CUDA graph): paced by its launches where the model's input is small
    from .fuse import _regime
    regime = _regime(x_shape[0], x_shape[2:], replayed=False)
    tracer = ActivationTracer(m, _fused_opaque(m, tuple(capability), regime) if fused else None)
    with torch.inference_mode(), tracer:
        out = m(x)
    # reported while the output is still referenced: it shows as alive at the end, as a returned result is
    report = tracer.report(input_bytes=x.numel() * x.element_size(), weight_bytes=_weight_bytes(m),
                           title=title or type(model).__name__, input_shape=shape)
    del out
    return report


def peak_activation_bytes(model: nn.Module, x_shape: Sequence[int] = (256, 3, 224, 224),
                          dtype: torch.dtype = torch.float16, **kwargs) -> int:
    """The peak of live activation bytes of one forward (:func:`trace`'s ``peak_bytes``)."""
    return trace(model, x_shape, dtype, **kwargs).peak_bytes


# ---------------------------------------------------------------------------------------------- the CLI

def compare(names: Sequence[str], batch: int = 256, hw: Union[int, Sequence[int]] = 224,
            dtype: torch.dtype = torch.float16, backends: Sequence[str] = ("auto",),
            capability: Tuple[int, int] = (9, 0)) -> List[Dict[str, Union[str, MemoryReport]]]:
    """Per variant, the traces of timm's eager model and of the optimized model on each of ``backends``, all
    built on the meta device: ``{"model": name, "timm": report, backend: report, ...}``."""
    import timm

    from .fuse import FusedDLA
    from .models import create_model
    from .models.dla import check_input
    from .shapes import parse_hw

    h, w = parse_hw(hw)
    shape = (int(batch), 3, h, w)
    check_input(torch.empty(shape, device="meta"), 3)  # DLA's size rule, before timm's model fails obscurely
    rows: List[Dict[str, Union[str, MemoryReport]]] = []
    for name in names:
        with torch.device("meta"):
            ref = timm.create_model(name)
            ours = create_model(name).eval()
        row: Dict[str, Union[str, MemoryReport]] = {"model": name}
        row["timm"] = trace(ref, shape, dtype, title=f"{name} timm eager")
        for be in backends:
            row[be] = trace(FusedDLA(ours, dtype, be), shape, dtype, capability=capability,
                            title=f"{name} dla_fast {be}")
        rows.append(row)
    return rows


def table(rows: Sequence[Dict[str, Union[str, MemoryReport]]], backends: Sequence[str]) -> str:
    """:func:`compare`'s rows as a text table, MiB. Per backend: the activation peak, its ratio to timm eager's,
    "held": what Python lifetimes add to the peak (minus the peak with every tensor freed at its last read);
    then without the maps at the input's resolution (what a fused front keeping them on chip leaves), its ratio
    to timm eager's peak, the same ratio with the weights added to both (as ``bench`` measures), and the layer
    whose output reaches that peak."""
    head = f"{'model':<15}{'timm':>8}"
    for be in backends:
        head += f" | {be:>8}{'/timm':>6}{'held':>6}{'-front':>8}{'/timm':>6}{'+wts':>6}  {'peak without the front at'}"
    lines = [head]
    for r in rows:
        t: MemoryReport = r["timm"]  # type: ignore[assignment]
        line = f"{r['model']:<15}{t.peak() / MIB:8.1f}"
        for be in backends:
            f: MemoryReport = r[be]  # type: ignore[assignment]
            nf = f.peak(f.at_input_resolution)
            at = f.peak_allocation(f.at_input_resolution)
            held = f.peak() - f.peak(ideal=True)
            wts = (f.weight_bytes + nf) / (t.weight_bytes + t.peak())
            line += (f" | {f.peak() / MIB:8.1f}{f.peak() / t.peak():6.2f}{held / MIB:6.0f}{nf / MIB:8.1f}"
                     f"{nf / t.peak():6.2f}{wts:6.2f}  {at.label if at else '-'}")
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .models import list_models
    from .shapes import parse_hw

    ap = argparse.ArgumentParser(prog="python -m dla_fast.memory",
                                 description="Peak activation memory of timm eager and dla_fast, traced on the "
                                             "meta device (no GPU needed; kernel workspaces are not counted).")
    ap.add_argument("models", nargs="*", default=["all"], help="variants, or 'all' (default)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hw", default="224", help="input size: 224 or 512x512")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--backend", nargs="+", default=["auto"], choices=("auto", "cuda", "triton", "eager"))
    ap.add_argument("--detail", action="store_true", help="also list the tensors alive at each peak")
    a = ap.parse_args(argv)
    names = list_models() if a.models == ["all"] else a.models
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(list_models())}")
    if a.batch < 1:
        ap.error(f"--batch must be a positive integer, got {a.batch}")
    try:
        hw = parse_hw(a.hw)
        rows = compare(names, a.batch, hw, getattr(torch, a.dtype), a.backend)
    except ValueError as e:
        ap.error(str(e))
    print(f"peak activation memory (MiB), batch {a.batch}, {hw[0]}x{hw[1]}, {a.dtype}, traced on the meta device "
          "(kernel workspaces not counted)")
    print(table(rows, a.backend))
    if a.detail:
        for r in rows:
            for key in ["timm", *a.backend]:
                rep: MemoryReport = r[key]  # type: ignore[assignment]
                print()
                print(rep.summary())
                print("  without the input-resolution maps: "
                      + rep.summary(rep.at_input_resolution).split("\n", 1)[-1].lstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
