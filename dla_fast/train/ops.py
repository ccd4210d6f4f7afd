"""The functional training op: conv -> BatchNorm (batch statistics) -> (+ residual) -> ReLU, validated once.

    conv_bn_relu_train(x, w, gamma, beta, running_mean, running_var, num_batches_tracked, ...)
        = relu(batch_norm(conv2d(x, w), training=True) + residual)

computed exactly as ``nn.Conv2d -> nn.BatchNorm2d (train) -> ReLU``: normalised with the batch mean and biased
variance; ``running_mean`` / ``running_var`` updated in place with ``momentum`` and the *unbiased* variance;
``num_batches_tracked`` incremented; ``momentum=None`` is the cumulative average (factor 1 / batches). Under
``torch.autocast`` the convolution runs in the autocast dtype and the statistics in fp32, as ATen and cuDNN do.

``backend``: ``"triton"`` runs the fused kernels (:mod:`dla_fast.backends.triton._train`) or raises saying why it
cannot; ``"eager"`` is :func:`conv_bn_relu_train_ref` (``F.conv2d`` + ``F.batch_norm``); ``"auto"`` runs the
kernels on CUDA for fp16/bf16 convolutions (autocast or half tensors) and the eager reference everywhere else
(CPU, fp32, shapes without a kernel). fp32 stays on cuDNN under ``auto``: the Triton fp32 GEMM is either IEEE on
FMA units (slow) or TF32, which fp32 training does not expect. The CPU interpreter runs the kernels only when
asked for by name (tests): under ``TRITON_INTERPRET=1`` ``auto`` still means eager on the CPU.

``aggregate_bn_relu_train(children, weight, ...)`` is DLA's aggregation node (timm's ``DlaRoot``) the same way:
``relu(batch_norm_train(conv1x1(cat(children, 1))) + children[0] if shortcut)``, the concat never formed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..ops import IntPair, _check_4d, _check_conv, _check_float, conv_out_size
from . import _autograd as ag

__all__ = ["conv_bn_relu_train", "conv_bn_relu_train_ref", "fused_unavailable_reason", "compute_dtype",
           "update_running_stats", "aggregate_bn_relu_train", "aggregate_bn_relu_train_ref",
           "aggregate_unavailable_reason", "Deferred", "BACKENDS", "AGG_MAX_CHILDREN"]

BACKENDS = ("auto", "triton", "eager")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_AUTO_DTYPES = (torch.float16, torch.bfloat16)
# Children one aggregation kernel reads (dla_fast.backends.triton._launch.MAX_CHILDREN; DLA roots have 2-7).
AGG_MAX_CHILDREN = 8


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's where it is on for x's device, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


def kernels_unavailable_reason(x: torch.Tensor, backend: str, cdt: torch.dtype) -> Optional[str]:
    """None when the training path's kernels run on tensors like ``x`` computing in ``cdt`` under ``backend``
    ("triton" or "auto": CUDA fp16/bf16 only, the interpreter only when asked for by name); else why they don't.
    What every kernel of the path (the convs, the trees' max pools) decides by device and dtype alone."""
    if cdt not in _KERNEL_DTYPES:
        return (f"the fused training kernels take float16, bfloat16 or float32 (the conv computes in {cdt}); "
                "use backend='eager'")
    if backend == "auto":
        if x.device.type != "cuda":
            return f"backend='auto' runs the fused training kernels on CUDA only (the input is on {x.device})"
        if cdt not in _AUTO_DTYPES:
            return ("backend='auto' runs the fused training kernels for float16/bfloat16 convolutions (autocast or "
                    f"half tensors); this one computes in {cdt}, which stays on cuDNN")
    from ..backends import reason_unavailable
    # The backend judges by device and dtype alone: an empty probe in the compute dtype stands for x.
    return reason_unavailable("triton", torch.empty(0, device=x.device, dtype=cdt))


def fused_unavailable_reason(x: torch.Tensor, weight: torch.Tensor, groups: int, backend: str = "triton",
                             cdt: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the fused kernels run this call under ``backend`` ("triton" or "auto"); else why they don't.
    ``cdt``: the compute dtype (default: :func:`compute_dtype`)."""
    why = kernels_unavailable_reason(x, backend, cdt or compute_dtype(x))
    if why is not None:
        return why
    from ..backends.triton import _train as kt
    cout, cin_g = weight.shape[0], weight.shape[1]
    if kt.train_conv_kind(cin_g, cout // groups, groups) is None:
        return (f"no fused training kernel for groups={groups} with {cin_g} -> {cout // groups} channels a group "
                "(very wide groups against narrow ones)")
    return None


def update_running_stats(mean: torch.Tensor, var: torch.Tensor, count: int, running_mean: Optional[torch.Tensor],
                         running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                         momentum: Optional[float]) -> None:
    """nn.BatchNorm2d's bookkeeping after a training batch of ``count`` values a channel with batch ``mean`` and
    biased ``var``: the batch counter, then running = (1 - f) running + f stat with the unbiased variance, f =
    ``momentum`` or, for momentum None, 1 / batches seen (0 without a counter, as in nn.BatchNorm2d)."""
    factor = 0.0 if momentum is None else float(momentum)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    if running_mean is None:
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        if running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
            # in place, one kernel each: running + f (stat - running)
            running_mean.lerp_(mean, factor)
            running_var.lerp_(unbiased, factor)
        else:  # reduced-precision buffers (a .half() model): computed in the statistics' dtype, rounded once
            sd = mean.dtype
            running_mean.copy_(torch.lerp(running_mean.to(sd), mean, factor))
            running_var.copy_(torch.lerp(running_var.to(sd), unbiased, factor))


def _fold(ref: torch.Tensor, gamma: Optional[torch.Tensor], eps: float, running_mean: Optional[torch.Tensor],
          running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
          count: int):
    """The layer's BN for the kernels' final statistics launch to finish (its coefficients, running statistics and
    counter: :class:`dla_fast.backends.triton._train.BnFold`), or None where torch ops do it after the layer:
    traced code, ``momentum=None`` (the factor needs the counter on the host), running statistics that are not
    fp32 (a .half() model: rounded once from fp32) or not contiguous, a counter that is not int64."""
    if momentum is None or not ag._direct(ref):
        return None
    if running_mean is not None and any(t.dtype != torch.float32 or not t.is_contiguous()
                                        for t in (running_mean, running_var)):
        return None
    if num_batches_tracked is not None and (num_batches_tracked.dtype != torch.int64
                                            or num_batches_tracked.device != ref.device):
        return None
    if gamma is not None and not gamma.is_contiguous():
        return None
    from ..backends.triton._train import BnFold
    return BnFold(gamma, float(eps), running_mean, running_var, num_batches_tracked, float(momentum), int(count))


def _check_vec(t, name: str, n: int, ref: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D tensor of {n} values or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the conv's {n} output channels, got "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}; move them to one device")


def _check_bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, cout: int,
              ref: torch.Tensor) -> None:
    """The BatchNorm arguments both training ops take: per-channel vectors of ``cout`` on ``ref``'s device, the
    running statistics both or neither, the counter, momentum and eps."""
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(t, name, cout, ref)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None "
                         "(track_running_stats=False)")
    if num_batches_tracked is not None and (not isinstance(num_batches_tracked, torch.Tensor)
                                            or num_batches_tracked.numel() != 1):
        raise TypeError("num_batches_tracked must be a one-element tensor (BatchNorm's counter) or None")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1] or None (cumulative average), got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def _validate(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding,
              groups, momentum, eps, residual, relu, backend) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    stride, padding, (cout, cin_g, kh, kw) = _check_conv(x, weight, stride, padding, groups, relu)
    _check_float(weight, "weight")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but the input x is on {x.device}; move them to one device")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"weight has dtype {weight.dtype} but the input x has {x.dtype}; cast them to one dtype "
                         "(or run under torch.autocast)")
    _check_bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, cout, x)
    ho, wo = conv_out_size(x.shape[2], x.shape[3], kh, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel "
                         f"with stride {stride} and padding {padding}")
    count = x.shape[0] * ho * wo
    if count <= 1:
        raise ValueError(f"batch statistics need more than 1 value per channel, got output size "
                         f"{(x.shape[0], cout, ho, wo)} (BatchNorm in training mode refuses this too); use a larger "
                         "batch or input, or eval mode")
    if residual is not None:
        _check_4d(residual, "residual")
        _check_float(residual, "residual")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but the input x is on {x.device}; move them to one "
                             "device")
        expect = (x.shape[0], cout, ho, wo)
        if tuple(residual.shape) != expect:
            raise ValueError(f"residual must have the output's shape {expect}, got {tuple(residual.shape)}")
    return stride, padding, count


class Deferred(NamedTuple):
    """``act(bn(z))`` of a layer whose normalised output is not formed (``conv_bn_relu_train(..., defer=True)``).

    The next :func:`conv_bn_relu_train` applies this BN (the batch statistics ``mean``/``var``, the affine
    parameters, the ReLU) to z as it loads it, so the activation is neither written nor kept for the backward,
    which recomputes it for the next conv's weight gradient and runs this BN's backward there: one saved tensor a
    layer fewer. :meth:`materialize` forms the activation where the next op cannot take it this way."""
    z: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    coef: Optional[Tuple[torch.Tensor, torch.Tensor]]  # (rstd, scale) from the statistics' final launch, or None
    gamma: Optional[torch.Tensor]
    beta: Optional[torch.Tensor]
    eps: float
    relu: bool
    prologue: bool = True  # the next conv normalises as it loads; False: a separate pass forms the input for it

    def materialize(self) -> torch.Tensor:
        """The activation itself, channels_last in z's dtype (what ``defer=False`` returns)."""
        with torch.autocast(self.z.device.type, enabled=False):
            return ag.BnAct.apply(self.z, self.mean, self.var, self.gamma, self.beta, None, float(self.eps),
                                  self.relu, self.z.dtype, "triton", self.coef)


def conv_bn_relu_train_ref(x: torch.Tensor, weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
                           bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                           stride: Tuple[int, int], padding: Tuple[int, int], groups: int,
                           momentum: Optional[float], eps: float, residual: Optional[torch.Tensor],
                           relu: bool) -> torch.Tensor:
    """The eager reference: ``F.conv2d`` then ``F.batch_norm(training=True)`` with nn.BatchNorm2d's factor
    logic, then the residual and ReLU. The fallback of the fused op and the oracle of its tests."""
    z = F.conv2d(x, weight, None, stride, padding, 1, groups)
    factor = 0.0 if momentum is None else float(momentum)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, True, factor, eps)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y


def conv_bn_relu_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    groups: int = 1,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    backend: str = "auto",
    defer: Union[bool, str] = False,
    share_input: bool = False,
    share_residual: bool = False,
) -> Union[torch.Tensor, Deferred, Tuple[Union[torch.Tensor, Deferred], torch.Tensor]]:
    """``relu(batch_norm_train(conv2d(x, weight)) + residual)`` with the running statistics updated in place (see
    the module docstring). Differentiable in x, weight, bn_weight, bn_bias and residual.

    The output is channels_last on the kernel path, in the conv's compute dtype (promoted with the residual's
    dtype, as ``bn(z) + residual`` is eagerly).

    ``defer=True`` (no residual): where the kernels run, a :class:`Deferred` instead of the activation, for the
    next call to take as its ``x`` (a chain conv -> bn -> relu -> conv inside a block); where they do not, the
    activation as usual. An ``x`` that is a :class:`Deferred` is normalised as the conv loads it where the
    kernels run this call (``defer="recompute"``: formed by a pass of its own and dropped after the conv; kept
    for the backward as z either way), else formed first.

    ``share_input=True``: ``(output, x2)``, x2 being x for x's other consumers (a residual, another branch): the
    gradient that reaches x2 joins x's inside this conv's backward, in the epilogue of its data-gradient kernel,
    instead of in a separate sum (where the kernels run a dense stride-1 conv that keeps the size, 1x1 or 3x3
    padded by 1, of an x already in the compute dtype, outside tracing: a view of x; elsewhere x itself, and
    autograd sums as usual).
    ``share_residual=True``: ``(output, r2)``, the same for the residual, whose later readers' gradient the BN
    backward's last pass adds to the residual's as it writes it (where the kernels run, outside tracing).
    """
    if isinstance(defer, torch.Tensor) or not isinstance(defer, (bool, str)):
        raise TypeError(f"defer must be a bool or 'prologue' / 'recompute', got {type(defer).__name__}")
    if isinstance(defer, str) and defer not in ("prologue", "recompute"):
        raise ValueError(f"defer must be False, True ('prologue') or 'recompute', got {defer!r}")
    if defer and residual is not None:
        raise ValueError("defer=True leaves the activation to the next conv, which cannot add a residual to it; "
                         "pass residual=None or defer=False")
    prev = x if isinstance(x, Deferred) else None
    if share_input and share_residual:
        raise ValueError("share_input and share_residual: share one of them per call")
    if share_residual and residual is None:
        raise ValueError("share_residual=True needs a residual")
    if share_input and prev is not None:
        raise ValueError("share_input=True takes x as a tensor: a Deferred x has no other consumers to share with "
                         "(materialize() it first if it has)")
    if prev is not None:
        x = prev.z
    stride, padding, count = _validate(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                       num_batches_tracked, stride, padding, groups, momentum, eps, residual, relu,
                                       backend)
    cdt = compute_dtype(x)
    why = None if backend == "eager" else fused_unavailable_reason(x, weight, groups, backend, cdt)
    if why is not None and backend == "triton":
        raise RuntimeError(f"conv_bn_relu_train: backend='triton' cannot run here: {why}")
    if prev is not None and (backend == "eager" or why is not None or x.dtype != cdt):
        x, prev = prev.materialize(), None
    if backend == "eager" or why is not None:
        y = conv_bn_relu_train_ref(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                   num_batches_tracked, stride, padding, groups, momentum, eps, residual, relu)
        return with_shared(y, x, residual, share_input, share_residual)
    share = bool(share_input) and x.dtype == cdt and ag.shares_dgrad(x, weight, stride, padding, groups)
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    norm = ((None, None, None, None, 0.0, False) if prev is None
            else (prev.mean, prev.var, prev.gamma, prev.beta, float(prev.eps), prev.relu))
    with torch.autocast(x.device.type, enabled=False):
        # The casts are autograd ops: gradients reach fp32 master weights in fp32, as under eager autocast. A
        # cast copies anyway, so it also lays x out as the kernel reads it (channels_last); an x already in the
        # compute dtype is passed as it is (the kernel reads channel slices of channels_last tensors in place).
        xc = x if x.dtype == cdt else x.to(dtype=cdt, memory_format=torch.channels_last)
        wc = weight.to(cdt)
        fold = _fold(xc, bn_weight, eps, running_mean, running_var, num_batches_tracked, momentum, count)
        z, mean, var, *coef = ag.ConvStats.apply(xc, wc, stride, padding, groups, "triton", *norm, fold,
                                                 None if prev is None else prev.coef,
                                                 True if prev is None else prev.prologue, share)
        if share:
            x = coef.pop()
        if fold is None:
            update_running_stats(mean, var, count, running_mean, running_var, num_batches_tracked, momentum)
        if defer:
            y = Deferred(z, mean, var, tuple(coef) or None, bn_weight, bn_bias, float(eps), relu,
                         defer != "recompute")
        else:
            share_r = bool(share_residual) and ag._direct(residual)
            y = ag.BnAct.apply(z, mean, var, bn_weight, bn_bias, residual, float(eps), relu, out_dtype, "triton",
                               coef or None, share_r)
            if share_r:
                y, residual = y
    return with_shared(y, x, residual, share_input, share_residual)


