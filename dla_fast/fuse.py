"""The inference pass: fold BatchNorm into the convolutions and rebuild a DLA from fused modules.

``optimize(model)`` never touches its input: it reads the (eval-mode) statistics and weights and builds a
new module tree in which every conv-BN(-ReLU)(+residual) group is one :class:`FusedConvBnAct`, every
aggregation node (DlaRoot, and the Bottle2neck's concat -> conv3) one :class:`FusedAggregate` and every tree's
max-pool one :class:`FusedMaxPool`. Each of them asks the per-layer plan (:mod:`dla_fast.plan`) once per input
shape which backend, kernel and tile run it, and then calls that backend directly, without re-validating
arguments the pass itself built. :meth:`FusedDLA.summary` prints the plans and where each came from.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from contextvars import ContextVar
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends as _backends
from .models import DLA, DlaFeatures, from_timm
from .models.dla import DlaBasic, DlaBottle2neck, DlaBottleneck, DlaRoot, DlaTree, GlobalPool, check_input
from .ops import front_policy
from .ops.reference import aggregate_ref, conv_bn_act_ref
from .plan.planner import (LAUNCH_BOUND_BATCH, PLANNER, Plan, aggregate_key, call_key, conv_key, max_pool_key,
                           small_call)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto",) + _backends.NAMES


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the single conv equal to ``bn(conv(x))`` with BN in eval mode.

    Computed in float64 and returned in float32 (cast them to the inference dtype afterwards, so the fold
    itself adds no rounding of its own).
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"fold_bn expects (nn.Conv2d, nn.BatchNorm2d), got ({type(conv).__name__}, "
                        f"{type(bn).__name__})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} channels but the conv has {conv.out_channels} outputs")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs BatchNorm running statistics (track_running_stats=True)")
    w = conv.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    weight = w * scale.reshape(-1, 1, 1, 1)
    bias = beta + (b0 - mean) * scale
    return weight.float(), bias.float()


def _refuse_training() -> None:
    raise RuntimeError("dla_fast.optimize() builds an inference-only module (BatchNorm is folded away); "
                       "train the original model and call optimize() on it again")


# The threads inside graph_mode(), by id. Every fused call at a small batch asks whether its thread is one of
# them: an empty-set test costs nanoseconds where a threading.local attribute lookup costs most of a microsecond.
_GRAPH_THREADS: Dict[int, int] = {}


@contextlib.contextmanager
def graph_mode():
    """Within this block the fused layers pick the kernels that are fastest when replayed from a CUDA graph
    (CudaGraphRunner uses it around its warm-up and capture, so both run the same kernels)."""
    me = threading.get_ident()
    _GRAPH_THREADS[me] = _GRAPH_THREADS.get(me, 0) + 1
    try:
        yield
    finally:
        left = _GRAPH_THREADS[me] - 1
        if left:
            _GRAPH_THREADS[me] = left
        else:
            del _GRAPH_THREADS[me]


def _in_graph_mode() -> bool:
    return bool(_GRAPH_THREADS) and threading.get_ident() in _GRAPH_THREADS


def _launch_cost_hidden() -> bool:
    return torch.compiler.is_compiling() or _in_graph_mode()


# The regime of the FusedDLA forward running on this thread, (launch-bound, small, measured) for all of its layers
# from the model's input size (:func:`dla_fast.plan.planner.small_call`) and the tuner's verdict on the call (see
# :func:`_regime`); None outside one, where a layer judges by its own batch. Detection inputs at small batches
# (8 x 512x512) are not small: their kernels outlast their launches.
_REGIME: ContextVar[Optional[Tuple[bool, bool, Optional[str]]]] = ContextVar("dla_fast_regime", default=None)


def _launch_bound(batch: int, hw: Optional[Sequence[int]] = None, replayed: Optional[bool] = None) -> bool:
    """Whether a call at ``batch`` is paced by its launches: a small call whose launch cost is not hidden
    (``replayed``: by a CUDA graph or torch.compile; None: as the current call). ``hw``: the model's input size
    (:func:`dla_fast.plan.planner.small_call`); None: the batch alone (:data:`LAUNCH_BOUND_BATCH`)."""
    if batch > LAUNCH_BOUND_BATCH or (hw is not None and not small_call(batch, hw)):
        return False  # first: the common large-batch call asks nothing else
    return not (_launch_cost_hidden() if replayed is None else replayed)


def _regime(batch: int, hw: Sequence[int], replayed: Optional[bool] = None,
            measured: Optional[str] = None) -> Tuple[bool, bool, Optional[str]]:
    """(launch-bound, small, measured) of a model call at ``batch`` x ``hw``: what :data:`_REGIME` holds during it.
    ``measured``: the call's regime as the tuner measured it on this GPU and host (one of
    :data:`dla_fast.plan.planner.REGIMES`; None: never measured, the pixel rule decides). A call whose launches a
    CUDA graph or torch.compile hides is not launch-bound either way, and keeps its measured plans."""
    small = small_call(int(batch), (int(hw[0]), int(hw[1])))
    if _launch_cost_hidden() if replayed is None else replayed:
        return False, small, None
    if measured is None:
        return small, small, None
    return measured != "measured", small, measured


class _NoCast:
    """Refuses dtype casts (``.half()``, ``.float()``, ``.to(dtype)``) of an optimized module before anything is
    changed: the layers were built for one dtype (weights in it, biases in fp32). Device moves are fine."""

    _dtype: torch.dtype

    def _apply(self, fn, *args, **kwargs):
        probe = torch.zeros(1, dtype=self._dtype)
        if fn(probe).dtype != self._dtype:
            raise RuntimeError(f"don't cast an optimized model (.half()/.float()/.to(dtype)): it was built for "
                               f"{self._dtype}; call dla_fast.optimize(model, dtype=...) again instead")
        self._forget()
        return super()._apply(fn, *args, **kwargs)

    def _forget(self) -> None:
        pass

    def train(self, mode: bool = True):
        if mode:
            _refuse_training()
        return super().train(False)


# Fused layers by id, for the plan lookup that torch.compile evaluates while tracing (see _traced_plan).
_LAYERS: "weakref.WeakValueDictionary[int, _Planned]" = weakref.WeakValueDictionary()


def _traced_plan(token: int, n: int, h: int, w: int, res: bool, lb: bool) -> Tuple[str, Tuple[int, ...]]:
    return _LAYERS[token]._plan_entry(n, h, w, res, lb)[:2]


# Marked here, at import: dynamo refuses to trace a call of assume_constant_result itself.
_traced_plan_const = torch.compiler.assume_constant_result(_traced_plan)


def _constant_plan(*args) -> Tuple[str, Tuple[int, ...]]:
    """The plan looked up while torch.compile traces: evaluated once then and baked into the graph as a constant,
    so the planner's Python (file reads on first use included) never has to be traced."""
    return _traced_plan_const(*args)


