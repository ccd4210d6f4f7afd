"""Training modules over the fused training ops, sharing the user's parameters and buffers."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from . import ops

__all__ = ["TrainConvBnAct", "TrainAggregate", "conv_bn_act", "aggregate"]


def _conv_unsupported(conv: nn.Conv2d) -> Optional[str]:
    """Why the fused kernels cannot run this conv's configuration at all (None: they can)."""
    if conv.bias is not None:
        return "the conv has a bias (the fused kernels take bias-free convs, as every conv before a BatchNorm is)"
    if tuple(conv.dilation) != (1, 1):
        return f"the conv is dilated ({tuple(conv.dilation)})"
    if isinstance(conv.padding, str):
        return f"the conv's padding is {conv.padding!r} (the kernels take explicit padding)"
    if conv.padding_mode != "zeros":
        return f"the conv pads with mode {conv.padding_mode!r} (the kernels zero-pad)"
    return None



def _check_pair(conv, bn, cls: str, what: str) -> None:
    """A training module's conv and BN: an nn.Conv2d and a (non-synchronised) nn.BatchNorm2d of its width."""
    if isinstance(bn, nn.SyncBatchNorm):
        raise TypeError(f"{cls} does not support SyncBatchNorm: the fused kernels compute per-process batch "
                        "statistics. Keep nn.BatchNorm2d (per-process statistics, timm's default), or train this "
                        f"{what} with the plain SyncBatchNorm modules instead")
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has {bn.num_features} features but the conv has {conv.out_channels} output channels")

def _conv_eager(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor],
                relu: bool) -> torch.Tensor:
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _pair_reason(conv: nn.Conv2d, bn: nn.BatchNorm2d, backend: str) -> Optional[str]:
    """Why a conv/BN pair runs the eager modules whatever its input (None: the input decides)."""
    if backend == "eager":
        return "backend='eager'"
    if not bn.training:
        return "the BatchNorm is in eval mode (it normalises with its running statistics)"
    return _conv_unsupported(conv)


def _bn_state(bn: nn.BatchNorm2d):
    """The BN arguments of the training ops: affine parameters, then the running statistics it tracks."""
    track = bn.track_running_stats
    return (bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None,
            bn.num_batches_tracked if track else None)


def _eager_instead(why: Optional[str], bn: nn.BatchNorm2d, backend: str) -> bool:
    """Whether a call runs the eager modules (``why`` says why not the kernels); backend="triton" raises instead
    where a training-mode BN asked for the kernels."""
    _refuse_sync(bn)
    if why is not None and backend == "triton" and bn.training:
        raise RuntimeError(f"backend='triton' cannot run the fused training kernels: {why}")
    return why is not None


def conv_fallback_reason(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, backend: str) -> Optional[str]:
    """None when :func:`conv_bn_act` runs the fused kernels on ``x``; else why it runs the eager modules."""
    why = _pair_reason(conv, bn, backend)
    if why is not None:
        return why
    n, _, h, w = x.shape
    ho = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
    if n * ho * wo <= 1:
        return "a single value per channel has no batch statistics (the eager BatchNorm raises its own error)"
    return ops.fused_unavailable_reason(x, conv.weight, conv.groups, backend)


def _refuse_sync(bn: nn.Module) -> None:
    if isinstance(bn, nn.SyncBatchNorm):
        raise TypeError("the fused training kernels compute per-process batch statistics and do not support "
                        "SyncBatchNorm: keep nn.BatchNorm2d (timm's default) or turn fused training off")


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Union[torch.Tensor, ops.Deferred],
                residual: Optional[torch.Tensor] = None, relu: bool = True, backend: str = "auto",
                defer: Union[bool, str] = False, share: bool = False, share_residual: bool = False):
    """``act(bn(conv(x)) + residual)`` with the modules' own parameters and buffers: the fused training op where
    it runs (the BN in training mode), else the eager modules (``backend="triton"``: else a RuntimeError).
    ``defer`` and an ``x`` that is an :class:`ops.Deferred` as in :func:`ops.conv_bn_relu_train` (the eager
    modules take the activation formed); ``share`` / ``share_residual``: ``(output, x2)`` / ``(output, r2)`` as
    ``share_input`` / ``share_residual`` there (x itself, the residual itself where the eager modules run)."""
    probe = x.z if isinstance(x, ops.Deferred) else x
    if _eager_instead(conv_fallback_reason(conv, bn, probe, backend), bn, backend):
        y = _conv_eager(conv, bn, x.materialize() if isinstance(x, ops.Deferred) else x, residual, relu)
        return ops.with_shared(y, x, residual, share, share_residual)
    return ops.conv_bn_relu_train(
        x, conv.weight, *_bn_state(bn), stride=tuple(conv.stride), padding=tuple(conv.padding), groups=conv.groups,
        momentum=bn.momentum, eps=bn.eps, residual=residual, relu=relu, backend="triton", defer=defer,
        share_input=share, share_residual=share_residual)