def with_shared(y, x, residual, share_input: bool, share_residual: bool):
    """What :func:`conv_bn_relu_train` returns: ``y``, or ``(y, x)`` / ``(y, residual)`` with the tensor as its
    other readers take it (a view shared by this op's backward, or the tensor itself)."""
    if share_input:
        return y, x
    return (y, residual) if share_residual else y


# ------------------------------------------------------------------------------------------ aggregation node

def aggregate_unavailable_reason(children: Sequence[torch.Tensor], weight: torch.Tensor, backend: str = "triton",
                                 cdt: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the fused aggregation kernels run this call under ``backend`` ("triton" or "auto"); else why
    they don't."""
    if len(children) > AGG_MAX_CHILDREN:
        return (f"the fused aggregation kernel reads at most {AGG_MAX_CHILDREN} children, got {len(children)}; "
                "use backend='eager' (or 'auto', which falls back to it)")
    return fused_unavailable_reason(children[0], weight, 1, backend, cdt)


def _validate_agg(children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum,
                  eps, shortcut, relu, backend) -> int:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(children, torch.Tensor) or not isinstance(children, (list, tuple)):
        raise TypeError(f"children must be a list or tuple of 4-D tensors, got {type(children).__name__}")
    if len(children) == 0:
        raise ValueError("children is empty: an aggregation node needs at least one input")
    for i, c in enumerate(children):
        _check_4d(c, f"children[{i}]")
        _check_float(c, f"children[{i}]")
    ref = children[0]
    autocast = torch.is_autocast_enabled(ref.device.type)
    for i, c in enumerate(children[1:], 1):
        if c.device != ref.device:
            raise ValueError(f"children[{i}] is on {c.device} but children[0] is on {ref.device}; move them to one "
                             "device")
        if (c.shape[0], c.shape[2], c.shape[3]) != (ref.shape[0], ref.shape[2], ref.shape[3]):
            raise ValueError(f"children[{i}] has shape {tuple(c.shape)} but children[0] has {tuple(ref.shape)}: "
                             "the children of an aggregation node must agree in batch and spatial size")
        if c.dtype != ref.dtype and not autocast:
            raise ValueError(f"children[{i}] has dtype {c.dtype} but children[0] has {ref.dtype}; cast them to one "
                             "dtype (or run under torch.autocast)")
    if not isinstance(shortcut, bool):
        raise TypeError(f"shortcut must be a bool, got {type(shortcut).__name__}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    _check_4d(weight, "weight")
    _check_float(weight, "weight")
    ctot = sum(int(c.shape[1]) for c in children)
    cout = weight.shape[0]
    if tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"weight {tuple(weight.shape)} is not a 1x1 kernel: the aggregation node's conv is 1x1 "
                         "(use conv_bn_relu_train for other kernels)")
    if weight.shape[1] != ctot or cout == 0:
        raise ValueError(f"weight {tuple(weight.shape)} must have shape (Cout > 0, {ctot}, 1, 1): the children "
                         f"have {[int(c.shape[1]) for c in children]} channels, {ctot} in all")
    if weight.device != ref.device:
        raise ValueError(f"weight is on {weight.device} but the children are on {ref.device}; move them to one "
                         "device")
    if weight.dtype != ref.dtype and not autocast:
        raise ValueError(f"weight has dtype {weight.dtype} but the children have {ref.dtype}; cast them to one "
                         "dtype (or run under torch.autocast)")
    if shortcut and ref.shape[1] != cout:
        raise ValueError(f"shortcut adds children[0] to the output, so it needs the output's {cout} channels; "
                         f"children[0] has {ref.shape[1]}")
    _check_bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, cout, ref)
    count = ref.shape[0] * ref.shape[2] * ref.shape[3]
    if count <= 1:
        raise ValueError(f"batch statistics need more than 1 value per channel, got output size "
                         f"{(ref.shape[0], cout, ref.shape[2], ref.shape[3])} (BatchNorm in training mode refuses "
                         "this too); use a larger batch or input, or eval mode")
    return count