class _Planned(_NoCast, nn.Module):
    """A fused layer: asks the plan once per input shape which backend and config run it.

    Every eager call passes here, and at small batches the host's time per layer is the forward's time: the
    forwards read their buffers from ``_buffers`` and the blocks their layers from ``_modules``, where
    ``nn.Module.__getattr__`` would cost ~0.5 us a name."""

    OP = ""

    def __init__(self, backend: str, dtype: torch.dtype):
        super().__init__()
        self.backend = backend          # the requested backend: "auto" or a backend name
        self._dtype = dtype
        # (batch, H, W, has residual, launch-bound, small call) -> (backend name, config, Plan, backend module)
        self._memo: Dict[tuple, tuple] = {}
        _LAYERS[id(self)] = self

    def _forget(self) -> None:
        self._memo.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_memo"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        _LAYERS[id(self)] = self

    def key(self, n: int, hw: Sequence[int], residual: bool):
        raise NotImplementedError

    def device(self) -> torch.device:
        raise NotImplementedError

    def _plan_entry(self, n: int, h: int, w: int, res: bool, lb: bool, small: Optional[bool] = None,
                    measured: Optional[str] = None) -> Tuple[str, Tuple[int, ...], Plan]:
        mk = (n, h, w, res, lb, small, measured)
        hit = self._memo.get(mk)
        if hit is None:
            plan = self.plan_for(n, (h, w), res, lb, small, measured)
            hit = self._memo[mk] = (plan.backend, plan.config, plan, _backends.get(plan.backend))
        return hit

    def plan_for(self, n: int, hw: Sequence[int], residual: bool, launch_bound: bool = False,
                 small: Optional[bool] = None, measured: Optional[str] = None) -> Plan:
        """The plan of a call at batch ``n`` and input size ``hw``, for the backend this layer was built with
        (``launch_bound``, ``small``, ``measured``: the model call's regime, see :meth:`Planner.plan`)."""
        dev = self.device()
        if self.backend == "auto":
            if dev.type != "cuda":
                return Plan("eager", (), "rule", f"no kernels off the GPU ({dev.type})")
            return PLANNER.plan(self.key(n, hw, residual), dev, launch_bound, small, measured)
        if self.backend == "eager":
            return Plan("eager", (), "requested")
        # A forced backend keeps a tuned config of its own (the winner's, or the paced candidate's where Triton
        # won), else its own rule.
        if dev.type == "cuda":
            p = PLANNER.plan(self.key(n, hw, residual), dev, False)
            if p.source in ("tuned", "cached"):
                own = p if p.backend == self.backend else p.paced
                if own is not None and own.backend == self.backend:
                    return Plan(own.backend, own.config, "requested", f"{p.source} config", own.ms)
        return Plan(self.backend, (), "requested")

    def _impl(self, x: torch.Tensor, res: bool):
        # Every eager call of every layer passes here: at small batches the host's time per layer is the forward's
        # time, so the common case is one dict lookup (the launch regime inlined from _launch_bound).
        n, _, h, w = x.shape
        if torch.compiler.is_compiling():
            # torch.compile / torch.export: no launch cost to pay (lb False), and a dynamic size must not be
            # branched on (an export would specialise it): such a call takes the throughput regime's plan.
            n, h, w = (v if isinstance(v, int) else d for v, d in ((n, 256), (h, 224), (w, 224)))
            name, cfg = _constant_plan(id(self), n, h, w, res, False)
            return _backends.get(name), cfg
        regime = _REGIME.get()
        if regime is None:
            mk = (n, h, w, res, n <= LAUNCH_BOUND_BATCH and not _in_graph_mode(), None, None)
        else:
            mk = (n, h, w, res) + regime
        hit = self._memo.get(mk)
        if hit is None:
            hit = self._plan_entry(*mk)
        return hit[3], hit[1]

    def plans(self) -> Dict[tuple, Plan]:
        """The plans resolved so far: (batch, H, W, has residual, launch-bound, small call, measured call regime)
        -> Plan."""
        return {k: v[2] for k, v in self._memo.items()}


