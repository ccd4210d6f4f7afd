"""The public functional API of the fused ops, and the dispatch to a backend.

    conv_bn_act(x, w, b)  = relu(conv2d(x, w, b, stride, padding, groups) + residual)
    aggregate(children, w, b) = relu(conv1x1(cat(children, 1), w) + b + residual)

``backend`` is one of ``"auto" | "triton" | "cuda" | "eager"``. A forced backend that cannot serve the call
(CPU tensor without the Triton interpreter, missing extension, autograd, unsupported dtype) raises a
``RuntimeError`` saying why; ``"auto"`` falls back to eager instead. Validation happens here, once, so the
backends receive well-formed arguments: ``x``/children/residual are 4-D on one device with one dtype, the
weight is in that dtype and in channels_last memory (K-contiguous: [Cout, kh, kw, Cin/g] in memory), the
bias is float32 or None, and the residual, if any, has the output's shape.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import _backends
from .reference import aggregate_ref, conv_bn_act_ref

__all__ = ["conv_bn_act", "aggregate", "conv_bn_act_ref", "aggregate_ref", "BACKENDS", "backend_for"]

BACKENDS = ("auto", "triton", "cuda", "eager")

IntPair = Union[int, Tuple[int, int], Sequence[int]]


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        out = (v, v)
    else:
        out = tuple(int(i) for i in v)
    if len(out) != 2 or any(i < 0 for i in out):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {v!r}")
    return out  # type: ignore[return-value]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_4d(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(t.shape)}")


def _check_bias(bias: Optional[torch.Tensor], cout: int, ref: torch.Tensor) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != cout:
        raise ValueError(f"bias must have shape ({cout},) to match the weight's {cout} output channels, "
                         f"got {tuple(bias.shape)}")
    if bias.device != ref.device:
        raise ValueError(f"bias is on {bias.device} but the input is on {ref.device}; move them to one device")


def _check_same(t: torch.Tensor, ref: torch.Tensor, name: str, what: str = "input") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the {what} is on {ref.device}; move them to one device")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the {what} has {ref.dtype}; cast them to one dtype")


def _needs_grad(*ts: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def conv_out_size(h: int, w: int, kh: int, kw: int, stride: Tuple[int, int], padding: Tuple[int, int]):
    return (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    groups: int = 1,
    residual: Optional[torch.Tensor] = None,
    relu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding, groups) + residual)`` in one kernel where possible.

    ``weight`` is a standard conv weight ``[Cout, Cin // groups, kh, kw]`` (typically BN-folded, see
    :func:`dla_fast.fold_bn`); the output is channels_last in ``x``'s dtype.
    """
    _check_backend(backend)
    _check_4d(x, "x")
    _check_4d(weight, "weight")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if stride[0] < 1 or stride[1] < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    cout, cin_g, kh, kw = weight.shape
    if x.shape[1] != cin_g * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight {tuple(weight.shape)} with groups={groups} "
                         f"expects {cin_g * groups} (= weight.shape[1] * groups)")
    if cout % groups != 0:
        raise ValueError(f"weight has {cout} output channels, not divisible by groups={groups}")
    _check_same(weight, x, "weight", "input x")
    _check_bias(bias, cout, x)
    ho, wo = conv_out_size(x.shape[2], x.shape[3], kh, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel "
                         f"with stride {stride} and padding {padding}")
    if residual is not None:
        _check_4d(residual, "residual")
        _check_same(residual, x, "residual", "input x")
        expect = (x.shape[0], cout, ho, wo)
        if tuple(residual.shape) != expect:
            raise ValueError(f"residual must have the output's shape {expect}, got {tuple(residual.shape)}")

    impl = _backends.select("conv_bn_act", backend, x, _needs_grad(x, weight, bias, residual),
                            key=_backends.conv_key(weight.shape, stride, padding, groups, x.dtype,
                                                  x.shape[2:]), batch=int(x.shape[0]))
    if impl is None:
        return conv_bn_act_ref(x, weight, bias, stride, padding, groups, residual, relu)
    return impl.conv_bn_act(x, _backends.prep_weight(weight), _backends.prep_bias(bias),
                            stride, padding, groups, residual, bool(relu))


def aggregate(
    children: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    residual: Union[bool, torch.Tensor] = False,
    relu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(conv1x1(cat(children, 1), weight) + bias + residual)`` without materialising the concat.

    ``weight`` is ``[Cout, sum(C_i)]`` or ``[Cout, sum(C_i), 1, 1]``. ``residual=True`` adds ``children[0]``
    (a DLA root's shortcut); a tensor adds that tensor (the Bottle2neck's shortcut).
    """
    _check_backend(backend)
    if isinstance(children, torch.Tensor) or not isinstance(children, (list, tuple)) or len(children) == 0:
        raise TypeError("children must be a non-empty list or tuple of 4-D tensors")
    children = list(children)
    for i, c in enumerate(children):
        _check_4d(c, f"children[{i}]")
    ref = children[0]
    n, _, h, w = ref.shape
    for i, c in enumerate(children[1:], 1):
        _check_same(c, ref, f"children[{i}]", "first child")
        if c.shape[0] != n or tuple(c.shape[2:]) != (h, w):
            raise ValueError(f"children must share batch and spatial size: children[0] is {tuple(ref.shape)}, "
                             f"children[{i}] is {tuple(c.shape)}")
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"aggregate takes a 1x1 weight, got shape {tuple(weight.shape)}")
        weight2d = weight.reshape(weight.shape[0], weight.shape[1])
    elif weight.dim() == 2:
        weight2d = weight
    else:
        raise ValueError(f"weight must be [Cout, Cin] or [Cout, Cin, 1, 1], got shape {tuple(weight.shape)}")
    _check_same(weight2d, ref, "weight", "children")
    cout, ctot = weight2d.shape
    csum = sum(c.shape[1] for c in children)
    if ctot != csum:
        raise ValueError(f"weight expects {ctot} input channels but the children have "
                         f"{' + '.join(str(c.shape[1]) for c in children)} = {csum}")
    _check_bias(bias, cout, ref)
    if isinstance(residual, bool):
        res = children[0] if residual else None
        if res is not None and res.shape[1] != cout:
            raise ValueError(f"residual=True adds children[0], which has {res.shape[1]} channels, "
                             f"but the output has {cout}")
    elif isinstance(residual, torch.Tensor):
        _check_4d(residual, "residual")
        _check_same(residual, ref, "residual", "children")
        if tuple(residual.shape) != (n, cout, h, w):
            raise ValueError(f"residual must have the output's shape {(n, cout, h, w)}, got {tuple(residual.shape)}")
        res = residual
    else:
        raise TypeError(f"residual must be a bool or a tensor, got {type(residual).__name__}")

    impl = _backends.select("aggregate", backend, ref, _needs_grad(weight, bias, res, *children),
                            key=_backends.aggregate_key([c.shape[1] for c in children], cout, ref.dtype,
                                                       (h, w)), batch=int(n))
    if impl is None:
        return aggregate_ref(children, weight2d, bias, res, relu)
    return impl.aggregate(children, _backends.prep_weight(weight2d), _backends.prep_bias(bias), res, bool(relu))


def backend_for(op: str, x: torch.Tensor, backend: str = "auto", key=None) -> str:
    """Name of the backend ``op`` would run on for input ``x`` ("triton", "cuda" or "eager")."""
    _check_backend(backend)
    impl = _backends.select(op, backend, x, False, key=key)
    return "eager" if impl is None else impl.NAME