def _agg_eager(conv: nn.Conv2d, bn: nn.BatchNorm2d, children: Sequence[torch.Tensor], shortcut: bool,
               relu: bool) -> torch.Tensor:
    y = bn(conv(torch.cat(list(children), 1)))
    if shortcut:
        y = y + children[0]
    return torch.relu(y) if relu else y


def aggregate_fallback_reason(conv: nn.Conv2d, bn: nn.BatchNorm2d, children: Sequence[torch.Tensor],
                              backend: str) -> Optional[str]:
    """None when :func:`aggregate` runs the fused kernels on ``children``; else why it runs the eager modules."""
    why = _pair_reason(conv, bn, backend)
    if why is not None:
        return why
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0):
        return (f"the conv is not an unpadded stride-1 1x1 one (kernel {tuple(conv.kernel_size)}, stride "
                f"{tuple(conv.stride)}, padding {tuple(conv.padding)})")
    n, _, h, w = children[0].shape
    if n * h * w <= 1:
        return "a single value per channel has no batch statistics (the eager BatchNorm raises its own error)"
    return ops.aggregate_unavailable_reason(children, conv.weight, backend)


def aggregate(conv: nn.Conv2d, bn: nn.BatchNorm2d, children: Sequence[torch.Tensor], shortcut: bool = False,
              relu: bool = True, backend: str = "auto") -> torch.Tensor:
    """The aggregation node ``act(bn(conv1x1(cat(children))) + (children[0] if shortcut))`` with the modules' own
    parameters and buffers, the concat never formed where the fused op runs (as :func:`conv_bn_act` falls back)."""
    if _eager_instead(aggregate_fallback_reason(conv, bn, children, backend), bn, backend):
        return _agg_eager(conv, bn, children, shortcut, relu)
    return ops.aggregate_bn_relu_train(list(children), conv.weight, *_bn_state(bn), momentum=bn.momentum, eps=bn.eps,
                                       shortcut=shortcut, relu=relu, backend="triton")