class FusedConvBnAct(_Planned):
    OP = "conv_bn_act"

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, backend: str,
                 dtype: torch.dtype):
        if conv.dilation != (1, 1):
            raise ValueError("dilated convolutions are not supported by the fused path")
        super().__init__(backend, dtype)
        if bn is not None:
            w, b = fold_bn(conv, bn)
        else:
            w = conv.weight.detach().float()
            b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("weight", w.to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", b.float().contiguous())
        self.relu = relu
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.groups = conv.groups

    def device(self) -> torch.device:
        return self.weight.device

    def key(self, n: int, hw: Sequence[int], residual: bool):
        return conv_key(self.weight.shape, self.stride, self.padding, self.groups, residual, self._dtype, n, hw)

    # the tuner's view of a call (dla_fast.plan.tuner.collect_calls)
    def layer_key(self, x, residual=None):
        return self.key(int(x.shape[0]), (int(x.shape[2]), int(x.shape[3])), residual is not None)

    def call_inputs(self, x, residual=None):
        return [x]

    def call_residual(self, x, residual=None):
        return residual

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.is_meta:  # shapes and layouts only (plan collection, summaries), as the kernels give
            return conv_bn_act_ref(x, self.weight.to("meta"), self.bias.to("meta"), self.stride, self.padding,
                                   self.groups, residual, self.relu).contiguous(memory_format=torch.channels_last)
        impl, cfg = self._impl(x, residual is not None)
        bufs = self._buffers  # see _Planned
        return impl.conv_bn_act(x, bufs["weight"], bufs["bias"], self.stride, self.padding, self.groups, residual,
                                self.relu, cfg)

    def extra_repr(self) -> str:
        co, ci, kh, kw = self.weight.shape
        return (f"{ci * self.groups}->{co}, k={kh}x{kw}, stride={self.stride[0]}, groups={self.groups}, "
                f"relu={self.relu}, backend={self.backend!r}")


_RESIDUAL_KIND = {None: 0, "child0": 1, "tensor": 2}


class FusedAggregate(_Planned):
    """concat(children) -> 1x1 conv -> BN -> (+ residual) -> ReLU, with no concat in memory."""

    OP = "aggregate"

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, split: Sequence[int], relu: bool, backend: str,
                 dtype: torch.dtype, residual: Optional[str] = None):
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
            raise ValueError("an aggregation node must be a plain 1x1 convolution")
        super().__init__(backend, dtype)
        w, b = fold_bn(conv, bn)
        self.register_buffer("weight", w.reshape(w.shape[0], w.shape[1]).to(dtype).contiguous())
        self.register_buffer("bias", b.float().contiguous())
        self.relu = relu
        self.split = tuple(split)
        self.residual = residual  # None, "child0" (a root's shortcut) or "tensor" (the Bottle2neck's)

    def device(self) -> torch.device:
        return self.weight.device

    def key(self, n: int, hw: Sequence[int], residual: bool):
        kind = _RESIDUAL_KIND[self.residual] if residual else 0
        return aggregate_key(self.split, self.weight.shape[0], kind, self._dtype, n, hw)

    def layer_key(self, children, residual=None):
        c = children[0]
        return self.key(int(c.shape[0]), (int(c.shape[2]), int(c.shape[3])), residual is not None)

    def call_inputs(self, children, residual=None):
        return list(children)

    def call_residual(self, children, residual=None):
        return residual

    def forward(self, children: List[torch.Tensor], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        c0 = children[0]
        if c0.is_meta:
            return aggregate_ref(children, self.weight.to("meta"), self.bias.to("meta"), residual,
                                 self.relu).contiguous(memory_format=torch.channels_last)
        impl, cfg = self._impl(c0, residual is not None)
        bufs = self._buffers  # see _Planned
        return impl.aggregate(children, bufs["weight"], bufs["bias"], residual, self.relu, cfg)

    def extra_repr(self) -> str:
        return f"{'+'.join(map(str, self.split))}->{self.weight.shape[0]}, relu={self.relu}, backend={self.backend!r}"


class FusedMaxPool(_Planned):
    """A tree's k x k / stride k max pooling, on the backend the plan picks."""

    OP = "max_pool"

    def __init__(self, k: int, backend: str, dtype: torch.dtype, device: torch.device):
        super().__init__(backend, dtype)
        self.k = int(k)
        # No tensors of its own: the device it plans for follows the model's (FusedDLA._apply keeps it).
        self._device = torch.device(device)
        self._channels = 0  # the input's, seen at the first call (part of the plan key)

    @staticmethod
    def wrap(pool: nn.Module, backend: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """A FusedMaxPool for a plain k x k, stride-k, unpadded max pool; anything else is copied as it is."""
        if not isinstance(pool, nn.MaxPool2d):
            return nn.Identity() if isinstance(pool, nn.Identity) else pool
        k, st, pad, dil = (nn.modules.utils._pair(v) for v in (pool.kernel_size, pool.stride, pool.padding,
                                                                  pool.dilation))
        if k[0] != k[1] or st != k or pad != (0, 0) or dil != (1, 1) or pool.ceil_mode or pool.return_indices:
            return nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, ceil_mode=pool.ceil_mode)
        return FusedMaxPool(k[0], backend, dtype, device)

    def device(self) -> torch.device:
        return self._device

    def key(self, n: int, hw: Sequence[int], residual: bool):
        return max_pool_key(self._channels, self.k, self._dtype, n, hw)

    def layer_key(self, x):
        self._channels = int(x.shape[1])
        return self.key(int(x.shape[0]), (int(x.shape[2]), int(x.shape[3])), False)

    def call_inputs(self, x):
        return [x]

    def call_residual(self, x):
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            return F.max_pool2d(x, self.k, self.k).contiguous(memory_format=torch.channels_last)
        self._channels = int(x.shape[1])
        impl, _ = self._impl(x, False)
        return impl.max_pool(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}, stride={self.k}, backend={self.backend!r}"


def _take(x: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
    """A block's or tree's input, taken out of the one-element list its caller may hand it over in.

    CPython keeps a call's arguments referenced until the call returns, so a tensor passed as it is outlives
    whatever the callee does with it. A caller that passes ``[x]`` and drops its own name for ``x`` leaves the
    callee the only reference, and the input's memory goes back to the allocator right after its last reader.
    """
    return x.pop() if isinstance(x, list) else x


def _residual(shortcut, project: Optional[nn.Module]) -> torch.Tensor:
    """A block's residual: ``shortcut`` (a tensor or one handed over), projected by ``project`` if given."""
    shortcut = _take(shortcut)
    return shortcut if project is None else project(shortcut)


# The blocks: ``x`` is the input or ``[x]`` handed over (see _take); ``shortcut`` the residual of the last conv
# (default: x), also possibly handed over; ``project`` (a tree's projection of its downsampled input) maps the
# shortcut to the residual. The projection runs just before the last conv rather than before the block, so that
# its output is not alive during the block's first convs (the largest maps), and the input is freed right after
# conv1, its last reader when a shortcut is given.

class FusedBasic(nn.Module):
    def __init__(self, blk: DlaBasic, **kw):
        super().__init__()
        self.conv1 = FusedConvBnAct(blk.conv1, blk.bn1, True, **kw)
        self.conv2 = FusedConvBnAct(blk.conv2, blk.bn2, True, **kw)

    def forward(self, x, shortcut=None, project: Optional[nn.Module] = None):
        mods = self._modules  # see _Planned
        x = _take(x)
        sc = x if shortcut is None else shortcut
        y = mods["conv1"](x)
        del x
        return mods["conv2"](y, _residual(sc, project))


class FusedBottleneck(nn.Module):
    def __init__(self, blk: DlaBottleneck, **kw):
        super().__init__()
        self.conv1 = FusedConvBnAct(blk.conv1, blk.bn1, True, **kw)
        self.conv2 = FusedConvBnAct(blk.conv2, blk.bn2, True, **kw)
        self.conv3 = FusedConvBnAct(blk.conv3, blk.bn3, True, **kw)

    def forward(self, x, shortcut=None, project: Optional[nn.Module] = None):
        mods = self._modules  # see _Planned
        x = _take(x)
        sc = x if shortcut is None else shortcut
        y = mods["conv1"](x)
        del x
        y = mods["conv2"](y)
        return mods["conv3"](y, _residual(sc, project))


class FusedBottle2neck(nn.Module):
    def __init__(self, blk: DlaBottle2neck, **kw):
        super().__init__()
        self.width, self.scale, self.is_first = blk.width, blk.scale, blk.is_first
        self.conv1 = FusedConvBnAct(blk.conv1, blk.bn1, True, **kw)
        self.convs = nn.ModuleList(FusedConvBnAct(c, b, True, **kw) for c, b in zip(blk.convs, blk.bns))
        p = blk.pool
        self.pool = (nn.AvgPool2d(p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad)
                     if p is not None else None)
        n_out = len(blk.convs) + (1 if blk.scale > 1 else 0)
        self.conv3 = FusedAggregate(blk.conv3, blk.bn3, [blk.width] * n_out, True, residual="tensor", **kw)

    def forward(self, x, shortcut=None, project: Optional[nn.Module] = None):
        mods = self._modules  # see _Planned
        x = _take(x)
        sc = x if shortcut is None else shortcut
        pieces = torch.split(mods["conv1"](x), self.width, 1)
        del x
        outs = []
        sp = pieces[0]
        for i, conv in enumerate(mods["convs"]):
            sp = pieces[i] if (i == 0 or self.is_first) else sp + pieces[i]
            sp = conv(sp)
            outs.append(sp)
        if self.scale > 1:
            pool = mods.get("pool")  # None, an attribute, without one
            outs.append(pool(pieces[-1]) if pool is not None else pieces[-1])
        # conv1's output is read by nothing more, unless its last slice is itself a child of the aggregate
        del pieces, sp
        return mods["conv3"](outs, _residual(sc, project))


class FusedTree(nn.Module):
    def __init__(self, tree: DlaTree, device: torch.device, pooled_above: bool = False, **kw):
        super().__init__()
        # The downsampled input is a child of the root (level_root) and, projected, the residual of a block
        # tree1; a tree that is neither has no use for it. A tree1 that is a tree pools the same input with the
        # same window, so a tree that pools hands its map down (``bottom``) instead, and one that gets it from
        # above (``pooled_above``) pools nothing itself.
        wants = tree.pools()
        self.downsample = (FusedMaxPool.wrap(tree.downsample, kw["backend"], kw["dtype"], device)
                           if wants and not pooled_above else None)
        self.project = (FusedConvBnAct(tree.project[0], tree.project[1], False, **kw)
                        if isinstance(tree.project, nn.Sequential) else None)
        pooled = wants or pooled_above
        self.pass_down = pooled and tree.pools_like_tree1()
        self.tree1 = (FusedTree(tree.tree1, device, pooled_above=True, **kw) if self.pass_down
                      else _fuse_block(tree.tree1, device, **kw))
        self.tree2 = _fuse_block(tree.tree2, device, **kw)
        self.root = None
        self.root_shortcut = False
        if tree.root is not None:
            r: DlaRoot = tree.root
            if r.conv.kernel_size != (1, 1):
                raise ValueError("only 1x1 aggregation roots are supported")
            # The real child split is filled in by _assign_root_splits once the whole tree exists.
            self.root = FusedAggregate(r.conv, r.bn, [r.conv.in_channels], True,
                                       residual="child0" if r.shortcut else None, **kw)
            self.root_shortcut = r.shortcut
        self.level_root = tree.level_root

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None,
                bottom: Optional[List[torch.Tensor]] = None):
        """``x``: the input, or ``[x]`` handed over (see :func:`_take`); ``shortcut`` is not read (a tree makes its
        own; the parameter keeps the blocks' signature); ``children``: the outer trees' children for the root;
        ``bottom``: the input pooled by an outer tree, handed over (see __init__)."""
        mods = self._modules  # see _Planned
        x = _take(x)
        children = [] if children is None else children
        sc = None
        pooled = None
        tree1 = mods["tree1"]
        if bottom is not None:
            pooled = _take(bottom)
        elif mods.get("downsample") is not None:  # see __init__ (None, an attribute, when it has no pool)
            pooled = mods["downsample"](x)
        if pooled is not None:
            if self.level_root:
                children.append(pooled)
            if self.pass_down or not isinstance(tree1, FusedTree):
                # handed over, as the input is: a block projects it just before its last conv, a tree1 that pools
                # nothing itself takes it as its own
                sc = [pooled]
            del pooled
        box = [x]
        del x  # tree1 holds the input alone now, and frees it after its last reader
        if isinstance(tree1, FusedTree):
            x1 = tree1(box) if sc is None else tree1(box, None, None, sc)
        else:
            x1 = tree1(box) if sc is None else tree1(box, sc, mods.get("project"))
        root = mods.get("root")
        if root is not None:
            x2 = mods["tree2"](x1)
            kids = [x2, x1] + children
            return root(kids, kids[0] if self.root_shortcut else None)
        children.append(x1)
        return mods["tree2"](x1, None, children)


def _assign_root_splits(t: "FusedTree", cin: int, cout: int, children: List[int]) -> None:
    """Record each root's per-child channel counts, following the same data flow as ``forward``."""
    children = list(children)
    if t.level_root:
        children.append(cin)
    if t.root is not None:
        split = (cout, cout, *children)
        if sum(split) != t.root.weight.shape[1]:
            raise AssertionError(f"root split {split} does not match its weight {tuple(t.root.weight.shape)}")
        t.root.split = split
        return
    _assign_root_splits(t.tree1, cin, cout, [])
    _assign_root_splits(t.tree2, cout, cout, children + [cout])


def _fuse_block(m: nn.Module, device: torch.device, **kw) -> nn.Module:
    if isinstance(m, nn.Identity):  # a level removed by prune_intermediate_layers
        return nn.Identity()
    if isinstance(m, DlaTree):
        return FusedTree(m, device, **kw)
    if isinstance(m, DlaBasic):
        return FusedBasic(m, **kw)
    if isinstance(m, DlaBottleneck):
        return FusedBottleneck(m, **kw)
    if isinstance(m, DlaBottle2neck):
        return FusedBottle2neck(m, **kw)
    raise TypeError(f"don't know how to fuse {type(m).__name__}")


def _fuse_seq(seq: nn.Sequential, **kw) -> nn.Sequential:
    """conv, bn, relu, conv, bn, relu, ... -> fused convs."""
    mods = list(seq)
    if len(mods) % 3 or not all(isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d)
                                and isinstance(mods[i + 2], nn.ReLU) for i in range(0, len(mods), 3)):
        raise TypeError("expected a Sequential of (Conv2d, BatchNorm2d, ReLU) triples")
    return nn.Sequential(*[FusedConvBnAct(mods[i], mods[i + 1], True, **kw) for i in range(0, len(mods), 3)])


