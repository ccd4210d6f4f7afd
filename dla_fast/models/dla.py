"""Deep Layer Aggregation (Yu et al., 2018) and its Res2Net blocks, in plain PyTorch.

The module tree, parameter names and registration order follow timm's ``timm.models.dla`` exactly, so a
state_dict moves between the two strictly in both directions, and the forward computes the same operations
in the same order (so fp32 CPU outputs agree to rounding). This file knows nothing of the fused kernels:
``dla_fast.fuse`` reads this structure and builds the inference module from it.
"""

import contextlib
import math
import operator
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # torch without the symbolic-trace-only query
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    pad = dilation * (k - 1) // 2
    return nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=False)


def _mid_width(outplanes: int, cardinality: int, base_width: int, expansion: int) -> int:
    # ResNeXt-style width: base_width channels per group per 64 output channels, halved by the expansion.
    return int(math.floor(outplanes * (base_width / 64)) * cardinality) // expansion


class DlaBasic(nn.Module):
    """Two 3x3 convs with a residual (DLA-34)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, **_):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride, dilation=dilation)
        self.bn1 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3, 1, dilation=dilation)
        self.bn2 = _bn(planes)
        self.stride = stride

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None,
                children: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += shortcut
        return self.relu(y)


class DlaBottleneck(nn.Module):
    """1x1 -> 3x3 (grouped for the X variants) -> 1x1 bottleneck with a residual."""

    expansion = 2

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, dilation: int = 1,
                 cardinality: int = 1, base_width: int = 64):
        super().__init__()
        self.stride = stride
        mid = _mid_width(outplanes, cardinality, base_width, self.expansion)
        self.conv1 = _conv(inplanes, mid, 1)
        self.bn1 = _bn(mid)
        self.conv2 = _conv(mid, mid, 3, stride, groups=cardinality, dilation=dilation)
        self.bn2 = _bn(mid)
        self.conv3 = _conv(mid, outplanes, 1)
        self.bn3 = _bn(outplanes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None,
                children: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        y += shortcut
        return self.relu(y)


class DlaBottle2neck(nn.Module):
    """Res2Net bottleneck: the middle width is split into ``scale`` groups processed hierarchically."""

    expansion = 2

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, dilation: int = 1,
                 scale: int = 4, cardinality: int = 8, base_width: int = 4):
        super().__init__()
        self.is_first = stride > 1
        self.scale = scale
        mid = _mid_width(outplanes, cardinality, base_width, self.expansion)
        self.width = mid
        self.conv1 = _conv(inplanes, mid * scale, 1)
        self.bn1 = _bn(mid * scale)
        n_convs = max(1, scale - 1)
        self.convs = nn.ModuleList([_conv(mid, mid, 3, stride, groups=cardinality, dilation=dilation)
                                    for _ in range(n_convs)])
        self.bns = nn.ModuleList([_bn(mid) for _ in range(n_convs)])
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = _conv(mid * scale, outplanes, 1)
        self.bn3 = _bn(outplanes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None,
                children: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        y = self.relu(self.bn1(self.conv1(x)))
        pieces = torch.split(y, self.width, 1)
        outs = []
        sp = pieces[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            # Each piece after the first sees the previous piece's output (hierarchical residual), except in
            # the strided first block, where the pieces are independent.
            sp = pieces[i] if (i == 0 or self.is_first) else sp + pieces[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        if self.scale > 1:
            if self.pool is not None:
                outs.append(self.pool(pieces[-1]))
            else:
                outs.append(pieces[-1])
        y = self.bn3(self.conv3(torch.cat(outs, 1)))
        y += shortcut
        return self.relu(y)


class DlaRoot(nn.Module):
    """Aggregation node: 1x1 conv over the concatenated children, BN, optional residual, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, shortcut: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False, padding=(kernel_size - 1) // 2)
        self.bn = _bn(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut

    def forward(self, x_children: List[torch.Tensor]) -> torch.Tensor:
        y = self.bn(self.conv(torch.cat(x_children, 1)))
        if self.shortcut:
            y += x_children[0]
        return self.relu(y)


class DlaTree(nn.Module):
    """Hierarchical deep aggregation tree of ``levels`` levels of ``block``s."""

    def __init__(self, levels: int, block: Type[nn.Module], in_channels: int, out_channels: int,
                 stride: int = 1, dilation: int = 1, cardinality: int = 1, base_width: int = 64,
                 level_root: bool = False, root_dim: int = 0, root_kernel_size: int = 1,
                 root_shortcut: bool = False):
        super().__init__()
        if root_dim == 0:
            root_dim = 2 * out_channels
        if level_root:
            root_dim += in_channels
        # Registration order (downsample, project, tree1, tree2, root) fixes the state_dict key order.
        self.downsample = nn.MaxPool2d(stride, stride=stride) if stride > 1 else nn.Identity()
        if levels == 1 and in_channels != out_channels:
            self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False),
                                         _bn(out_channels))
        else:
            self.project = nn.Identity()
        bargs = dict(dilation=dilation, cardinality=cardinality, base_width=base_width)
        if levels == 1:
            self.tree1 = block(in_channels, out_channels, stride, **bargs)
            self.tree2 = block(out_channels, out_channels, 1, **bargs)
            self.root = DlaRoot(root_dim, out_channels, root_kernel_size, root_shortcut)
        else:
            targs = dict(bargs, root_kernel_size=root_kernel_size, root_shortcut=root_shortcut)
            self.tree1 = DlaTree(levels - 1, block, in_channels, out_channels, stride, root_dim=0, **targs)
            self.tree2 = DlaTree(levels - 1, block, out_channels, out_channels,
                                 root_dim=root_dim + out_channels, **targs)
            self.root = None
        self.level_root = level_root
        self.root_dim = root_dim
        self.levels = levels

    def pools(self) -> bool:
        """Whether this tree reads its downsampled input: as a child of its root (level_root), or as the residual
        (projected where the widths differ) of a block tree1. A tree1 that is a tree makes its own, which is the
        same map where :meth:`pools_like_tree1`; the fused paths compute it once."""
        return self.level_root or not isinstance(self.tree1, DlaTree)

    def pools_like_tree1(self) -> bool:
        """Whether tree1 is a tree that downsamples the same input with the same window as this one."""
        a, b = self.downsample, getattr(self.tree1, "downsample", None)
        if not isinstance(self.tree1, DlaTree):
            return False
        if isinstance(a, nn.Identity) or isinstance(b, nn.Identity):
            return isinstance(a, nn.Identity) and isinstance(b, nn.Identity)
        pair = nn.modules.utils._pair
        return (type(a) is type(b) is nn.MaxPool2d and a.ceil_mode == b.ceil_mode
                and a.return_indices == b.return_indices
                and all(pair(getattr(a, f)) == pair(getattr(b, f))
                        for f in ("kernel_size", "stride", "padding", "dilation")))

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None,
                children: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        if children is None:
            children = []
        bottom = self.downsample(x)
        shortcut = self.project(bottom)
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, shortcut)
        if self.root is not None:
            x2 = self.tree2(x1)
            return self.root([x2, x1] + children)
        children.append(x1)
        return self.tree2(x1, None, children)


POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


class GlobalPool(nn.Module):
    """Global pooling keeping the spatial dims (1x1), so the classifier can be a 1x1 conv as in timm."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.pool_type
        if t == "avg":
            return F.adaptive_avg_pool2d(x, 1)
        if t == "max":
            return F.adaptive_max_pool2d(x, 1)
        if t == "avgmax":
            return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))
        if t == "catavgmax":
            return torch.cat((F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)), 1)
        return x

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def _shape_str(shape: List[int]) -> str:
    return "(" + ", ".join([str(int(s)) for s in shape]) + ")"


def check_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Reject inputs the network cannot run, before any compute, with the rule that applies; returns ``x``.

    Every aggregation node joins a max-pooled (floor) branch with a stride-2 conv (ceil) branch, so the
    stride-2 feature map entering levels 2..5 must have an even size at each of the four halvings: the
    input side must be 32k - 1 or 32k.

    The function is scriptable, and an FX leaf (``torch.fx.wrap`` below): a scripted or FX-traced model still
    checks every input (a ``torch.jit.trace`` checks its example input only). Returning ``x`` puts the check on
    the data path, so dead-code elimination of a traced graph cannot drop it.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"DLA expects a torch.Tensor, got {type(x).__name__}")
    if not torch.jit.is_scripting():
        if torch.jit.is_tracing():
            # torch.jit.trace gives the sizes as tensors: the example input is checked all the same, without the
            # TracerWarnings the comparisons raise (a trace records no Python-level check either way).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return _check_sizes(x, in_chans)
    return _check_sizes(x, in_chans)


def _check_sizes(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    shape = x.shape
    if x.dim() != 4:
        raise ValueError(f"DLA expects a 4-D input (N, C, H, W), got shape {_shape_str(shape)}")
    # Plain ints (torch.jit.trace gives tensors); never the batch size, which an export may keep symbolic.
    c, h, w = int(shape[1]), int(shape[2]), int(shape[3])
    if c != in_chans:
        raise ValueError(f"this model takes {in_chans} input channels (in_chans={in_chans}), "
                         f"got an input with {c}: shape {_shape_str(shape)}")
    bad: List[str] = []
    if not valid_size(h):
        bad.append(f"H={h}")
    if not valid_size(w):
        bad.append(f"W={w}")
    if len(bad) > 0:
        raise ValueError(
            f"DLA cannot run on spatial size ({h}, {w}) ({', '.join(bad)}): each of H and W must be "
            f"32k-1 or 32k for some k >= 1 (e.g. 31, 32, 63, 64, ..., 223, 224), because every level halves "
            f"the map and joins a floor-rounded pooled branch with a ceil-rounded strided conv. "
            f"Resize or crop the input, e.g. to {nearest_valid(h)}x{nearest_valid(w)}.")
    return x


def valid_size(s: int) -> bool:
    return s >= 31 and (s % 32 == 0 or s % 32 == 31)


def nearest_valid(s: int) -> int:
    return max(32, int(round(s / 32)) * 32)


torch.fx.wrap("check_input")

NUM_LEVELS = 6  # level0..level5: the feature levels of feature_info, forward_intermediates and features_only


def feature_take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]] = None
                         ) -> Tuple[List[int], int]:
    """The absolute feature indices that ``indices`` selects out of ``num_features``, and the largest.

    ``None`` selects all, an int ``n`` the last ``n``, a sequence those indices (negative ones count from the
    end), in the order given. The semantics of timm's ``forward_intermediates(indices=...)``.
    """
    if indices is None:
        indices = num_features
    what = "indices must be None, an int (the last n levels) or a list of level indices"
    n: Optional[int] = None
    items: List[int] = []
    if isinstance(indices, (bool, str, bytes)):
        raise TypeError(f"{what}, got {indices!r}")
    try:
        n = operator.index(indices)
    except TypeError:
        try:
            items = list(indices)
        except TypeError:
            raise TypeError(f"{what}, got {indices!r}") from None
    if n is not None:
        if not 0 < n <= num_features:
            raise ValueError(f"indices={n} asks for the last {n} levels; there are {num_features} "
                             f"(use 1..{num_features}, or a list of level indices)")
        take = list(range(num_features - n, num_features))
    else:
        take = []
        for i in items:
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)
            except TypeError:
                raise TypeError(f"level indices must be ints, got {i!r} in {indices!r}") from None
            if not -num_features <= i < num_features:
                raise ValueError(f"level index {i} is out of range: there are {num_features} levels "
                                 f"(0..{num_features - 1}, or -{num_features}..-1 from the end)")
            take.append(i + num_features if i < 0 else i)
        if not take:
            raise ValueError("indices is an empty list: select at least one level")
    return take, max(take)


def _checkpointing(module: nn.Module) -> bool:
    """Whether ``module`` runs its levels under activation checkpointing now: asked for, training with
    autograd on, and not being traced (a trace records the plain graph)."""
    return (getattr(module, "grad_checkpointing", False) and module.training and torch.is_grad_enabled()
            and not torch.jit.is_tracing() and not is_fx_symbolic_tracing())


@contextlib.contextmanager
def _frozen_running_stats(module: nn.Module):
    """BatchNorm still normalises with batch statistics but leaves its running statistics as they are.

    The recomputation in the backward pass re-runs every BatchNorm of a checkpointed level; without this the
    running mean/var and num_batches_tracked would be updated twice per step. Momentum 0 keeps the running
    statistics exactly (the op and what it saves for backward are unchanged, which the checkpoint checks);
    the batch counter is put back.
    """
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    state = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in state:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _run_checkpointed(module: nn.Module, x: torch.Tensor, fn=None) -> torch.Tensor:
    """``module(x)`` (or ``fn(x)``, computing the same with ``module``'s parameters) keeping only ``x`` for the
    backward pass, which recomputes the rest."""
    def contexts():
        return contextlib.nullcontext(), _frozen_running_stats(module)
    return checkpoint(fn if fn is not None else module, x, use_reentrant=False, context_fn=contexts)


FUSED_TRAINING_BACKENDS = ("auto", "triton")


def _fused_training(module: nn.Module) -> Optional[str]:
    """The backend of the fused training path when ``module`` runs it now (training mode, fused training on, not
    being traced: a trace records the plain graph); else None. (``fused_training_save_memory``: its option.)"""
    backend = getattr(module, "fused_training", None)
    if backend is None or not module.training or torch.jit.is_tracing() or is_fx_symbolic_tracing():
        return None
    return backend


def _run_stage(owner: nn.Module, m: nn.Module, x: torch.Tensor, ckpt: bool) -> torch.Tensor:
    """One stage of ``owner`` (stem or level): checkpointed or not, on the fused training path or the modules."""
    backend = _fused_training(owner)
    if backend is None:
        return _run_checkpointed(m, x) if ckpt else m(x)
    from ..train import model as fused

    def run(t: torch.Tensor) -> torch.Tensor:
        return fused.stage(m, t, backend, getattr(owner, "fused_training_save_memory", False))
    return _run_checkpointed(m, x, run) if ckpt else run(x)


def _set_fused_training(model: nn.Module, enable: bool, backend: str, save_memory: bool) -> nn.Module:
    for name, v in (("enable", enable), ("save_memory", save_memory)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    if backend not in FUSED_TRAINING_BACKENDS:
        raise ValueError(f"backend must be one of {FUSED_TRAINING_BACKENDS}, got {backend!r}")
    if enable:
        sync = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        if sync:
            raise TypeError(f"fused training computes per-process batch statistics and does not support "
                            f"SyncBatchNorm ({len(sync)} of them, e.g. {sync[0]!r}): keep nn.BatchNorm2d (timm's "
                            "default: per-process statistics) or leave fused training off")
    model.fused_training = backend if enable else None
    model.fused_training_save_memory = save_memory and enable
    return model


class DLA(nn.Module):
    """DLA classifier with timm's structure and API."""

    def __init__(self, levels: Sequence[int], channels: Sequence[int], output_stride: int = 32,
                 num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", cardinality: int = 1,
                 base_width: int = 64, block: Type[nn.Module] = DlaBottle2neck, shortcut_root: bool = False,
                 drop_rate: float = 0.0):
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"only output_stride=32 is supported, got {output_stride}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        channels = tuple(channels)
        self.channels = channels
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.cardinality = cardinality
        self.base_width = base_width
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.fused_training = None  # the backend of set_fused_training, None: off
        self.fused_training_save_memory = False
        self.base_layer = nn.Sequential(
            nn.Conv2d(in_chans, channels[0], kernel_size=7, stride=1, padding=3, bias=False),
            _bn(channels[0]), nn.ReLU(inplace=True))
        self.level0 = self._conv_level(channels[0], channels[0], levels[0])
        self.level1 = self._conv_level(channels[0], channels[1], levels[1], stride=2)
        targs = dict(cardinality=cardinality, base_width=base_width, root_shortcut=shortcut_root)
        self.level2 = DlaTree(levels[2], block, channels[1], channels[2], 2, level_root=False, **targs)
        self.level3 = DlaTree(levels[3], block, channels[2], channels[3], 2, level_root=True, **targs)
        self.level4 = DlaTree(levels[4], block, channels[3], channels[4], 2, level_root=True, **targs)
        self.level5 = DlaTree(levels[5], block, channels[4], channels[5], 2, level_root=True, **targs)
        self.feature_info = [dict(num_chs=c, reduction=2 ** i, module=f"level{i}") for i, c in enumerate(channels)]
        self.num_features = channels[-1]
        self._build_head(num_classes, global_pool)
        self._init_weights()

    def _build_head(self, num_classes: int, global_pool: str) -> None:
        self.global_pool = GlobalPool(global_pool)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.fc = (nn.Conv2d(self.head_hidden_size, num_classes, 1, bias=True) if num_classes > 0
                   else nn.Identity())
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _conv_level(inplanes: int, planes: int, convs: int, stride: int = 1) -> nn.Sequential:
        mods: List[nn.Module] = []
        for i in range(convs):
            mods += [_conv(inplanes, planes, 3, stride if i == 0 else 1), _bn(planes), nn.ReLU(inplace=True)]
            inplanes = planes
        return nn.Sequential(*mods)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter-name patterns grouping the stem and the levels, for timm's layer-wise LR decay.

        Coarse: one group per level. Fine: each level's trees and its root in order, the conv levels whole.
        """
        if coarse:
            return dict(stem=r"^base_layer", blocks=r"^level(\d+)")
        return dict(stem=r"^base_layer",
                    blocks=[(r"^level(\d+)\.tree(\d+)", None), (r"^level(\d+)\.root", (2,)), (r"^level(\d+)", (1,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each level's activations in the backward pass instead of keeping them (training only).

        The stem and every level run under ``torch.utils.checkpoint`` (non-reentrant) when the model is in
        training mode with autograd on; gradients are unchanged, BatchNorm running statistics are updated once.
        """
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def set_fused_training(self, enable: bool = True, backend: str = "auto", save_memory: bool = False) -> "DLA":
        """Train on the fused kernels: conv + BatchNorm (batch statistics) + ReLU and the concat-free aggregation
        node, forward and backward (see ``docs/training.md``). Returns the model.

        Applies in training mode; ``eval()`` runs the modules with the running statistics as before. Parameters,
        buffers and the state_dict are the model's own; BN running statistics update as ``nn.BatchNorm2d``
        updates them. ``backend="auto"`` runs the kernels on CUDA for float16/bfloat16 convolutions (autocast or
        a half model) and the modules everywhere else (CPU, float32, a BN in eval mode); ``"triton"`` raises
        where the kernels cannot run. Works with ``set_grad_checkpointing`` and ``torch.compile``; SyncBatchNorm
        is refused. ``save_memory=True``: the activations inside each block (the inputs of its second and third
        convs) are not kept for the backward, which recomputes them; less peak memory for a slower step.
        """
        return _set_fused_training(self, enable, backend, save_memory)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        ref = next(self.parameters())
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        self._build_head(num_classes, global_pool)
        self.global_pool.to(ref.device)
        self.fc.to(device=ref.device, dtype=ref.dtype)
        for m in (self.global_pool, self.head_drop, self.fc, self.flatten):
            m.train(self.training)

    @torch.jit.ignore
    def _stages(self) -> List[nn.Module]:
        return [self.base_layer, self.level0, self.level1, self.level2, self.level3, self.level4, self.level5]

    @torch.jit.ignore
    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = _checkpointing(self)
        for m in self._stages():
            x = _run_stage(self, m, x, ckpt)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.in_chans)
        if not torch.jit.is_scripting():  # (TorchScript skips this block: checkpointing, fused training)
            if _checkpointing(self) or _fused_training(self) is not None:
                return self._forward_stages(x)
        # Unrolled (not a loop over getattr) so that TorchScript can compile it.
        x = self.base_layer(x)
        x = self.level0(x)
        x = self.level1(x)
        x = self.level2(x)
        x = self.level3(x)
        x = self.level4(x)
        x = self.level5(x)
        return x

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The outputs of the feature levels ``indices`` (timm's semantics), with the final features.

        The levels are ``level0`` .. ``level5`` (the entries of ``feature_info``): ``indices`` None takes all,
        an int ``n`` the last ``n``, a list those levels (negative from the end); the maps come in level order.
        Returns ``(final_features, maps)``, or only the maps with ``intermediates_only``. ``stop_early`` skips
        the levels past the deepest one taken (the final features are then that level's output). ``norm`` has
        no effect: DLA has no final norm layer.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported: DLA's feature maps are NCHW "
                             f"(output_fmt='NCHW'); permute them yourself for channels-last (NHWC) maps")
        take, last = feature_take_indices(NUM_LEVELS, indices)
        x = check_input(x, self.in_chans)
        ckpt = _checkpointing(self)
        stages = self._stages()
        if not stop_early:
            last = NUM_LEVELS - 1
        maps: List[torch.Tensor] = []
        for i, m in enumerate(stages[:last + 2]):
            x = _run_stage(self, m, x, ckpt)
            if i - 1 in take:
                maps.append(x)
        if intermediates_only:
            return maps
        return x, maps

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what the feature levels ``indices`` do not need; returns the absolute indices taken.

        The levels past the deepest one taken become ``nn.Identity``; then ``num_features`` is that level's
        width and the classifier goes (``reset_classifier(0, '')``), as it does anyway with ``prune_head``.
        ``prune_norm`` has no effect: DLA has no final norm layer.
        """
        take, last = feature_take_indices(NUM_LEVELS, indices)
        for i in range(last + 1, NUM_LEVELS):
            setattr(self, f"level{i}", nn.Identity())
        if last < NUM_LEVELS - 1:
            # The head is sized for level5's width; the features now end at a narrower level.
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or last < NUM_LEVELS - 1:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        if pre_logits:
            return self.flatten(x)
        return self.flatten(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FeatureInfo:
    """timm's ``FeatureInfo`` for a features_only model: the six levels' dicts and the requested ``out_indices``.

    ``len()`` and indexing cover all six levels; the accessors (``channels()``, ``reduction()``,
    ``module_name()``, ``get()``, ``get_dicts()``) give the ``out_indices`` entries, in the order given, or
    the entries of ``idx`` (an int or a list of level indices).
    """

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]):
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: Union[int, Sequence[int]]) -> "FeatureInfo":
        return FeatureInfo(self.info, _requested_out_indices(out_indices))

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Optional[Union[int, Sequence[int]]] = None):
        def pick(d: dict) -> dict:
            return d if keys is None else {k: d[k] for k in keys}
        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("reduction", idx)

    def module_name(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


def _requested_out_indices(out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """``out_indices`` as timm records it: an int ``n`` is the last ``n`` levels (-n .. -1), a sequence as given."""
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        return tuple(range(-out_indices, 0))
    return tuple(out_indices)


def features_cfg(cfg: dict) -> dict:
    """A classifier's pretrained_cfg for its features_only model: without the classifier's entries (as timm)."""
    return {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}


class DlaFeatures(nn.Module):
    """The backbone up to the deepest requested level, returning the requested levels' maps (timm's
    ``features_only`` model).

    Holds the same children as the classifier (``base_layer``, ``level0``, ...) so a classifier state_dict
    minus the head loads into it, as with timm's ``features_only`` models. The levels past the deepest requested
    one are ``nn.Identity`` (no parameters: the state_dict is that of the levels used). ``out_indices`` takes
    timm's forms (an int ``n``: the last ``n`` levels; negative indices from the end); the attribute holds the
    absolute levels in increasing order, which is the order of the returned maps, while
    ``feature_info.out_indices`` keeps the form given, as timm's does.
    """

    def __init__(self, model: DLA, out_indices: Optional[Union[int, Sequence[int]]] = (1, 2, 3, 4, 5)):
        super().__init__()
        if out_indices is None:
            out_indices = (1, 2, 3, 4, 5)
        try:
            requested = _requested_out_indices(out_indices)
            take, last = feature_take_indices(NUM_LEVELS, list(requested))
        except (TypeError, ValueError) as e:
            raise ValueError(f"out_indices must be level indices in 0..5 (negative: from the end) or an int n "
                             f"(the last n levels), got {out_indices!r}: {e}") from None
        if len(set(take)) != len(take):
            raise ValueError(f"out_indices must be distinct levels, got {out_indices!r} (levels {take})")
        self.out_indices = tuple(sorted(take))
        self.in_chans = model.in_chans
        self.channels = tuple(model.channels)  # all six levels, for the fusion pass
        self.grad_checkpointing = False
        self.fused_training = None  # the backend of set_fused_training, None: off
        self.fused_training_save_memory = False
        self.base_layer = model.base_layer
        for i in range(NUM_LEVELS):
            setattr(self, f"level{i}", getattr(model, f"level{i}") if i <= last else nn.Identity())
        # One flag per level, so that the unrolled (scriptable) forward tests a plain list.
        self.take_level = [i in take for i in range(NUM_LEVELS)]
        self.feature_info = FeatureInfo(model.feature_info, requested)
        self.pretrained_cfg = features_cfg(dict(getattr(model, "pretrained_cfg", {})))
        self.default_cfg = self.pretrained_cfg

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """See :meth:`DLA.set_grad_checkpointing`."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def set_fused_training(self, enable: bool = True, backend: str = "auto",
                           save_memory: bool = False) -> "DlaFeatures":
        """See :meth:`DLA.set_fused_training`."""
        return _set_fused_training(self, enable, backend, save_memory)

    @torch.jit.ignore
    def _forward_stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        ckpt = _checkpointing(self)
        out = []
        x = _run_stage(self, self.base_layer, x, ckpt)
        for i in range(max(self.out_indices) + 1):
            x = _run_stage(self, getattr(self, f"level{i}"), x, ckpt)
            if self.take_level[i]:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = check_input(x, self.in_chans)
        if not torch.jit.is_scripting():  # (TorchScript skips this block: checkpointing, fused training)
            if _checkpointing(self) or _fused_training(self) is not None:
                return self._forward_stages(x)
        take = self.take_level
        out: List[torch.Tensor] = []
        x = self.base_layer(x)
        x = self.level0(x)
        if take[0]:
            out.append(x)
        x = self.level1(x)
        if take[1]:
            out.append(x)
        x = self.level2(x)
        if take[2]:
            out.append(x)
        x = self.level3(x)
        if take[3]:
            out.append(x)
        x = self.level4(x)
        if take[4]:
            out.append(x)
        x = self.level5(x)
        if take[5]:
            out.append(x)
        return out