class TrainConvBnAct(nn.Module):
    """``act(bn(conv(x)) + residual)`` for training, on the fused kernels where they run.

    Wraps an existing ``nn.Conv2d`` and ``nn.BatchNorm2d`` pair without copying them: the module's ``conv`` and
    ``bn`` are the very modules passed in, so an optimizer built over either steps the same tensors, the running
    statistics it updates are the BN's own buffers, and ``state_dict()`` holds the same tensors under
    ``conv.*`` / ``bn.*``.

    * training: :func:`dla_fast.train.ops.conv_bn_relu_train` (batch statistics, running statistics updated as
      nn.BatchNorm2d updates them, momentum=None included);
    * ``backend="auto"``: the fused kernels on CUDA for fp16/bf16 convolutions (autocast or a half model); the
      eager ``conv -> bn -> act`` everywhere else (CPU, fp32, a conv with bias, dilation or non-zero padding
      mode, grouped shapes without a kernel, a batch of a single value per channel), with the same numbers;
    * ``backend="triton"``: the fused kernels or a ``RuntimeError`` saying why not (on the CPU this needs
      ``TRITON_INTERPRET=1``; the tests use it); ``backend="eager"``: always the eager modules;
    * ``eval()``: the plain eager ``act(bn(conv(x)) + residual)`` with the running statistics.

    ``SyncBatchNorm`` is refused: its statistics are reduced across processes, which these kernels do not do.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True, backend: str = "auto"):
        super().__init__()
        _check_pair(conv, bn, "TrainConvBnAct", "layer")
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.conv = conv
        self.bn = bn
        self.relu = relu
        self.backend = backend

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend!r}"

    def fallback_reason(self, x: torch.Tensor) -> Optional[str]:
        """None when a training forward on ``x`` runs the fused kernels; else why it runs eagerly."""
        return conv_fallback_reason(self.conv, self.bn, x, self.backend)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.training:
            return _conv_eager(self.conv, self.bn, x, residual, self.relu)
        if self.backend == "triton":
            why = self.fallback_reason(x)
            if why is not None:
                raise RuntimeError(f"TrainConvBnAct(backend='triton') cannot run the fused kernels: {why}")
        return conv_bn_act(self.conv, self.bn, x, residual, self.relu, self.backend)


class TrainAggregate(nn.Module):
    """DLA's aggregation node for training: ``relu(bn(conv1x1(cat(children, 1))) + (children[0] if shortcut))``,
    the concat never formed, on the fused kernels where they run.

    Wraps the user's ``nn.Conv2d`` (1x1, no bias) and ``nn.BatchNorm2d`` as :class:`TrainConvBnAct` does (the
    very modules: same parameters, buffers and state_dict tensors under ``conv.*`` / ``bn.*``);
    :meth:`from_root` wraps a timm ``DlaRoot`` (its conv, bn and shortcut). Training runs
    :func:`dla_fast.train.ops.aggregate_bn_relu_train`; ``backend`` as in :class:`TrainConvBnAct` (``auto``
    falls back to the eager modules for a conv that is not a bias-free unpadded 1x1 one, more children than
    the kernel reads, CPU, fp32, a single value per channel); ``eval()`` is the eager node with the running
    statistics. ``SyncBatchNorm`` is refused.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, shortcut: bool = False, relu: bool = True,
                 backend: str = "auto"):
        super().__init__()
        _check_pair(conv, bn, "TrainAggregate", "node")
        if conv.groups != 1:
            raise ValueError(f"an aggregation node's conv mixes all children's channels; this one has "
                             f"groups={conv.groups}")
        for name, v in (("shortcut", shortcut), ("relu", relu)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        if shortcut and conv.in_channels < conv.out_channels:
            raise ValueError(f"shortcut adds the first child ({conv.in_channels} channels at most) to the "
                             f"{conv.out_channels}-channel output; the conv takes too few channels for that")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.conv = conv
        self.bn = bn
        self.shortcut = shortcut
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_root(cls, root: nn.Module, backend: str = "auto") -> "TrainAggregate":
        """Wraps a timm ``DlaRoot`` (any module with ``conv``, ``bn`` and ``shortcut``), sharing its modules."""
        for attr in ("conv", "bn", "shortcut"):
            if not hasattr(root, attr):
                raise TypeError(f"from_root expects a DlaRoot-like module with conv, bn and shortcut; "
                                f"{type(root).__name__} has no {attr!r}")
        return cls(root.conv, root.bn, shortcut=bool(root.shortcut), relu=True, backend=backend)

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut}, relu={self.relu}, backend={self.backend!r}"

    def fallback_reason(self, children: Sequence[torch.Tensor]) -> Optional[str]:
        """None when a training forward on ``children`` runs the fused kernels; else why it runs eagerly."""
        return aggregate_fallback_reason(self.conv, self.bn, children, self.backend)

    def forward(self, children: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(children, torch.Tensor) or not isinstance(children, (list, tuple)) or len(children) == 0:
            raise TypeError("TrainAggregate takes a non-empty list or tuple of child tensors")
        if not self.training:
            return _agg_eager(self.conv, self.bn, children, self.shortcut, self.relu)
        if self.backend == "triton":
            why = self.fallback_reason(children)
            if why is not None:
                raise RuntimeError(f"TrainAggregate(backend='triton') cannot run the fused kernels: {why}")
        return aggregate(self.conv, self.bn, children, self.shortcut, self.relu, self.backend)
