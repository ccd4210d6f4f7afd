"""The public functional API of the fused ops; arguments are validated here, once.

    conv_bn_act(x, w, b)      = relu(conv2d(x, w, b, stride, padding, groups) + residual)
    aggregate(children, w, b) = relu(conv1x1(cat(children, 1), w) + b + residual)
    max_pool(x, k)            = max_pool2d(x, k, stride=k)
    front(x, w0, b0, w1, b1, w2, b2) = a DLA's stem (7x7), level 0 (3x3) and level 1 (3x3 stride 2), each
                                       conv + bias + ReLU; on the Triton backend one kernel that writes only
                                       the last map

``backend`` is ``"auto"`` (the per-layer plan of :mod:`dla_fast.plan`: tuned on this GPU, the shipped prior or the
rules) or one of :data:`dla_fast.backends.NAMES`. A requested backend that cannot serve the call (CPU tensor
without the Triton interpreter, missing extension, autograd, unsupported dtype) raises a ``RuntimeError`` saying
why; ``"auto"`` falls back to eager instead. The backends then receive well-formed arguments (see
:mod:`dla_fast.backends`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _env
from .. import backends as _backends
from .reference import aggregate_ref, conv_bn_act_ref, front_ref

__all__ = ["conv_bn_act", "aggregate", "max_pool", "front", "conv_bn_act_ref", "aggregate_ref", "front_ref",
           "BACKENDS", "backend_for", "front_policy"]

BACKENDS = ("auto",) + _backends.NAMES

IntPair = Union[int, Tuple[int, int], Sequence[int]]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(v: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    if _is_int(v):
        out = (v, v)
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(i) for i in v):
        out = (v[0], v[1])
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return out


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_4d(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(t.shape)}")


def _check_bias(bias, cout: int, ref: torch.Tensor, name: str = "bias", weight: str = "weight") -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D tensor of {cout} values or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != cout:
        raise ValueError(f"{name} must have shape ({cout},) to match the {weight}'s {cout} output channels, "
                         f"got {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {bias.dtype}")
    if bias.device != ref.device:
        raise ValueError(f"{name} is on {bias.device} but the input is on {ref.device}; move them to one device")


def _check_same(t: torch.Tensor, ref: torch.Tensor, name: str, what: str = "input") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the {what} is on {ref.device}; move them to one device")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the {what} has {ref.dtype}; cast them to one dtype")


def _check_float(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _needs_grad(*ts: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def conv_out_size(h: int, w: int, kh: int, kw: int, stride: Tuple[int, int], padding: Tuple[int, int]):
    return (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1


def _select(backend: str, x: torch.Tensor, needs_grad: bool, key_fn, op: str):
    """(backend module, config) for a call; ``key_fn()`` builds the plan key (only asked for under "auto")."""
    if backend == "eager":
        return _backends.get("eager"), ()
    if backend != "auto":
        if needs_grad:
            raise RuntimeError(
                f"backend={backend!r} is inference-only and an input requires grad; wrap the call in "
                "torch.no_grad()/torch.inference_mode(), or use backend='eager' (or 'auto') for autograd")
        why = _backends.reason_unavailable(backend, x)
        if why is not None:
            raise RuntimeError(f"{op}: backend={backend!r} cannot run here: {why}")
        return _backends.get(backend), ()
    # auto: kernels only for CUDA inference; everything else is the eager reference.
    if needs_grad or x.device.type != "cuda":
        return _backends.get("eager"), ()
    from ..fuse import _launch_bound
    from ..plan.planner import PLANNER
    key = key_fn()
    plan = PLANNER.plan(key, x.device, _launch_bound(key.n))
    return _backends.get(plan.backend), plan.config


def _check_conv(x, weight, stride: IntPair, padding: IntPair, groups: int,
                relu: bool) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int, int, int]]:
    """The checks every conv op shares (inference and training): shapes, geometry, flags. Returns the stride and
    padding as pairs and the weight's shape."""
    _check_4d(x, "x")
    _check_4d(weight, "weight")
    _check_float(x, "x")
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    cout, cin_g, kh, kw = weight.shape
    if cin_g == 0 or cout == 0 or kh == 0 or kw == 0:
        raise ValueError(f"weight {tuple(weight.shape)} is empty: a convolution needs at least one input and one "
                         "output channel and a kernel of at least 1x1")
    if x.shape[1] != cin_g * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight {tuple(weight.shape)} with groups={groups} "
                         f"expects {cin_g * groups} (= weight.shape[1] * groups)")
    if cout % groups != 0:
        raise ValueError(f"weight has {cout} output channels, not divisible by groups={groups}")
    return stride, padding, (int(cout), int(cin_g), int(kh), int(kw))


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
    stride, padding, (cout, cin_g, kh, kw) = _check_conv(x, weight, stride, padding, groups, relu)
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

    def key():
        from ..plan.planner import conv_key
        return conv_key(weight.shape, stride, padding, groups, residual is not None, x.dtype, x.shape[0],
                        x.shape[2:])

    impl, cfg = _select(backend, x, _needs_grad(x, weight, bias, residual), key, "conv_bn_act")
    if impl.NAME == "eager":
        return conv_bn_act_ref(x, weight, bias, stride, padding, groups, residual, relu)
    return impl.conv_bn_act(x, weight.contiguous(memory_format=torch.channels_last),
                            None if bias is None else bias.to(torch.float32).contiguous(),
                            stride, padding, groups, residual, relu, cfg)