# name -> constructor arguments; the same table as timm's registrations.
_C34 = (16, 32, 64, 128, 256, 512)
_C46 = (16, 32, 64, 64, 128, 256)
_C60 = (16, 32, 128, 256, 512, 1024)
MODEL_ARGS: Dict[str, dict] = {
    "dla34": dict(levels=(1, 1, 1, 2, 2, 1), channels=_C34, block=DlaBasic),
    "dla46_c": dict(levels=(1, 1, 1, 2, 2, 1), channels=_C46, block=DlaBottleneck),
    "dla46x_c": dict(levels=(1, 1, 1, 2, 2, 1), channels=_C46, block=DlaBottleneck, cardinality=32, base_width=4),
    "dla60": dict(levels=(1, 1, 1, 2, 3, 1), channels=_C60, block=DlaBottleneck),
    "dla60x": dict(levels=(1, 1, 1, 2, 3, 1), channels=_C60, block=DlaBottleneck, cardinality=32, base_width=4),
    "dla60x_c": dict(levels=(1, 1, 1, 2, 3, 1), channels=_C46, block=DlaBottleneck, cardinality=32, base_width=4),
    "dla60_res2net": dict(levels=(1, 1, 1, 2, 3, 1), channels=_C60, block=DlaBottle2neck, cardinality=1,
                          base_width=28),
    "dla60_res2next": dict(levels=(1, 1, 1, 2, 3, 1), channels=_C60, block=DlaBottle2neck, cardinality=8,
                           base_width=4),
    "dla102": dict(levels=(1, 1, 1, 3, 4, 1), channels=_C60, block=DlaBottleneck, shortcut_root=True),
    "dla102x": dict(levels=(1, 1, 1, 3, 4, 1), channels=_C60, block=DlaBottleneck, cardinality=32, base_width=4,
                    shortcut_root=True),
    "dla102x2": dict(levels=(1, 1, 1, 3, 4, 1), channels=_C60, block=DlaBottleneck, cardinality=64, base_width=4,
                     shortcut_root=True),
    "dla169": dict(levels=(1, 1, 2, 3, 5, 1), channels=_C60, block=DlaBottleneck, shortcut_root=True),
}


def default_cfg(name: str) -> dict:
    """timm's pretrained_cfg of ``timm/<name>.in1k`` (the same keys and values)."""
    return {
        "url": "", "hf_hub_id": f"timm/{name}.in1k", "architecture": name, "tag": "in1k", "custom_load": False,
        "input_size": (3, 224, 224), "fixed_input_size": False, "interpolation": "bilinear", "crop_pct": 0.875,
        "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 1000,
        "pool_size": (7, 7), "first_conv": "base_layer.0", "classifier": "fc",
        "license": "unknown" if "res2" in name else "bsd-3-clause",
    }