def aggregate_bn_relu_train_ref(children: Sequence[torch.Tensor], weight: torch.Tensor,
                                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                                num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float], eps: float,
                                shortcut: bool, relu: bool) -> torch.Tensor:
    """The eager reference: ``torch.cat`` then :func:`conv_bn_relu_train_ref` with children[0] as the residual
    when ``shortcut`` (timm's DlaRoot). The fallback of the fused op and the oracle of its tests."""
    return conv_bn_relu_train_ref(torch.cat(list(children), 1), weight, bn_weight, bn_bias, running_mean,
                                  running_var, num_batches_tracked, (1, 1), (0, 0), 1, momentum, eps,
                                  children[0] if shortcut else None, relu)


def aggregate_bn_relu_train(
    children: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    num_batches_tracked: Optional[torch.Tensor] = None,
    *,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    shortcut: bool = False,
    relu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(batch_norm_train(conv1x1(cat(children, 1), weight)) + (children[0] if shortcut))`` with the running
    statistics updated in place, as ``nn.Conv2d(1x1, bias=False) -> nn.BatchNorm2d (train) -> (+ children[0])
    -> ReLU`` over the concat, without forming the concat forward or backward. Differentiable in every child,
    weight, bn_weight and bn_bias; ``backend`` as in :func:`conv_bn_relu_train` (more than AGG_MAX_CHILDREN
    children have no kernel: ``auto`` runs them eagerly, ``triton`` raises).

    The output is channels_last on the kernel path, in the conv's compute dtype (promoted with children[0]'s
    dtype under ``shortcut``).
    """
    count = _validate_agg(children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                          momentum, eps, shortcut, relu, backend)
    children = list(children)
    ref = children[0]
    cdt = compute_dtype(ref)
    why = None if backend == "eager" else aggregate_unavailable_reason(children, weight, backend, cdt)
    if why is not None and backend == "triton":
        raise RuntimeError(f"aggregate_bn_relu_train: backend='triton' cannot run here: {why}")
    if backend == "eager" or why is not None:
        return aggregate_bn_relu_train_ref(children, weight, bn_weight, bn_bias, running_mean, running_var,
                                           num_batches_tracked, momentum, eps, shortcut, relu)
    residual = ref if shortcut else None
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    with torch.autocast(ref.device.type, enabled=False):
        # As in conv_bn_relu_train: the casts are autograd ops and lay a cast child out channels_last.
        kids = [c if c.dtype == cdt else c.to(dtype=cdt, memory_format=torch.channels_last) for c in children]
        fold = _fold(kids[0], bn_weight, eps, running_mean, running_var, num_batches_tracked, momentum, count)
        # The shortcut reads children[0] through AggStats' own output: its gradient then joins the child's in the
        # kernel that computes that (a residual in the epilogue), not in a sum of its own.
        share = shortcut and kids[0] is ref and ag._direct(ref)
        z, mean, var, *coef = ag.AggStats.apply("triton", fold, share, weight.to(cdt), *kids)
        if share:
            residual = coef.pop()
        y = ag.BnAct.apply(z, mean, var, bn_weight, bn_bias, residual, float(eps), relu, out_dtype, "triton",
                           coef or None)
    if fold is None:
        update_running_stats(mean, var, count, running_mean, running_var, num_batches_tracked, momentum)
    return y
