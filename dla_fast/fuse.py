"""The inference pass: fold BatchNorm into the convolutions and rebuild a DLA from fused modules.

``optimize(model)`` never touches its input: it reads the (eval-mode) statistics and weights and builds a
new module tree in which every conv-BN(-ReLU)(+residual) group is one :class:`FusedConvBnAct` and every
aggregation node (DlaRoot, and the Bottle2neck's concat -> conv3) is one :class:`FusedAggregate`. Each fused
layer decides once per device which backend runs it (see :meth:`FusedDLA.summary`); the forward then calls
that backend directly, without re-validating arguments the pass itself built.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops import _backends, auto_table
from .ops.reference import aggregate_ref, conv_bn_act_ref
from .models import DLA, DlaFeatures, from_timm
from .models.dla import DlaBasic, DlaBottle2neck, DlaBottleneck, DlaRoot, DlaTree, GlobalPool, check_input

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


# Batches up to this size run without a CUDA graph are paced by the host, not the GPU: a Triton launch costs
# ~130 us of Python against 19 us for the CUDA extension's ops and ~50 us for cuDNN + an in-place ReLU, while
# the kernels themselves take 3-30 us (dla34 at batch 1 on the H200: 4.8 ms per forward with Triton, 1.7 ms
# with the CUDA backend, 0.28 ms replayed from a CUDA graph; benchmarks/NOTES.md, v4). There, backend="auto"
# prefers the CUDA backend, then cuDNN; under a CUDA graph (optimize(..., cuda_graph=True)) or torch.compile
# the launch cost is gone and the GPU-time table decides.
LAUNCH_BOUND_BATCH = 16
_graph_state = threading.local()


@contextlib.contextmanager
def graph_mode():
    """Within this block the fused layers pick the kernels that are fastest when replayed from a CUDA graph
    (CudaGraphRunner uses it around its warm-up and capture, so both run the same kernels)."""
    prev = getattr(_graph_state, "on", False)
    _graph_state.on = True
    try:
        yield
    finally:
        _graph_state.on = prev


def _launch_cost_hidden() -> bool:
    return torch.compiler.is_compiling() or getattr(_graph_state, "on", False)


def _launch_bound(batch: int, replayed: Optional[bool] = None) -> bool:
    """Whether a call at ``batch`` is paced by its launches: a small batch whose launch cost is not hidden
    (``replayed``: by a CUDA graph or torch.compile; None: as the current call)."""
    if batch > LAUNCH_BOUND_BATCH:  # first: the common large-batch call asks nothing else
        return False
    return not (_launch_cost_hidden() if replayed is None else replayed)


def _name(impl) -> str:
    """A resolved backend module's name ("eager" for None)."""
    return "eager" if impl is None else impl.NAME


class _Fused(nn.Module):
    """A fused layer: weights in the inference dtype (channels_last), bias in fp32, a resolved backend."""

    OP = ""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, relu: bool, backend: str, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", _backends.prep_weight(weight.to(dtype)))
        self.register_buffer("bias", bias.float().contiguous())
        self.relu = relu
        self.backend = backend
        self._impl = None       # the backend module, or None for eager (at large batches)
        self._impl_name = "eager"
        # Where the auto table measured this shape at several batch sizes and the winners differ:
        # ((upper batch bound, backend module or None), ...) ascending; else None and _impl serves all.
        self._by_batch = None
        # backend="auto" where the launch-bound choice (see LAUNCH_BOUND_BATCH) differs from the table's
        # small-batch one: (True, backend module or None); else (False, None).
        self._launch_bound = (False, None)
        # The input's (H, W) at the model's default input size, found by FusedDLA's shape probe: part of the
        # key of the measured per-shape backend table (dla_fast/ops/auto_table.py).
        self.in_hw: Optional[Tuple[int, int]] = None
        self._probing = False

    def shape_key(self):
        raise NotImplementedError

    def resolve(self, device: torch.device, dtype: torch.dtype) -> None:
        probe = torch.empty(0, device=device, dtype=dtype)
        key = self.shape_key()
        impl = _backends.select(self.OP, self.backend, probe, False, key=key)
        self._impl = impl
        self._impl_name = _name(impl)
        self._by_batch = None
        self._launch_bound = (False, None)
        if self.backend != "auto":
            return
        sizes = auto_table.batches(key)
        if len(sizes) > 1:
            impls = [_backends.select(self.OP, self.backend, probe, False, key=key, batch=b) for b in sizes]
            if any(i is not impl for i in impls):
                self._by_batch = tuple(zip(auto_table.batch_bounds(sizes), impls))
        lb = _backends.select(self.OP, self.backend, probe, False, key=key, batch=1, launch_bound=True)
        if lb is not self.impl_for(1, replayed=True):
            self._launch_bound = (True, lb)

    def impl_for(self, batch: int, replayed: Optional[bool] = None):
        """The backend module (None: eager) this layer runs at batch size ``batch``; ``replayed``: whether the
        launch cost is hidden (CUDA graph, torch.compile; None: as the current call)."""
        if self._launch_bound[0] and _launch_bound(batch, replayed):
            return self._launch_bound[1]
        if self._by_batch is None:
            return self._impl
        for bound, impl in self._by_batch:
            if batch <= bound:
                return impl
        return self._impl

    def backend_note(self) -> str:
        """The backend name, plus the small-batch choices where they differ, e.g.
        "cuda (batch <= 16: triton; batch <= 16 without a CUDA graph: eager)"."""
        extra = [] if self._by_batch is None else [f"batch <= {int(bound)}: {_name(impl)}"
                                                   for bound, impl in self._by_batch[:-1]]
        if self._launch_bound[0]:
            extra.append(f"batch <= {LAUNCH_BOUND_BATCH} without a CUDA graph: {_name(self._launch_bound[1])}")
        return f"{self._impl_name} ({'; '.join(extra)})" if extra else self._impl_name

    def train(self, mode: bool = True):
        if mode:
            _refuse_training()
        return super().train(False)