def aggregate(
    children: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    residual: Union[None, bool, torch.Tensor] = None,
    relu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu(conv1x1(cat(children, 1), weight) + bias + residual)`` without materialising the concat.

    ``weight`` is ``[Cout, sum(C_i)]`` or ``[Cout, sum(C_i), 1, 1]``. ``residual`` None or False adds nothing,
    True adds ``children[0]`` (a DLA root's shortcut), a tensor adds that tensor (the Bottle2neck's shortcut).
    """
    _check_backend(backend)
    if isinstance(children, torch.Tensor) or not isinstance(children, (list, tuple)) or len(children) == 0:
        raise TypeError("children must be a non-empty list or tuple of 4-D tensors")
    children = list(children)
    for i, c in enumerate(children):
        _check_4d(c, f"children[{i}]")
    ref = children[0]
    _check_float(ref, "children[0]")
    n, _, h, w = ref.shape
    for i, c in enumerate(children):
        if i:
            _check_same(c, ref, f"children[{i}]", "first child")
            if c.shape[0] != n or tuple(c.shape[2:]) != (h, w):
                raise ValueError(f"children must share batch and spatial size: children[0] is {tuple(ref.shape)}, "
                                 f"children[{i}] is {tuple(c.shape)}")
        if c.shape[1] == 0:
            raise ValueError(f"children[{i}] has no channels")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
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
    if cout == 0:
        raise ValueError(f"weight {tuple(weight.shape)} has no output channels")
    csum = sum(c.shape[1] for c in children)
    if ctot != csum:
        raise ValueError(f"weight expects {ctot} input channels but the children have "
                         f"{' + '.join(str(c.shape[1]) for c in children)} = {csum}")
    _check_bias(bias, cout, ref)
    kind = 0
    if residual is None or residual is False:
        res = None
    elif residual is True:
        res, kind = children[0], 1
        if res.shape[1] != cout:
            raise ValueError(f"residual=True adds children[0], which has {res.shape[1]} channels, "
                             f"but the output has {cout}")
    elif isinstance(residual, torch.Tensor):
        _check_4d(residual, "residual")
        _check_same(residual, ref, "residual", "children")
        if tuple(residual.shape) != (n, cout, h, w):
            raise ValueError(f"residual must have the output's shape {(n, cout, h, w)}, got {tuple(residual.shape)}")
        res, kind = residual, 2
    else:
        raise TypeError(f"residual must be None, a bool or a tensor, got {type(residual).__name__}")

    def key():
        from ..plan.planner import aggregate_key
        return aggregate_key([c.shape[1] for c in children], cout, kind, ref.dtype, n, (h, w))

    impl, cfg = _select(backend, ref, _needs_grad(weight, bias, res, *children), key, "aggregate")
    if impl.NAME == "eager":
        return aggregate_ref(children, weight2d, bias, res, relu)
    b32 = None if bias is None else bias.to(torch.float32).contiguous()
    return impl.aggregate(children, weight2d.contiguous(), b32, res, relu, cfg)


def max_pool(x: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """``max_pool2d(x, k, stride=k)`` (no padding, floor mode), channels_last out on the kernel backends."""
    _check_backend(backend)
    _check_4d(x, "x")
    _check_float(x, "x")
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if x.shape[2] < k or x.shape[3] < k:
        raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is smaller than the {k}x{k} window")

    def key():
        from ..plan.planner import max_pool_key
        return max_pool_key(x.shape[1], k, x.dtype, x.shape[0], x.shape[2:])

    impl, _ = _select(backend, x, _needs_grad(x), key, "max_pool")
    return impl.max_pool(x, k)


FRONT_MODES = ("0", "1", "auto")


def _front_mode() -> str:
    mode = (_env.get("DLA_FAST_FRONT") or "auto").lower()
    if mode not in FRONT_MODES:
        raise ValueError(f"DLA_FAST_FRONT={mode!r} is not a front mode: use 0 (never), 1 (wherever the Triton "
                         "kernels run) or auto (where the fused front pays)")
    return mode


def front_policy(backend: str, device: torch.device, dtype: torch.dtype, cin: int, c0: int,
                 c1: int) -> Tuple[str, str]:
    """When a DLA front (``cin`` input, ``c0`` stem, ``c1`` level-1 channels) runs as the Triton front kernel
    under ``backend`` on ``device`` in ``dtype``: ``("always" | "unpaced" | "never", why)``. "unpaced": only
    calls not paced by their launches (one Triton launch costs 50-130 us of host time, the CUDA extension's
    three ~60, so ``backend="auto"`` keeps the separate layers at small batches run without a CUDA graph or
    torch.compile).
    The switch ``DLA_FAST_FRONT`` (0 / 1 / auto) decides with the backend; elsewhere the three layers run as
    separate fused ops."""
    _check_backend(backend)
    mode = _front_mode()
    if mode == "0":
        return "never", "DLA_FAST_FRONT=0"
    if backend not in ("auto", "triton"):
        return "never", f"backend={backend!r} has no fused front"
    if backend == "auto" and device.type != "cuda":
        return "never", f"no kernels off the GPU ({device.type})"
    why = _backends.reason_unavailable("triton", torch.empty(0, device=device, dtype=dtype))
    if why is None:
        why = _backends.get("triton").front_shape_reason(cin, c0, c1)
    if why is not None:
        return "never", why
    if mode == "1":
        if backend == "auto" and dtype in (torch.float16, torch.bfloat16) and _backends.get("triton").compiled(device):
            return "unpaced", "DLA_FAST_FRONT=1, for calls not paced by their launches"
        return "always", "DLA_FAST_FRONT=1"
    if not _backends.get("triton").compiled(device):
        return "never", "the Triton interpreter (DLA_FAST_FRONT=1 runs the front there)"
    if backend == "triton":
        return "always", "backend='triton'"
    # Under backend="auto" the front runs where a GPU measurement showed it no slower than the three separate
    # layers end to end, with half the peak memory (fp16 on the H100, benchmarks/NOTES.md); elsewhere the plan
    # keeps the separate layers until measured, and DLA_FAST_FRONT=1 opts in.
    if dtype == torch.float16:
        return "unpaced", "one kernel for the stem, level 0 and level 1"
    return "never", f"auto keeps {dtype} on the separate layers until the front is measured there (DLA_FAST_FRONT=1)"


def front(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: Optional[torch.Tensor],
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """A DLA's high-resolution front, each step conv + bias (a folded BN) + ReLU::

        y0 = relu(conv2d(x,  w0, b0, padding=3))              # the stem, 7x7: Cin -> C0
        y1 = relu(conv2d(y0, w1, b1, padding=1))              # level 0, 3x3: C0 -> C0
        y  = relu(conv2d(y1, w2, b2, stride=2, padding=1))    # level 1, 3x3 stride 2: C0 -> C1

    On the Triton backend this is one kernel that writes only ``y`` (channels_last, x's dtype): the two
    full-resolution maps never reach memory. ``backend="cuda"`` runs the three layers as separate fused ops,
    ``"eager"`` the reference; ``"auto"`` takes the Triton front where :func:`front_policy` says so, else the
    three ``conv_bn_act(backend="auto")`` calls.
    """
    _check_backend(backend)
    _check_4d(x, "x")
    _check_float(x, "x")
    for name, w, k in (("w0", w0, 7), ("w1", w1, 3), ("w2", w2, 3)):
        _check_4d(w, name)
        _check_same(w, x, name, "input x")
        if tuple(w.shape[2:]) != (k, k):
            raise ValueError(f"{name} must be a {k}x{k} kernel (the front is a 7x7 stem and two 3x3 convs), got "
                             f"shape {tuple(w.shape)}")
    cin, c0, c1 = x.shape[1], w0.shape[0], w2.shape[0]
    if w0.shape[1] != cin:
        raise ValueError(f"x has {cin} channels but the stem weight w0 {tuple(w0.shape)} expects {w0.shape[1]}")
    if c0 == 0 or c1 == 0 or cin == 0:
        raise ValueError(f"the front needs at least one channel at every step, got {cin} -> {c0} -> {c1}")
    if tuple(w1.shape[:2]) != (c0, c0):
        raise ValueError(f"w1 must map the stem's {c0} channels to {c0} (shape ({c0}, {c0}, 3, 3)), got "
                         f"{tuple(w1.shape)}")
    if w2.shape[1] != c0:
        raise ValueError(f"w2 must take level 0's {c0} channels (shape (C1, {c0}, 3, 3)), got {tuple(w2.shape)}")
    for name, b, c, w in (("b0", b0, c0, "w0"), ("b1", b1, c0, "w1"), ("b2", b2, c1, "w2")):
        _check_bias(b, c, x, name, w)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x has an empty spatial size {tuple(x.shape[2:])}")

    def separate(be: str) -> torch.Tensor:
        y = conv_bn_act(x, w0, b0, padding=3, backend=be)
        y = conv_bn_act(y, w1, b1, padding=1, backend=be)
        return conv_bn_act(y, w2, b2, stride=2, padding=1, backend=be)

    needs_grad = _needs_grad(x, w0, b0, w1, b1, w2, b2)
    if backend == "eager":
        return front_ref(x, w0, b0, w1, b1, w2, b2)
    if backend == "cuda":
        return separate("cuda")
    if backend == "triton":
        tb, _ = _select("triton", x, needs_grad, None, "front")
        why = tb.front_shape_reason(cin, c0, c1)
        if why is not None:
            raise RuntimeError(f"front: backend='triton' cannot run here: {why}; use backend='auto' (three "
                               "separate layers) or 'eager'")
    else:
        when = "never" if needs_grad else front_policy("auto", x.device, x.dtype, cin, c0, c1)[0]
        if when == "unpaced":
            from ..fuse import _launch_bound
            when = "never" if _launch_bound(x.shape[0], x.shape[2:]) else "always"
        if when == "never":
            return separate("auto")
        tb = _backends.get("triton")

    def prep(w):
        return w.contiguous(memory_format=torch.channels_last)

    def bias(b, c):
        return torch.zeros(c, device=x.device) if b is None else b.to(torch.float32).contiguous()

    return tb.front(x, prep(w0), bias(b0, c0), prep(w1), bias(b1, c0), prep(w2), bias(b2, c1))


def backend_for(op: str, x: torch.Tensor, backend: str = "auto") -> str:
    """Name of the backend ``op`` runs on for input ``x`` when the plan has nothing measured for it: "eager" off
    the GPU or under autograd, else the requested backend or, under "auto", the rule's choice."""
    _check_backend(backend)
    if backend != "auto":
        return backend
    if x.device.type != "cuda":
        return "eager"
    from ..plan.planner import PLANNER, conv_key, rule
    key = conv_key((8, max(1, x.shape[1]), 3, 3), (1, 1), (1, 1), 1, False, x.dtype, x.shape[0], x.shape[2:])
    return rule(key, PLANNER.available(x.device, x.dtype)).backend