class _Head(_NoCast, nn.Conv2d):
    """The classifier (a 1x1 conv, as timm's DLA has it), in the inference dtype, guarded against casts."""

    def __init__(self, fc: nn.Conv2d, dtype: torch.dtype):
        super().__init__(fc.in_channels, fc.out_channels, 1, bias=fc.bias is not None,
                         device=fc.weight.device, dtype=dtype)
        self._dtype = dtype
        with torch.no_grad():
            self.weight.copy_(fc.weight)
            if fc.bias is not None:
                self.bias.copy_(fc.bias)
        self.requires_grad_(False)


class FusedFront(nn.Module):
    """The stem, level 0 and level 1 of a DLA as one Triton kernel that writes only level 1's output
    (:func:`dla_fast.ops.front`): neither full-resolution map reaches memory.

    It holds no tensors: the weights are those of the three fused layers, which :class:`FusedDLA` keeps (their
    state_dict keys, plans and summaries stay as they were) and runs instead wherever the front does not run:
    backends without a front, calls that ask for level 0's map, shapes or devices the kernel does not take, and
    what :func:`dla_fast.ops.front_policy` leaves to the separate layers (``DLA_FAST_FRONT``).
    """

    LAYERS = ("base_layer.0", "level0.0", "level1.0")

    def __init__(self, channels: Tuple[int, int, int], backend: str, dtype: torch.dtype):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)   # input, stem, level 1
        self.backend = backend
        self._dtype = dtype
        self.when, self.why = "never", "not placed on a device yet"

    @staticmethod
    def build(base_layer: nn.Module, level0: nn.Module, level1: nn.Module, backend: str,
              dtype: torch.dtype) -> Optional["FusedFront"]:
        """A FusedFront for three fused levels that are exactly a DLA front (a 7x7 stride-1 stem, a 3x3 level 0,
        a 3x3 stride-2 level 1, one conv + ReLU each), else None."""
        geometry = ((7, 1, 3), (3, 1, 1), (3, 2, 1))
        convs = []
        for seq, (k, st, pad) in zip((base_layer, level0, level1), geometry):
            if not isinstance(seq, nn.Sequential) or len(seq) != 1 or not isinstance(seq[0], FusedConvBnAct):
                return None
            c = seq[0]
            if (tuple(c.weight.shape[2:]) != (k, k) or c.stride != (st, st) or c.padding != (pad, pad)
                    or c.groups != 1 or not c.relu):
                return None
            convs.append(c)
        (c0, cin), (c0b, c0c), (c1, c0d) = (tuple(c.weight.shape[:2]) for c in convs)
        if not c0 == c0b == c0c == c0d:
            return None
        return FusedFront((cin, c0, c1), backend, dtype)

    def refresh(self, device: torch.device) -> None:
        """Decide, for weights on ``device``, when the front runs (see :func:`dla_fast.ops.front_policy`)."""
        self.when, self.why = front_policy(self.backend, device, self._dtype, *self.channels)

    def runs(self, x: torch.Tensor) -> bool:
        """Whether this call takes the front (the caller has checked that level 0's map is not wanted)."""
        if self.when == "never" or x.is_meta:  # meta: plan collection sees the three layers
            return False
        if self.when == "always" or torch.compiler.is_compiling():
            return True
        regime = _REGIME.get()
        return not (regime[0] if regime is not None else _launch_bound(x.shape[0], x.shape[2:]))

    def runs_at(self, launch_bound: bool) -> bool:
        """Whether a call of this launch regime (:func:`_regime`) takes the front, as :meth:`runs` decides."""
        return self.when == "always" or (self.when == "unpaced" and not launch_bound)

    def forward(self, x: torch.Tensor, stem: FusedConvBnAct, level0: FusedConvBnAct,
                level1: FusedConvBnAct) -> torch.Tensor:
        return _backends.get("triton").front(x, stem.weight, stem.bias, level0.weight, level0.bias, level1.weight,
                                             level1.bias)

    def extra_repr(self) -> str:
        cin, c0, c1 = self.channels
        return f"{cin}->{c0}->{c0}->{c1}, backend={self.backend!r}, runs={self.when!r} ({self.why})"