class FusedConvBnAct(_Fused):
    OP = "conv_bn_act"

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, backend: str,
                 dtype: torch.dtype):
        if conv.dilation != (1, 1):
            raise ValueError("dilated convolutions are not supported by the fused path")
        if bn is not None:
            w, b = fold_bn(conv, bn)
        else:
            w = conv.weight.detach().float()
            b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        super().__init__(w, b, relu, backend, dtype)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.groups = conv.groups

    def shape_key(self):
        return _backends.conv_key(self.weight.shape, self.stride, self.padding, self.groups, self.weight.dtype,
                                  self.in_hw)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._probing:  # shapes only (meta tensors): record the input size
            self.in_hw = (int(x.shape[2]), int(x.shape[3]))
            return conv_bn_act_ref(x, self.weight.to("meta"), self.bias.to("meta"), self.stride, self.padding,
                                   self.groups, residual, self.relu)
        impl = self.impl_for(x.shape[0])
        if impl is None:
            return conv_bn_act_ref(x, self.weight, self.bias, self.stride, self.padding, self.groups, residual,
                                   self.relu)
        return impl.conv_bn_act(x, self.weight, self.bias, self.stride, self.padding, self.groups,
                                      residual, self.relu)

    def extra_repr(self) -> str:
        co, ci, kh, kw = self.weight.shape
        return (f"{ci * self.groups}->{co}, k={kh}x{kw}, stride={self.stride[0]}, groups={self.groups}, "
                f"relu={self.relu}, backend={self.backend_note()}")


class FusedAggregate(_Fused):
    """concat(children) -> 1x1 conv -> BN -> (+ residual) -> ReLU, with no concat in memory."""

    OP = "aggregate"

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, split: Sequence[int], relu: bool, backend: str,
                 dtype: torch.dtype):
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
            raise ValueError("an aggregation node must be a plain 1x1 convolution")
        w, b = fold_bn(conv, bn)
        super().__init__(w.reshape(w.shape[0], w.shape[1]), b, relu, backend, dtype)
        self.split = tuple(split)

    def shape_key(self):
        return _backends.aggregate_key(self.split, self.weight.shape[0], self.weight.dtype, self.in_hw)

    def forward(self, children: List[torch.Tensor], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._probing:
            self.in_hw = (int(children[0].shape[2]), int(children[0].shape[3]))
            return aggregate_ref(children, self.weight.to("meta"), self.bias.to("meta"), residual, self.relu)
        impl = self.impl_for(children[0].shape[0])
        if impl is None:
            return aggregate_ref(children, self.weight, self.bias, residual, self.relu)
        return impl.aggregate(children, self.weight, self.bias, residual, self.relu)

    def extra_repr(self) -> str:
        return (f"{'+'.join(map(str, self.split))}->{self.weight.shape[0]}, relu={self.relu}, "
                f"backend={self.backend_note()}")


class FusedBasic(nn.Module):
    def __init__(self, blk: DlaBasic, **kw):
        super().__init__()
        self.conv1 = FusedConvBnAct(blk.conv1, blk.bn1, True, **kw)
        self.conv2 = FusedConvBnAct(blk.conv2, blk.bn2, True, **kw)

    def forward(self, x, shortcut: Optional[torch.Tensor] = None):
        return self.conv2(self.conv1(x), x if shortcut is None else shortcut)


class FusedBottleneck(nn.Module):
    def __init__(self, blk: DlaBottleneck, **kw):
        super().__init__()
        self.conv1 = FusedConvBnAct(blk.conv1, blk.bn1, True, **kw)
        self.conv2 = FusedConvBnAct(blk.conv2, blk.bn2, True, **kw)
        self.conv3 = FusedConvBnAct(blk.conv3, blk.bn3, True, **kw)

    def forward(self, x, shortcut: Optional[torch.Tensor] = None):
        return self.conv3(self.conv2(self.conv1(x)), x if shortcut is None else shortcut)


class FusedBottle2neck(nn.Module):
    def __init__(self, blk: DlaBottle2neck, **kw):
        super().__init__()
        self.width, self.scale, self.is_first = blk.width, blk.scale, blk.is_first
        self.conv1 = FusedConvBnAct(blk.conv1, blk.bn1, True, **kw)
        self.convs = nn.ModuleList(FusedConvBnAct(c, b, True, **kw) for c, b in zip(blk.convs, blk.bns))
        self.pool = blk.pool
        n_out = len(blk.convs) + (1 if blk.scale > 1 else 0)
        self.conv3 = FusedAggregate(blk.conv3, blk.bn3, [blk.width] * n_out, True, **kw)

    def forward(self, x, shortcut: Optional[torch.Tensor] = None):
        pieces = torch.split(self.conv1(x), self.width, 1)
        outs = []
        sp = pieces[0]
        for i, conv in enumerate(self.convs):
            sp = pieces[i] if (i == 0 or self.is_first) else sp + pieces[i]
            sp = conv(sp)
            outs.append(sp)
        if self.scale > 1:
            outs.append(self.pool(pieces[-1]) if self.pool is not None else pieces[-1])
        return self.conv3(outs, x if shortcut is None else shortcut)


class FusedMaxPool(nn.Module):
    """A tree's k x k / stride k max pooling, on the Triton kernel for CUDA inputs when the layers' backend
    is "auto" or "triton" (PyTorch's NHWC max-pool kernel took 15 us per call at batch 1 on the H200: a fifth
    of dla34's kernel time), else torch's; under "auto" torch's too at launch-bound batches without a graph."""

    def __init__(self, k: int, backend: str):
        super().__init__()
        self.k = int(k)
        self.backend = backend
        self._ok: Dict[Tuple[torch.device, torch.dtype], bool] = {}  # may the kernel run on this device/dtype

    @staticmethod
    def wrap(pool: nn.Module, backend: str) -> nn.Module:
        """``pool`` itself unless it is a plain k x k, stride-k, unpadded max pool."""
        if not isinstance(pool, nn.MaxPool2d):
            return pool
        k, st, pad, dil = (nn.modules.utils._pair(v) for v in (pool.kernel_size, pool.stride, pool.padding,
                                                                  pool.dilation))
        if k[0] != k[1] or st != k or pad != (0, 0) or dil != (1, 1) or pool.ceil_mode or pool.return_indices:
            return pool
        return FusedMaxPool(k[0], backend)

    def wants_triton(self, device_type: str, batch: int) -> bool:
        """Whether this call should take the Triton kernel (if it can run): not under ``auto`` at a launch-bound
        batch without a CUDA graph, where a Triton launch's host cost (~46 us) is several times torch's."""
        if device_type != "cuda" or self.backend not in ("auto", "triton"):
            return False
        return self.backend == "triton" or not _launch_bound(batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wants_triton(x.device.type, x.shape[0]):
            ok = self._ok.get((x.device, x.dtype))
            if ok is None:
                ok = self._ok[(x.device, x.dtype)] = _backends.reason_unavailable("triton", x) is None
            if ok:
                return _backends.get("triton").max_pool2d(x, self.k)
        return F.max_pool2d(x, self.k, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}, stride={self.k}"


class FusedTree(nn.Module):
    def __init__(self, tree: DlaTree, **kw):
        super().__init__()
        self.downsample = FusedMaxPool.wrap(tree.downsample, kw["backend"])
        self.project = (FusedConvBnAct(tree.project[0], tree.project[1], False, **kw)
                        if isinstance(tree.project, nn.Sequential) else None)
        self.tree1 = _fuse_block(tree.tree1, **kw)
        self.tree2 = _fuse_block(tree.tree2, **kw)
        self.root = None
        if tree.root is not None:
            r: DlaRoot = tree.root
            if r.conv.kernel_size != (1, 1):
                raise ValueError("only 1x1 aggregation roots are supported")
            # The real child split is filled in by _assign_root_splits once the whole tree exists.
            self.root = FusedAggregate(r.conv, r.bn, [r.conv.in_channels], True, **kw)
            self.root_shortcut = r.shortcut
        self.level_root = tree.level_root

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        children = [] if children is None else children
        bottom = self.downsample(x)
        sc = bottom if self.project is None else self.project(bottom)
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, sc)
        if self.root is not None:
            x2 = self.tree2(x1)
            kids = [x2, x1] + children
            return self.root(kids, kids[0] if self.root_shortcut else None)
        children.append(x1)
        return self.tree2(x1, None, children)


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


def _fuse_block(m: nn.Module, **kw) -> nn.Module:
    if isinstance(m, DlaTree):
        return FusedTree(m, **kw)
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


class FusedDLA(nn.Module):
    """Inference-only DLA built by :func:`optimize`; see there."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, backend: str):
        super().__init__()
        kw = dict(backend=backend, dtype=dtype)
        self.dtype, self.backend = dtype, backend
        self.in_chans = model.in_chans
        self.features_only = isinstance(model, DlaFeatures)
        self.out_indices = model.out_indices if self.features_only else (5,)
        self.last_level = max(self.out_indices)
        self.base_layer = _fuse_seq(model.base_layer, **kw)
        for i in range(self.last_level + 1):
            lvl = getattr(model, f"level{i}")
            setattr(self, f"level{i}", _fuse_seq(lvl, **kw) if isinstance(lvl, nn.Sequential)
                    else _fuse_block(lvl, **kw))
        chans = model.channels
        for i in range(2, self.last_level + 1):
            _assign_root_splits(getattr(self, f"level{i}"), chans[i - 1], chans[i], [])
        self.feature_info = model.feature_info
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}))
        if not self.features_only:
            self.num_classes = model.num_classes
            self.num_features = model.num_features
            self.global_pool = GlobalPool(model.global_pool.pool_type)
            self.head_drop = nn.Identity()
            self.fc = _copy_head(model.fc, dtype)
            self.flatten = nn.Flatten(1) if model.global_pool.pool_type else nn.Identity()
        self._resolved: Optional[Tuple[torch.device, torch.dtype]] = None
        super().train(False)
        self._probe_shapes(tuple(self.pretrained_cfg.get("input_size", (self.in_chans, 224, 224)))[-2:])

    def _probe_shapes(self, hw: Tuple[int, int]) -> None:
        """Record every fused layer's input size for an input of spatial size ``hw`` (a forward on the meta
        device: no memory, no compute). The per-shape backend table is keyed by these sizes."""
        layers = [m for _, m in self.fused_layers()]
        for m in layers:
            m._probing = True
        try:
            with torch.no_grad():
                self._levels(torch.empty(1, self.in_chans, int(hw[0]), int(hw[1]), device="meta", dtype=self.dtype))
        finally:
            for m in layers:
                m._probing = False
        self._resolved = None

    def fused_layers(self) -> List[Tuple[str, "_Fused"]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, _Fused)]

    def _ensure_resolved(self, device: torch.device) -> None:
        if self._resolved != (device, self.dtype):
            for _, m in self.fused_layers():
                m.resolve(device, self.dtype)
            self._resolved = (device, self.dtype)

    def train(self, mode: bool = True):
        if mode:
            _refuse_training()
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        # A dtype cast would also cast the fp32 biases and break the dtype the layers were built for: refuse it
        # before anything changes. Device moves are fine; they invalidate the per-device backend choice.
        if fn(torch.zeros(1, device=self.weight_device())).dtype != torch.float32:
            raise RuntimeError(f"don't cast an optimized model (.half()/.to(dtype)): it was built for {self.dtype}; "
                               f"call dla_fast.optimize(model, dtype=...) again instead")
        self._resolved = None
        return super()._apply(fn, *args, **kwargs)

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
        self._ensure_resolved(dev)
        # The model computes in self.dtype; inputs are cast to it (like autocast for the whole network).
        return x.to(dtype=self.dtype, memory_format=torch.channels_last)

    def weight_device(self) -> torch.device:
        return self.base_layer[0].weight.device

    def _levels(self, x: torch.Tensor):
        x = self.base_layer(x)
        feats = []
        for i in range(self.last_level + 1):
            x = getattr(self, f"level{i}")(x)
            if i in self.out_indices:
                feats.append(x)
        return x, feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_only:
            raise RuntimeError("forward_features is for classifiers; a features_only model's forward returns the maps")
        x = self._prep_input(x)
        with torch.no_grad():
            return self._levels(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        with torch.no_grad():
            x = self.global_pool(x)
            if pre_logits:
                return self.flatten(x)
            return self.flatten(self.fc(x))

    def forward(self, x: torch.Tensor):
        x = self._prep_input(x)
        with torch.no_grad():
            x, feats = self._levels(x)
            if self.features_only:
                return feats
            return self.forward_head(x)

    def summary(self) -> str:
        """One line per fused layer: its name, op, shape and the backend that runs it on the model's device."""
        self._ensure_resolved(self.weight_device())
        counts = collections.Counter(m._impl_name for _, m in self.fused_layers())
        lines = [f"FusedDLA({self.pretrained_cfg.get('architecture', '?')}, dtype={self.dtype}, "
                 f"device={self.weight_device()}, backend={self.backend!r}): "
                 + ", ".join(f"{n} {k} layers" for k, n in sorted(counts.items()))]
        for name, m in self.fused_layers():
            lines.append(f"  {name:<40} {m.OP:<12} {m.extra_repr()}")
        return "\n".join(lines)

    def backends(self, batch: Optional[int] = None) -> Dict[str, str]:
        """Layer name -> backend ("triton", "cuda" or "eager") on the model's device, at batch size ``batch``
        (None: large batches; with backend="auto" small batches may differ, see the auto table)."""
        self._ensure_resolved(self.weight_device())
        if batch is None:
            return {n: m._impl_name for n, m in self.fused_layers()}
        return {n: _name(m.impl_for(int(batch))) for n, m in self.fused_layers()}