def _feature_take_indices(num: int, indices) -> Tuple[List[int], int]:
    from .models import dla as _dla
    return _dla.feature_take_indices(num, indices)


class FusedDLA(_NoCast, nn.Module):
    """Inference-only DLA built by :func:`optimize`; see there."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, backend: str, tune: Union[bool, float] = False):
        super().__init__()
        device = next(model.parameters()).device
        kw = dict(backend=backend, dtype=dtype)
        self.dtype, self._dtype, self.backend = dtype, dtype, backend
        self.in_chans = model.in_chans
        self.features_only = isinstance(model, DlaFeatures)
        self.out_indices = tuple(model.out_indices) if self.features_only else (5,)
        self.last_level = max(self.out_indices)
        self.base_layer = _fuse_seq(model.base_layer, **kw)
        for i in range(self.last_level + 1):
            lvl = getattr(model, f"level{i}")
            setattr(self, f"level{i}", _fuse_seq(lvl, **kw) if isinstance(lvl, nn.Sequential)
                    else _fuse_block(lvl, device, **kw))
        # The stem and levels 0-1 as one Triton kernel where the front can run; the three layers above stay the
        # fallback (and all there is on the eager and CUDA backends).
        self.front = (FusedFront.build(self.base_layer, self.level0, self.level1, backend, dtype)
                      if self.last_level >= 1 and backend in ("auto", "triton") else None)
        if self.front is not None:
            self.front.refresh(device)
        chans = model.channels
        for i in range(2, self.last_level + 1):
            if isinstance(getattr(self, f"level{i}"), FusedTree):
                _assign_root_splits(getattr(self, f"level{i}"), chans[i - 1], chans[i], [])
        self.channels = tuple(chans)
        self.feature_info = model.feature_info
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.default_cfg = self.pretrained_cfg
        self.num_features = getattr(model, "num_features", chans[-1])
        if not self.features_only:
            self.num_classes = model.num_classes
            self.global_pool = GlobalPool(model.global_pool.pool_type)
            self.head_drop = nn.Identity()
            self.fc = _Head(model.fc, dtype) if isinstance(model.fc, nn.Conv2d) else nn.Identity()
            self.flatten = nn.Flatten(1) if model.global_pool.pool_type else nn.Identity()
        self.tune = tune
        self._tuned_shapes: set = set()
        self._regime_memo: Dict[Tuple[int, int, int], Optional[str]] = {}
        super().train(False)

    # ------------------------------------------------------------------------------------------ plumbing
    def fused_layers(self) -> List[Tuple[str, _Planned]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, _Planned)]

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        dev = self.weight_device()
        for _, m in self.fused_layers():
            if isinstance(m, FusedMaxPool):
                m._device = dev
        if self.front is not None:
            self.front.refresh(dev)
        self._tuned_shapes = set()
        self._regime_memo = {}
        return out

    def forget_plans(self) -> None:
        """Drop every layer's resolved plans (they are resolved again, e.g. after tuning)."""
        for _, m in self.fused_layers():
            m._forget()
        self._regime_memo = {}

    def call_key(self, n: int, hw: Sequence[int]) -> str:
        """The plan cache's key of this model's call at ``n`` x ``hw`` (:func:`dla_fast.plan.planner.call_key`):
        the architecture and, for a ``features_only`` model, the levels it returns."""
        tag = self.pretrained_cfg.get("architecture") or type(self).__name__
        if self.features_only:
            tag += "-f" + "".join(str(i) for i in self.out_indices)
        return call_key(tag, self.dtype, n, hw)

    def _call_regime(self, n: int, h: int, w: int) -> Optional[str]:
        """The measured regime of a call at n x h x w under ``backend="auto"`` (one of
        :data:`dla_fast.plan.planner.REGIMES`; None: not measured). Looked up once per size: every eager call
        passes here."""
        memo = self._regime_memo
        key = (n, h, w)
        if key not in memo:  # a stored None (not measured) is a hit
            dev = self.weight_device()
            hit = None
            if self.backend == "auto" and dev.type != "meta":  # meta: a traced copy (dla_fast.memory)
                hit = PLANNER.regime(self.call_key(n, (h, w)), dev, self.dtype)
            memo[key] = hit
        return memo[key]

    def weight_device(self) -> torch.device:
        return self.base_layer[0].weight.device

    def _prep_input(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("the optimized model is inference-only and does not support autograd; run it under "
                               "torch.no_grad()/torch.inference_mode(), or use the original model for gradients")
        dev = self.weight_device()
        if x.device != dev:
            raise ValueError(f"input is on {x.device} but the optimized model is on {dev}; move one of them")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        if self.tune and dev.type == "cuda" and not torch.compiler.is_compiling():
            shape = (int(x.shape[0]), int(x.shape[2]), int(x.shape[3]))
            if shape not in self._tuned_shapes:
                self._tune_shape(shape)
        # The model computes in self.dtype; inputs are cast to it (like autocast for the whole network).
        return x.to(dtype=self.dtype, memory_format=torch.channels_last)

    def _tune_shape(self, shape: Tuple[int, int, int]) -> None:
        from .plan.tuner import tune
        budget = None if self.tune is True else float(self.tune)
        self._tuned_shapes.add(shape)  # first: the tuner runs this model at the shape (check_call)
        try:
            tune(self, shape[1:], [shape[0]], budget_s=budget)
        except BaseException:
            self._tuned_shapes.discard(shape)
            raise

    def _levels(self, x: torch.Tensor, take: Optional[Sequence[int]] = None, stop: Optional[int] = None):
        """(last level's output, the outputs of the levels in ``take``); ``stop``: the last level to run. ``x``: the
        input, or ``[x]`` handed over, freed once the stem has read it. Outside tracing, every layer takes the
        launch regime of this call's input size (``_REGIME``)."""
        if torch.compiler.is_compiling():
            return self._run_levels(x, take, stop)
        n, _, h, w = (x[0] if isinstance(x, list) else x).shape
        token = _REGIME.set(_regime(n, (h, w), measured=self._call_regime(n, h, w)))
        try:
            return self._run_levels(x, take, stop)
        finally:
            _REGIME.reset(token)

    def _run_levels(self, x, take: Optional[Sequence[int]], stop: Optional[int]):
        take = self.out_indices if take is None else take
        last = self.last_level if stop is None else stop
        feats = []
        first = 0
        if self.front is not None and last >= 1 and 0 not in take and \
                self.front.runs(x[0] if isinstance(x, list) else x):
            x = self.front(_take(x), self.base_layer[0], self.level0[0], self.level1[0])
            first = 2
            if 1 in take:
                feats.append(x)
        else:
            x = self.base_layer(_take(x))
        mods = self._modules  # see _Planned
        for i in range(first, last + 1):
            level = mods[f"level{i}"]
            if isinstance(level, FusedTree):
                box = [x]
                del x  # the tree frees its input after its last reader (a kept feature map stays in feats)
                x = level(box)
            else:
                x = level(x)
            if i in take:
                feats.append(x)
        return x, feats

    # ------------------------------------------------------------------------------------------ the API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_only:
            raise RuntimeError("forward_features is for classifiers; a features_only model's forward returns the maps")
        x = [self._prep_input(x)]  # handed over: a cast copy of the input is freed once the stem has read it
        with torch.no_grad():
            return self._levels(x, take=())[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier head")
        with torch.no_grad():
            x = self.global_pool(_take(x))  # a map handed over as [x] is freed once the pool has read it
            if pre_logits:
                return self.flatten(x)
            return self.flatten(self.fc(x))

    def forward(self, x: torch.Tensor):
        x = [self._prep_input(x)]  # handed over: a cast copy of the input is freed once the stem has read it
        with torch.no_grad():
            if self.features_only:
                return self._levels(x)[1]
            x = [self._levels(x, take=())[0]]  # handed over: the last map is freed once the global pool has read it
            return self.forward_head(x)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The level outputs ``indices`` picks (timm's semantics: None = all six, an int n = the last n, a list =
        those), computed by the fused kernels; returns ``(final features, intermediates)`` or, with
        ``intermediates_only``, the list. DLA has no final norm, so ``norm`` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (DLA's feature maps are NCHW), got {output_fmt!r}")
        take, max_index = _feature_take_indices(len(self.channels), indices)
        if max_index > self.last_level:
            raise ValueError(f"level {max_index} was not kept by this model (its deepest level is {self.last_level})")
        x = [self._prep_input(x)]  # handed over: a cast copy of the input is freed once the stem has read it
        with torch.no_grad():
            stop = max_index if (stop_early or intermediates_only) else self.last_level
            final, feats = self._levels(x, take=take, stop=stop)
        if intermediates_only:
            return feats
        return final, feats

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Drop the levels past the deepest one ``indices`` keeps (and the head); returns the kept indices."""
        take, max_index = _feature_take_indices(len(self.channels), indices)
        for i in range(max_index + 1, self.last_level + 1):
            delattr(self, f"level{i}")
        self.last_level = max_index
        self.out_indices = tuple(i for i in self.out_indices if i <= max_index) or (max_index,)
        if prune_head and not self.features_only:
            self.global_pool = GlobalPool("")
            self.fc = nn.Identity()
            self.flatten = nn.Identity()
            self.num_classes = 0
        return take

    def train(self, mode: bool = True):
        if mode:
            _refuse_training()
        return super().train(False)

    # ------------------------------------------------------------------------------------------ plans
    def plans(self, batch: int = 256, hw: Optional[Sequence[int]] = None,
              replayed: bool = True) -> List[Tuple[str, str, Plan]]:
        """(layer name, layer description, plan) of every fused call at ``batch`` x ``hw`` (default: the model's
        input size), as this model would run them (``replayed``: under a CUDA graph or torch.compile, where a
        small batch is not paced by its launches)."""
        from .plan.tuner import collect_calls

        hw = tuple(hw) if hw is not None else self._default_hw()
        measured = None if replayed else self._call_regime(int(batch), int(hw[0]), int(hw[1]))
        paced, small, measured = _regime(batch, hw, replayed, measured)
        front = None
        if (self.front is not None and self.last_level >= 1 and 0 not in self.out_indices
                and self.front.runs_at(paced)):
            front = Plan("triton", (), "front", self.front.why)
        out = []
        for call in collect_calls(self, int(batch), hw):
            plan = call.layer.plan_for(call.key.n, call.key.hw, bool(call.residual is not None), paced, small,
                                       measured)
            for name in call.names:
                out.append((name, call.key.label(), front if front and name in FusedFront.LAYERS else plan))
        order = {n: i for i, (n, _) in enumerate(self.named_modules())}
        return sorted(out, key=lambda t: order.get(t[0], 0))

    def _default_hw(self) -> Tuple[int, int]:
        size = tuple(self.pretrained_cfg.get("input_size", (self.in_chans, 224, 224)))
        return int(size[-2]), int(size[-1])

    def backends(self, batch: Optional[int] = None, hw: Optional[Sequence[int]] = None,
                 replayed: Optional[bool] = None) -> Dict[str, str]:
        """Layer name -> backend ("triton", "cuda" or "eager") at ``batch`` (None: 256) and ``hw``."""
        rep = _launch_cost_hidden() if replayed is None else replayed
        return {n: p.backend for n, _, p in self.plans(256 if batch is None else batch, hw, rep)}

    def summary(self, batch: Optional[Union[int, Sequence[int]]] = None, hw: Optional[Sequence[int]] = None) -> str:
        """One line per fused call: layer, shape, backend, kernel config and where the choice came from
        (tuned / cached / prior / rule / requested), at the given batch sizes (default 256 and 1) and input size."""
        dev = self.weight_device()
        batches = [256, 1] if batch is None else ([batch] if isinstance(batch, int) else list(batch))
        arch = self.pretrained_cfg.get("architecture", "?")
        lines = [f"FusedDLA({arch}, dtype={self.dtype}, device={dev}, backend={self.backend!r})"]
        if dev.type == "cuda" and self.backend == "auto":
            lines += [f"  note: {s}" for s in PLANNER.note(dev, self.dtype)]
        for b in batches:
            rows = self.plans(b, hw, replayed=True)
            counts = collections.Counter(f"{p.backend}/{p.source}" for _, _, p in rows)
            size = hw or self._default_hw()
            tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            lines.append(f"  batch {b}, {size[0]}x{size[1]}: {tally}")
            for name, label, plan in rows:
                lines.append(f"    {name:<40} {label:<44} {plan.describe(_op_of(label))}")
            measured = self._call_regime(b, int(size[0]), int(size[1])) if dev.type == "cuda" else None
            if measured is not None:
                what = {"measured": "keeps its measured plans", "paced": "launches no Triton kernel (each layer's "
                        "fastest measured candidate without one)", "cuda": "runs every layer on the CUDA "
                        "extension's default kernels"}[measured]
                lines.append(f"    (without a CUDA graph this call {what}: the tuner timed the whole call in each "
                             "regime)")
            elif dev.type == "cuda" and _launch_bound(b, size, replayed=False):
                lines.append(f"    (without a CUDA graph, calls of at most {LAUNCH_BOUND_BATCH} x 224x224 input pixels "
                             "take the launch-bound rule: CUDA extension, then cuDNN)")
        return "\n".join(lines)


def _op_of(label: str) -> str:
    return {"conv": "conv_bn_act", "agg": "aggregate", "maxpool": "max_pool"}[label.split()[0]]


class CudaGraphRunner(nn.Module):
    """Replays a CUDA graph of the wrapped module's forward, one graph per input shape/dtype (LRU-bounded).

    The output is a fresh tensor each call (copied out of the graph's static buffer), so callers may keep it.
    """

    def __init__(self, module: FusedDLA, max_graphs: int = 8, warmup: int = 2):
        super().__init__()
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.module = module
        self.max_graphs, self.warmup = max_graphs, warmup
        self._graphs: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graphs"] = collections.OrderedDict()  # graphs belong to this process's device memory
        return state

    def train(self, mode: bool = True):
        if mode:
            _refuse_training()
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self._graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def summary(self, batch=None, hw=None) -> str:
        return self.module.summary(batch, hw) + f"\n  (replayed from CUDA graphs; {len(self._graphs)} captured)"

    def backends(self, batch: Optional[int] = None, hw=None, replayed: Optional[bool] = None) -> Dict[str, str]:
        return self.module.backends(batch, hw, True)

    def plans(self, batch: int = 1, hw=None, replayed: bool = True):
        return self.module.plans(batch, hw, True)

    def forward_intermediates(self, *args, **kwargs):
        return self.module.forward_intermediates(*args, **kwargs)

    def _capture(self, x: torch.Tensor):
        # A normal (non-inference) tensor, so that copy_ into it works both inside and outside inference_mode.
        with torch.inference_mode(False):
            static_x = torch.empty_like(x)
        static_x.copy_(x)
        s = torch.cuda.Stream(device=x.device)
        s.wait_stream(torch.cuda.current_stream(x.device))
        with graph_mode():
            with torch.cuda.stream(s):
                for _ in range(self.warmup):  # compiles kernels / selects configs outside the capture
                    self.module(static_x)
            torch.cuda.current_stream(x.device).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = self.module(static_x)
        return graph, static_x, static_y

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
            where = x.device if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"cuda_graph=True needs CUDA inputs, got {where}")
        check_input(x, self.module.in_chans)
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_x, static_y = entry
        static_x.copy_(x)
        graph.replay()
        if isinstance(static_y, list):
            return [y.clone() for y in static_y]
        return static_y.clone()


def _resolve_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"optimize(device={str(device)!r}): no CUDA GPU is visible to this process "
                               "(torch.cuda.is_available() is False); leave device unset to stay on the CPU "
                               "(the eager path), or run on a machine with a GPU")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        if idx >= torch.cuda.device_count():
            raise RuntimeError(f"optimize(device={str(device)!r}): this process sees {torch.cuda.device_count()} "
                               f"GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        dev = torch.device("cuda", idx)
    return dev


def optimize(model: nn.Module, dtype: torch.dtype = torch.float16, backend: str = "auto", *,
             device: Optional[Union[str, torch.device]] = None, cuda_graph: bool = False, max_graphs: int = 8,
             tune: Union[bool, float] = False) -> nn.Module:
    """An inference-only copy of a DLA (ours or timm's) running on fused kernels.

    BN is folded into the convolutions using its running statistics (the result computes what the model
    computes in eval mode, whatever mode ``model`` is in), conv-BN-ReLU(+residual) groups and aggregation nodes
    become fused ops, activations are channels_last and computed in ``dtype`` (inputs are cast to it).
    ``backend`` is "auto" (per layer, the plan: tuned on this GPU, the shipped prior or the rules; eager where no
    kernel can run), "triton", "cuda" or "eager". The model stays on its device unless ``device`` is given.
    ``cuda_graph=True`` replays a CUDA graph per input shape (at most ``max_graphs`` kept): the low-latency path
    for small batches. ``tune=True`` (or a time budget in seconds) times every layer's candidates on the GPU at
    the first call of each new input shape and caches the winners (see :func:`dla_fast.tune`). ``model`` itself
    is not modified.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(model, (FusedDLA, CudaGraphRunner)):
        raise TypeError("this model is already optimized; pass the original model to optimize()")
    if not isinstance(tune, (bool, int, float)) or (not isinstance(tune, bool) and tune <= 0):
        raise ValueError(f"tune must be True, False or a positive time budget in seconds, got {tune!r}")
    if not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
    dev = _resolve_device(device)
    if not isinstance(model, (DLA, DlaFeatures)):
        if type(model).__name__ == "DLA" and hasattr(model, "level5"):
            model = from_timm(model)
        else:
            raise TypeError(f"optimize() expects a dla_fast or timm DLA model, got {type(model).__name__}")
    fused = FusedDLA(model, dtype, backend, tune=tune)
    if dev is not None:
        fused = fused.to(dev)
    dev = fused.weight_device()
    if backend in ("triton", "cuda"):
        why = _backends.reason_unavailable(backend, torch.empty(0, device=dev, dtype=dtype))
        if why is not None:
            raise RuntimeError(f"optimize(backend={backend!r}) cannot run on {dev}: {why}")
    if dev.type == "cuda" and backend != "eager":
        PLANNER.available(dev, dtype)  # loads the prior and the plan cache now, not inside a traced forward
    if cuda_graph:
        if dev.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {dev}; pass device='cuda'")
        return CudaGraphRunner(fused, max_graphs=max_graphs)
    return fused