def _copy_head(fc: nn.Module, dtype: torch.dtype) -> nn.Module:
    if isinstance(fc, nn.Identity):
        return nn.Identity()
    new = nn.Conv2d(fc.in_channels, fc.out_channels, 1, bias=fc.bias is not None)
    new.load_state_dict(fc.state_dict())
    new.requires_grad_(False)
    return new.to(device=fc.weight.device, dtype=dtype)


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

    def train(self, mode: bool = True):
        if mode:
            _refuse_training()
        return super().train(False)

    def summary(self) -> str:
        return self.module.summary() + f"\n  (replayed from CUDA graphs; {len(self._graphs)} captured)"

    def backends(self, batch: Optional[int] = None) -> Dict[str, str]:
        with graph_mode():
            return self.module.backends(batch)

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
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA inputs, got a tensor on {x.device}")
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


def optimize(model: nn.Module, dtype: torch.dtype = torch.float16, backend: str = "auto", *,
             device: Optional[torch.device] = None, cuda_graph: bool = False, max_graphs: int = 8) -> nn.Module:
    """An inference-only copy of a DLA (ours or timm's) running on fused kernels.

    BN is folded into the convolutions using its running statistics (the result computes what the model
    computes in eval mode, whatever mode ``model`` is in), conv-BN-ReLU(+residual) groups and aggregation nodes become fused
    ops, activations are channels_last and computed in ``dtype`` (inputs are cast to it). ``backend`` is
    "auto" (per layer, the fastest available kernel; eager where none can run), "triton", "cuda" or "eager".
    The model stays on its device unless ``device`` is given. ``cuda_graph=True`` replays a CUDA graph per
    input shape (at most ``max_graphs`` kept): the low-latency path for small batches. ``model`` itself is
    not modified.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if isinstance(model, (FusedDLA, CudaGraphRunner)):
        raise TypeError("this model is already optimized; pass the original model to optimize()")
    if not isinstance(model, (DLA, DlaFeatures)):
        if type(model).__name__ == "DLA" and hasattr(model, "level5"):
            model = from_timm(model)
        else:
            raise TypeError(f"optimize() expects a dla_fast or timm DLA model, got {type(model).__name__}")
    fused = FusedDLA(model, dtype, backend)
    if device is not None:
        fused = fused.to(device)
    dev = fused.weight_device()
    if backend in ("triton", "cuda"):
        why = _backends.reason_unavailable(backend, torch.empty(0, device=dev, dtype=dtype))
        if why is not None:
            raise RuntimeError(f"optimize(backend={backend!r}) cannot run on {dev}: {why}")
    if cuda_graph:
        if dev.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {dev}; pass device='cuda'")
        return CudaGraphRunner(fused, max_graphs=max_graphs)
    return fused
