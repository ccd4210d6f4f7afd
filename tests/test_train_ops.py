"""Tests of the training path's first piece: conv + BatchNorm (batch statistics) + ReLU, forward and backward
(dla_fast.train, dla_fast.backends.triton._train).

On the CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny
shapes in fp32 and fp16 (the interpreter has no bf16), always with ``backend="triton"`` because ``auto`` keeps
the CPU on eager. The ``cuda`` tests add DLA-sized shapes, bf16/fp16 autocast, determinism and torch.compile.

Numerics, the project's rule (dla_fast/verify.py): every quantity (output, each gradient, running statistics)
is compared with a float64 eager reference on the same (rounded) inputs; the fused path passes when its
relative error is at most 2x the error of eager PyTorch in the same dtype plus verify.FLOOR[dtype]. Outputs of
the kernels start as NaN (DLA_FAST_TRITON_POISON=1), so an element a kernel never writes fails.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dla_fast.train import TrainConvBnAct, conv_bn_relu_train, conv_bn_relu_train_ref, fused_unavailable_reason
from dla_fast.train import _autograd as ag
from dla_fast.verify import FLOOR, RATIO

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency of torch's CUDA builds
    HAS_TRITON = False
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cpu" if INTERP else ("cuda" if HAS_CUDA else None)

needs_kernels = pytest.mark.skipif(
    not HAS_TRITON or DEV is None,
    reason="no GPU and TRITON_INTERPRET is not set: run with TRITON_INTERPRET=1 to test the kernels on the CPU")
needs_cuda = pytest.mark.skipif(not HAS_TRITON or not HAS_CUDA or INTERP,
                                reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

SMALL_DTYPES = [torch.float32, torch.float16] if INTERP else [torch.float32, torch.float16, torch.bfloat16]
DT_ID = lambda d: str(d).split(".")[-1]  # noqa: E731


@pytest.fixture(autouse=True)
def _poison_and_ieee(monkeypatch):
    """NaN-filled kernel outputs, and IEEE fp32 (no TF32) for the GPU runs of the fp32 cases."""
    monkeypatch.setenv("DLA_FAST_TRITON_POISON", "1")
    from dla_fast import _env
    _env.reload()
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    _env.reload()


# ------------------------------------------------------------------------------------------------ helpers

def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double().to(a.device)
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _judge(what: str, ours: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    err, e_eager = _rel(ours, ref64), _rel(eager, ref64)
    bound = RATIO * e_eager + FLOOR[dtype]
    assert err <= bound, f"{what} ({dtype}): rel error {err:.3e} > {RATIO} x eager {e_eager:.3e} + {FLOOR[dtype]}"


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf that requires grad, with ``t``'s strides (never ``t`` itself: ``.to()`` of the same dtype
    returns its input, and the cases' tensors must stay untouched)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out.requires_grad_()


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if kind == "nchw":
        return t.contiguous()
    if kind == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "slice":  # a channel slice of a wider channels_last tensor
        n, c, h, w = t.shape
        big = torch.randn(n, c + 5, h, w, device=t.device).to(t.dtype).contiguous(memory_format=torch.channels_last)
        big[:, 2:2 + c] = t
        return big[:, 2:2 + c]
    if kind == "strided":  # every other column of a wider tensor: no unit-stride dimension
        n, c, h, w = t.shape
        big = torch.randn(n, c, h, 2 * w, device=t.device).to(t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(kind)


class Case:
    """One layer's inputs, drawn once in fp32: conv (N, Cin, H, W) -> Cout, k x k, stride, padding, groups."""

    def __init__(self, N, Cin, Cout, H, W, k, stride, pad, groups, *, residual=False, relu=True, affine=True,
                 seed=0, device=None):
        device = device or DEV
        g = torch.Generator().manual_seed(seed)
        self.conf = dict(stride=stride, padding=pad, groups=groups, relu=relu)
        self.x = torch.randn(N, Cin, H, W, generator=g).to(device)
        fan_in = Cin // groups * k * k
        self.w = (torch.randn(Cout, Cin // groups, k, k, generator=g) * fan_in ** -0.5).to(device)
        self.gamma = (torch.rand(Cout, generator=g) + 0.5).to(device) if affine else None
        self.beta = (torch.randn(Cout, generator=g) * 0.5).to(device) if affine else None
        self.rm = (torch.randn(Cout, generator=g) * 0.2).to(device)
        self.rv = (torch.rand(Cout, generator=g) + 0.5).to(device)
        ho, wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
        self.res = torch.randn(N, Cout, ho, wo, generator=g).to(device) if residual else None
        self.gy = torch.randn(N, Cout, ho, wo, generator=g).to(device)

    def run(self, backend: str, dtype: torch.dtype, *, momentum=0.1, nbt=3, x_layout="nchw", res_layout="nchw",
            gy_layout="nchw", param_dtype=None, autocast=False, operands=None, mask=None, gy_dtype=None):
        """Forward + backward; returns {name: tensor} of everything the layer produces.

        Parameters and running statistics are fp32 (as under autocast) unless ``param_dtype``, float64 for a
        float64 run. ``autocast``: x and w stay fp32 and the call runs under ``torch.autocast(dtype)``.
        ``operands``: the dtype the low-precision run saw x, w and the residual in; a float64 run then starts
        from those rounded values. ``mask``: the float64 reference through the ReLU branches of another run
        (see :func:`_compare`). ``gy_dtype``: the dtype the other run's output gradient was rounded to.
        """
        pd = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
        low = (lambda t: t.to(operands).to(dtype)) if operands is not None else (lambda t: t.to(dtype))
        in_dt = torch.float32 if autocast else dtype
        x = _leaf(_layout(low(self.x).to(in_dt) if not autocast else self.x.clone(), x_layout))
        w = _leaf(low(self.w).to(in_dt) if not autocast else self.w)
        gamma = None if self.gamma is None else _leaf(self.gamma.to(pd))
        beta = None if self.beta is None else _leaf(self.beta.to(pd))
        rm, rv = self.rm.to(pd).clone(), self.rv.to(pd).clone()
        n = torch.tensor(nbt, device=x.device)
        res = None if self.res is None else _leaf(_layout(low(self.res), res_layout))
        conf = dict(self.conf)
        if mask is not None:
            conf["relu"] = False
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            y = conv_bn_relu_train(x, w, gamma, beta, rm, rv, n, momentum=momentum, residual=res, backend=backend,
                                   **conf)
        if mask is not None:
            y = torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))
        gy = self.gy.to(gy_dtype) if gy_dtype is not None else self.gy
        y.backward(_layout(gy.to(y.dtype), gy_layout))
        out = dict(y=y.detach(), dx=x.grad, dw=w.grad, running_mean=rm, running_var=rv, nbt=n)
        if gamma is not None:
            out.update(dgamma=gamma.grad, dbeta=beta.grad)
        if res is not None:
            out["dres"] = res.grad
        return out


def _compare(case: Case, dtype: torch.dtype, what: str, backend: str = "triton", **kw) -> dict:
    """The fused path (``backend``) and eager PyTorch, both in ``dtype``, each against float64.

    ReLU's derivative jumps at zero: an element whose pre-activation lands on the other side of zero after
    low-precision rounding flips its gradient by O(1), and in these small tensors one such element is several
    percent of a gradient's norm, for eager and fused alike, by the luck of the draw. So each run is judged
    against the float64 computation taken through *its own* ReLU branches (its output's mask): that measures
    the arithmetic, everywhere, and not which side of zero a rounding fell.
    """
    ours = case.run(backend, dtype, **kw)
    eager = case.run("eager", dtype, **kw)
    kw64 = {k: v for k, v in kw.items() if k not in ("param_dtype", "autocast")}
    kw64.update(operands=dtype, gy_dtype=ours["y"].dtype)
    relu = case.conf["relu"]
    ref_ours = case.run("eager", torch.float64, mask=ours["y"] > 0 if relu else None, **kw64)
    ref_eager = case.run("eager", torch.float64, mask=eager["y"] > 0 if relu else None, **kw64) if relu else ref_ours
    assert ours["y"].dtype == eager["y"].dtype, f"{what}: output dtype {ours['y'].dtype} != {eager['y'].dtype}"
    assert ours["y"].is_contiguous(memory_format=torch.channels_last), f"{what}: output not channels_last"
    assert set(ours) == set(ref_ours)
    for k in ours:
        if k == "nbt":
            assert ours[k].item() == ref_ours[k].item() == kw.get("nbt", 3) + 1, f"{what}: num_batches_tracked"
            continue
        assert ours[k].dtype == eager[k].dtype, f"{what} {k}: dtype {ours[k].dtype} != eager's {eager[k].dtype}"
        _judge2(f"{what} {k}", ours[k], ref_ours[k], eager[k], ref_eager[k], dtype)
    return ours


def _judge2(what: str, ours: torch.Tensor, ours_ref: torch.Tensor, eager: torch.Tensor, eager_ref: torch.Tensor,
            dtype: torch.dtype) -> None:
    """:func:`_judge` with each run measured against its own float64 reference."""
    assert ours.shape == ours_ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ours_ref.shape)}"
    err, e_eager = _rel(ours, ours_ref), _rel(eager, eager_ref)
    bound = RATIO * e_eager + FLOOR[dtype]
    assert err <= bound, f"{what} ({dtype}): rel error {err:.3e} > {RATIO} x eager {e_eager:.3e} + {FLOOR[dtype]}"


# --------------------------------------------------------------------------- small shapes (interpreter)

# name: (N, Cin, Cout, H, W, k, stride, pad, groups, residual, relu)
SMALL = {
    "3x3_res": (2, 16, 24, 9, 9, 3, 1, 1, 1, True, True),
    "3x3_s2_odd": (2, 13, 20, 11, 9, 3, 2, 1, 1, False, True),
    "1x1_res": (2, 24, 16, 9, 11, 1, 1, 0, 1, True, True),
    "1x1_norelu": (2, 16, 12, 9, 9, 1, 1, 0, 1, False, False),       # the trees' project conv: BN, no ReLU
    "stem7x7_s2": (2, 3, 16, 13, 13, 7, 2, 3, 1, False, True),        # flat-K walk
    "stem7x7": (1, 3, 8, 9, 9, 7, 1, 3, 1, False, True),
    "g4_4pg": (2, 16, 16, 9, 9, 3, 1, 1, 4, False, True),             # block-diagonal walk
    "g8_2pg_s2": (2, 16, 16, 11, 11, 3, 2, 1, 8, False, True),
    "g3_4to6pg": (2, 12, 18, 9, 9, 3, 1, 1, 3, True, True),           # partial block-diagonal tiles
    "g2_16pg": (2, 32, 32, 9, 9, 3, 1, 1, 2, False, True),            # dense walk, one group per tile
    "batch1": (1, 8, 12, 9, 9, 3, 1, 1, 1, True, True),
    # N*H*W = 3, nearly the smallest batch BN takes. (At 2, xhat = +-1 and the input gradient is exactly zero
    # up to eps: a relative error of pure cancellation noise.)
    "batch1_tiny": (1, 8, 8, 3, 1, 1, 1, 0, 1, False, True),
}


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
@pytest.mark.parametrize("name", list(SMALL))
def test_forward_backward_small(name, dtype):
    """Output, every gradient, running statistics and the batch counter against eager and float64."""
    N, Cin, Cout, H, W, k, s, p, g, res, relu = SMALL[name]
    case = Case(N, Cin, Cout, H, W, k, s, p, g, residual=res, relu=relu, seed=zlib.crc32(name.encode()))
    _compare(case, dtype, name)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("x_layout,res_layout,gy_layout", [
    ("cl", "cl", "cl"), ("slice", "strided", "nchw"), ("strided", "slice", "strided"),
])
def test_layouts(x_layout, res_layout, gy_layout):
    """Non-contiguous inputs, residuals and output gradients give the same numbers."""
    case = Case(2, 12, 16, 9, 7, 3, 1, 1, 1, residual=True, seed=11)
    _compare(case, torch.float32, f"layouts {x_layout}/{res_layout}/{gy_layout}", x_layout=x_layout,
             res_layout=res_layout, gy_layout=gy_layout)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_affine_false_and_half_parameters(dtype):
    """BN without affine parameters; and BN parameters/running statistics in the conv's dtype (a .half() model
    without autocast): statistics stay fp32 inside, the buffers keep their dtype."""
    _compare(Case(2, 8, 12, 9, 9, 3, 1, 1, 1, affine=False, seed=12), dtype, "affine=False")
    out = _compare(Case(2, 8, 12, 9, 9, 3, 1, 1, 1, residual=True, seed=13), dtype, "params in conv dtype",
                   param_dtype=dtype)
    assert out["running_mean"].dtype == dtype and out["dgamma"].dtype == dtype


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_running_stats_over_steps(momentum, dtype):
    """Running mean/var (momentum and unbiased variance; momentum None = cumulative average) and the batch
    counter after 1 and 3 steps on different batches, starting from a fresh BN (counter 0)."""
    cases = [Case(2, 8, 12, 9, 9, 3, 1, 1, 1, seed=40 + i) for i in range(3)]
    state = {}
    for backend, dt in (("triton", dtype), ("eager", dtype), ("eager", torch.float64)):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        rm, rv = cases[0].rm.to(pd).clone(), cases[0].rv.to(pd).clone()
        n = torch.tensor(0, device=rm.device)
        snaps = []
        for c in cases:
            conv_bn_relu_train(c.x.to(dt), c.w.to(dt), c.gamma.to(pd), c.beta.to(pd), rm, rv, n, stride=1,
                               padding=1, momentum=momentum, backend=backend)
            snaps.append((rm.clone(), rv.clone(), n.item()))
        state[(backend, dt)] = snaps
    for step in (0, 2):
        ours, eager, ref = (state[k][step] for k in (("triton", dtype), ("eager", dtype), ("eager", torch.float64)))
        assert ours[2] == eager[2] == ref[2] == step + 1
        _judge(f"running_mean after {step + 1}", ours[0], eager[0], ref[0], dtype)
        _judge(f"running_var after {step + 1}", ours[1], eager[1], ref[1], dtype)
    if momentum is None:  # the cumulative average of 3 batches is nothing like one batch's statistics
        assert _rel(state[("eager", torch.float64)][2][0], state[("eager", torch.float64)][0][0]) > 0.05


@pytest.mark.interpreter
@needs_kernels
def test_momentum_none_without_counter_and_no_running_stats():
    """As nn.BatchNorm2d: momentum None without a counter leaves the running statistics alone (factor 0), and
    track_running_stats=False (no buffers) still normalises with the batch statistics."""
    c = Case(2, 8, 12, 7, 7, 3, 1, 1, 1, seed=14)
    rm, rv = c.rm.clone(), c.rv.clone()
    y = conv_bn_relu_train(c.x, c.w, c.gamma, c.beta, rm, rv, None, stride=1, padding=1, momentum=None,
                           backend="triton")
    assert torch.equal(rm, c.rm) and torch.equal(rv, c.rv)
    y2 = conv_bn_relu_train(c.x, c.w, c.gamma, c.beta, None, None, None, stride=1, padding=1, backend="triton")
    ref = conv_bn_relu_train_ref(c.x.double(), c.w.double(), c.gamma.double(), c.beta.double(), None, None, None,
                                 (1, 1), (1, 1), 1, 0.1, 1e-5, None, True)
    assert _rel(y, ref) < 1e-5 and _rel(y2, ref) < 1e-5


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
@pytest.mark.parametrize("kind,shape", [
    ("dense", (2, 20, 24, 9, 7, 3, 2, 1, 1)), ("flat", (2, 20, 24, 9, 7, 3, 2, 1, 1)),
    ("blockdiag", (2, 16, 24, 9, 7, 3, 1, 1, 4)), ("dense", (1, 40, 16, 5, 5, 3, 1, 1, 1)),
    ("flat", (2, 6, 8, 9, 9, 7, 2, 3, 1)),
])
def test_conv_stats_kernel(kind, shape, dtype):
    """Each K walk of the statistics conv, forced on shapes the heuristic sends elsewhere: z, the batch mean and
    the biased variance against float64, with and without the BN+ReLU prologue on the input."""
    from dla_fast.backends.triton import _train as kt
    N, Cin, Cout, H, W, k, s, p, g = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{shape}".encode()))
    x = (torch.randn(N, Cin, H, W, generator=gen) * 2 + 3).to(DEV, dtype)  # a large mean: Chan's combination
    w = (torch.randn(Cout, Cin // g, k, k, generator=gen) * (Cin // g * k * k) ** -0.5).to(DEV, dtype)
    norm = tuple(t.to(DEV) for t in (torch.randn(Cin, generator=gen) + 3, torch.rand(Cin, generator=gen) + 0.3,
                                     torch.randn(Cin, generator=gen)))
    for nrm, relu in ((None, False), (norm, True), (norm, False)):
        Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        cfg = kt.train_conv_plan(N * Ho * Wo, Cin // g, Cout // g, g, k, k, dtype, False, force=kind)
        z, mean, var = kt.conv_stats_launch(x, w, (s, s), (p, p), g, nrm, relu, config=cfg)
        n64 = None if nrm is None else tuple(t.double() for t in nrm)
        z64, m64, v64 = ag.conv_stats_torch(x.double(), w.double(), (s, s), (p, p), g, n64, relu)
        ze, me, ve = ag.conv_stats_torch(x, w, (s, s), (p, p), g, nrm, relu)
        what = f"{kind} {shape} prologue={nrm is not None} relu={relu}"
        assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
        assert mean.dtype == var.dtype == torch.float32
        _judge(f"{what} z", z, ze, z64, dtype)
        _judge(f"{what} mean", mean, me, m64, dtype)
        _judge(f"{what} var", var, ve, v64, dtype)
        if kind == "dense" and nrm is None:
            # The transposed tile (channels as the MMA's rows): the same quantities, the same bound.
            zt, mt, vt = kt.conv_stats_launch(x, w, (s, s), (p, p), g, None, False, config=dict(cfg, SWAP=True))
            assert zt.is_contiguous(memory_format=torch.channels_last)
            _judge(f"{what} swap z", zt, ze, z64, dtype)
            _judge(f"{what} swap mean", mt, me, m64, dtype)
            _judge(f"{what} swap var", vt, ve, v64, dtype)
        elif nrm is None:
            with pytest.raises(ValueError, match="dense K walk without the BN prologue"):
                kt.conv_stats_launch(x, w, (s, s), (p, p), g, None, False, config=dict(cfg, SWAP=True))


@pytest.mark.interpreter
@needs_kernels
def test_transposed_statistics_tile_gate(monkeypatch):
    """DLA_FAST_TRAIN_STATS_TILE: channels (the default) transposes dense convs and aggregation nodes without the
    prologue whose tiles hold at least 64 channels; pixels keeps the pixel-major tile; another value is refused;
    the transposed tile with the prologue is refused by the launcher. Under it, a large-mean channel's statistics
    stay exact to fp32 rounding (the per-tile deviations are taken within the transposed tile)."""
    from dla_fast import _env
    from dla_fast.backends.triton import _train as kt

    def gate(value):
        if value is None:
            monkeypatch.delenv("DLA_FAST_TRAIN_STATS_TILE", raising=False)
        else:
            monkeypatch.setenv("DLA_FAST_TRAIN_STATS_TILE", value)
        _env.reload()
        return [kt.stats_swap(k, bn, nrm) for k, bn, nrm in
                (("dense", 128, False), ("dense", 64, False), ("dense", 32, False), ("dense", 128, True),
                 ("flat", 128, False), ("blockdiag", 128, False))]
    try:
        assert gate(None) == gate("channels") == [True, True, False, False, False, False]
        assert gate("pixels") == [False] * 6
        with pytest.raises(ValueError, match="use pixels or channels"):
            gate("rows")
    finally:
        monkeypatch.delenv("DLA_FAST_TRAIN_STATS_TILE", raising=False)
        _env.reload()
    x = torch.randn(2, 8, 6, 5, device=DEV)
    w = torch.randn(16, 8, 3, 3, device=DEV)
    cfg = dict(kt.train_conv_plan(60, 8, 16, 1, 3, 3, torch.float32, False, force="dense", norm=True), SWAP=True)
    vec = [torch.ones(8, device=DEV)] * 3
    with pytest.raises(ValueError, match="without the BN prologue"):
        kt.conv_stats_launch(x, w, (1, 1), (1, 1), 1, vec, True, config=cfg)
    gen = torch.Generator().manual_seed(26)
    x = (300 + torch.randn(2, 16, 9, 9, generator=gen)).to(DEV)
    w = (torch.rand(24, 16, 1, 1, generator=gen) / 8).to(DEV)
    cfg = dict(kt.train_conv_plan(162, 16, 24, 1, 1, 1, torch.float32, False, force="dense"), SWAP=True)
    _, mean, var = kt.conv_stats_launch(x, w, (1, 1), (0, 0), 1, config=cfg)
    _, m64, v64 = ag.conv_stats_torch(x.double(), w.double(), (1, 1), (0, 0), 1, None, False)
    _, me, ve = ag.conv_stats_torch(x, w, (1, 1), (0, 0), 1, None, False)
    assert (m64 / v64.sqrt()).min() > 200
    _judge("large-mean swap mean", mean, me, m64, torch.float32)
    _judge("large-mean swap var", var, ve, v64, torch.float32)


@pytest.mark.interpreter
@needs_kernels
def test_statistics_of_a_large_mean():
    """A channel whose mean is ~500x its spread: the variance from E[z^2] - E[z]^2 in fp32 would be off by
    tens of percent; the per-tile (sum, M2) partials combined by Chan's formula match eager's to fp32 rounding."""
    from dla_fast.backends.triton import _train as kt
    gen = torch.Generator().manual_seed(26)
    x = (300 + torch.randn(2, 16, 9, 9, generator=gen)).to(DEV)
    w = (torch.rand(8, 16, 1, 1, generator=gen) / 8).to(DEV)
    z, mean, var = kt.conv_stats_launch(x, w, (1, 1), (0, 0), 1)
    _, m64, v64 = ag.conv_stats_torch(x.double(), w.double(), (1, 1), (0, 0), 1, None, False)
    _, me, ve = ag.conv_stats_torch(x, w, (1, 1), (0, 0), 1, None, False)
    assert (m64 / v64.sqrt()).min() > 200
    _judge("large-mean mean", mean, me, m64, torch.float32)
    _judge("large-mean var", var, ve, v64, torch.float32)


@pytest.mark.interpreter
@needs_kernels
def test_prologue_chain_normconv():
    """Two layers where the second conv applies the first layer's BN+ReLU as it loads its input (the first
    layer's normalised output is never written): output and every gradient, kernel and torch pieces, against
    the eager conv->bn->relu->conv->bn(+residual)->relu in float64."""
    gen = torch.Generator().manual_seed(15)
    x0 = torch.randn(2, 8, 9, 9, generator=gen)
    w1 = torch.randn(16, 8, 3, 3, generator=gen) * 0.1
    w2 = torch.randn(12, 4, 3, 3, generator=gen) * 0.2     # grouped (4 groups of 4): the block-diagonal walk
    p = [torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen), torch.rand(12, generator=gen) + 0.5,
         torch.randn(12, generator=gen)]
    res0 = torch.randn(2, 12, 5, 5, generator=gen)
    gy = torch.randn(2, 12, 5, 5, generator=gen)

    def run(impl, dt):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        x = _leaf(x0.to(DEV, dt))
        ws = [_leaf(w.to(DEV, dt)) for w in (w1, w2)]
        g1, b1, g2, b2 = [_leaf(t.to(DEV, pd)) for t in p]
        res = _leaf(res0.to(DEV, dt))
        if impl == "eager":
            a1 = torch.relu(F.batch_norm(F.conv2d(x, ws[0], padding=1), None, None, g1, b1, True, 0.0, 1e-5))
            z2 = F.conv2d(a1, ws[1], stride=2, padding=1, groups=4)
            y = torch.relu(F.batch_norm(z2, None, None, g2, b2, True, 0.0, 1e-5) + res)
        else:
            z1, m1, v1 = ag.ConvStats.apply(x, ws[0], (1, 1), (1, 1), 1, impl, None, None, None, None, 0.0, False)
            z2, m2, v2 = ag.ConvStats.apply(z1, ws[1], (2, 2), (1, 1), 4, impl, m1, v1, g1, b1, 1e-5, True)
            y = ag.BnAct.apply(z2, m2, v2, g2, b2, res, 1e-5, True, dt, impl)
        y.backward(gy.to(DEV, y.dtype))
        return [y.detach(), x.grad, ws[0].grad, ws[1].grad, g1.grad, b1.grad, g2.grad, b2.grad, res.grad]

    names = ["y", "dx", "dw1", "dw2", "dgamma1", "dbeta1", "dgamma2", "dbeta2", "dres"]
    ref = run("eager", torch.float64)
    for dt in SMALL_DTYPES:
        eager = run("eager", dt)
        for impl in ("triton", "torch"):
            for n, a, e, r in zip(names, run(impl, dt), eager, ref):
                _judge(f"normconv {impl} {n}", a, e, r, dt)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("mode", [True, "recompute"], ids=["prologue", "recompute"])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_deferred_activation_chain(dtype, mode):
    """``defer=True``: the first layer hands the next conv a :class:`Deferred` (its activation never formed), which
    that conv normalises as it loads it (or, ``"recompute"``, forms in a pass of its own and drops after the
    conv); output, every gradient and both layers' running statistics within 2x
    eager's error against float64, as with the activation formed. A Deferred given to a call that runs eagerly is
    formed first; on the eager backend ``defer`` returns the activation itself."""
    from dla_fast.train.ops import Deferred
    gen = torch.Generator().manual_seed(16)
    x0 = torch.randn(2, 8, 9, 7, generator=gen)
    w1, w2 = torch.randn(16, 8, 1, 1, generator=gen) * 0.3, torch.randn(12, 4, 3, 3, generator=gen) * 0.2
    p = [torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen), torch.rand(12, generator=gen) + 0.5,
         torch.randn(12, generator=gen)]
    gy = torch.randn(2, 12, 5, 4, generator=gen)

    def run(first, second, dt, defer=mode):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        x = _leaf(x0.to(DEV, dt))
        ws = [_leaf(w.to(DEV, dt)) for w in (w1, w2)]
        g1, b1, g2, b2 = [_leaf(t.to(DEV, pd)) for t in p]
        stats = [(torch.zeros(c, device=DEV, dtype=pd), torch.ones(c, device=DEV, dtype=pd),
                  torch.tensor(0, device=DEV)) for c in (16, 12)]
        a = conv_bn_relu_train(x, ws[0], g1, b1, *stats[0], backend=first, defer=defer)
        assert isinstance(a, Deferred) == bool(defer and first == "triton")
        y = conv_bn_relu_train(a, ws[1], g2, b2, *stats[1], stride=2, padding=1, groups=4, backend=second)
        y.backward(gy.to(DEV, y.dtype))
        return [y.detach(), x.grad, ws[0].grad, ws[1].grad, g1.grad, b1.grad, g2.grad, b2.grad,
                *[t for st in stats for t in st[:2]]]

    names = ["y", "dx", "dw1", "dw2", "dgamma1", "dbeta1", "dgamma2", "dbeta2", "rm1", "rv1", "rm2", "rv2"]
    ref = run("eager", "eager", torch.float64)
    eager = run("eager", "eager", dt=dtype)
    chained = run("triton", "triton", dtype)
    formed = run("triton", "triton", dtype, defer=False)
    for n, a, f, e, r in zip(names, chained, formed, eager, ref):
        _judge(f"deferred {n}", a, e, r, dtype)
        _judge(f"formed {n}", f, e, r, dtype)
    for n, a, e, r in zip(names, run("triton", "eager", dtype), eager, ref):  # formed first, then the eager conv
        _judge(f"deferred into eager {n}", a, e, r, dtype)


class AddCounter(TorchDispatchMode):
    """Counts the adds (out of place or in place) of two tensors of ``shape`` (None: of any two 4-D tensors) that
    run while it is active: the sums autograd forms for a tensor with several readers."""

    def __init__(self, shape=None):
        super().__init__()
        self.shape, self.n = None if shape is None else tuple(shape), 0

    def _counted(self, a) -> bool:
        return isinstance(a, torch.Tensor) and (a.dim() == 4 if self.shape is None else tuple(a.shape) == self.shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and all(map(self._counted, args[:2])):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("k,layout", [(1, "cl"), (1, "nchw"), (3, "cl")])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_shared_input_gradient_joins_in_the_dgrad(dtype, k, layout):
    """``share_input=True`` on a 1x1 conv (a bottleneck's first) or a 3x3 one padded by 1 (a basic block's first,
    whose data gradient is the 3x3 conv of dz with the flipped, transposed weight): the second output, x for x's
    other readers (here
    the next layer's residual), is a view of x; x's gradient, the sum of both paths, comes out of the conv's
    data-gradient kernel with the other path's gradient added in its epilogue (no add of x-sized tensors in the
    backward, where without sharing autograd forms one); every quantity within 2x eager's error against
    float64."""
    gen = torch.Generator().manual_seed(23)
    x0 = torch.randn(2, 8, 7, 5, generator=gen)
    w1, w2 = torch.randn(12, 8, k, k, generator=gen) * 0.3 / k, torch.randn(8, 12, 3, 3, generator=gen) * 0.1
    p = [torch.rand(12, generator=gen) + 0.5, torch.randn(12, generator=gen), torch.rand(8, generator=gen) + 0.5,
         torch.randn(8, generator=gen)]
    gy = torch.randn(2, 8, 7, 5, generator=gen)

    def run(backend, dt, share=True):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        x = _leaf(_layout(x0.to(DEV, dt), layout))
        ws = [_leaf(w.to(DEV, dt)) for w in (w1, w2)]
        g1, b1, g2, b2 = [_leaf(t.to(DEV, pd)) for t in p]
        stats = [(torch.zeros(c, device=DEV, dtype=pd), torch.ones(c, device=DEV, dtype=pd),
                  torch.tensor(0, device=DEV)) for c in (12, 8)]
        out = conv_bn_relu_train(x, ws[0], g1, b1, *stats[0], padding=k // 2, backend=backend, share_input=share)
        y1, x2 = out if share else (out, x)
        if backend == "eager":
            assert x2 is x
        elif share:
            assert x2 is not x and x2._base is x and x2.data_ptr() == x.data_ptr()
        y = conv_bn_relu_train(y1, ws[1], g2, b2, *stats[1], padding=1, residual=x2, backend=backend)
        with AddCounter(x.shape) as adds:
            y.backward(gy.to(DEV, y.dtype))
        return [y.detach(), x.grad, ws[0].grad, ws[1].grad, g1.grad, b1.grad, g2.grad, b2.grad,
                *[t for st in stats for t in st[:2]]], adds.n

    names = ["y", "dx", "dw1", "dw2", "dgamma1", "dbeta1", "dgamma2", "dbeta2", "rm1", "rv1", "rm2", "rv2"]
    ref, _ = run("eager", torch.float64)
    eager, _ = run("eager", dtype)
    shared, n_shared = run("triton", dtype)
    plain, n_plain = run("triton", dtype, share=False)
    assert n_plain >= 1, "autograd's sum of x's two gradients was not seen"
    assert n_shared == 0, f"{n_shared} adds of x-sized tensors with the gradient shared"
    for n, a, b, e, r in zip(names, shared, plain, eager, ref):
        _judge(f"shared {n}", a, e, r, dtype)
        _judge(f"not shared {n}", b, e, r, dtype)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("res_layout", ["cl", "strided"])
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_shared_residual_gradient_joins_in_the_bn_backward(dtype, relu, res_layout):
    """``share_residual=True``: the second output, the residual for its later readers (a tree's aggregation
    node), is a view of it; the residual's gradient, the sum of both paths, is written by the BN backward's last
    pass with the later readers' gradient added (no add of residual-sized tensors). Without a ReLU every quantity
    is within 2x eager's error against float64; with one (whose mask flips where the sum rounds across zero, see
    _compare) the shared run equals the unshared one exactly but for the residual's gradient, which is rounded
    once instead of twice."""
    gen = torch.Generator().manual_seed(25)
    x0, r0 = torch.randn(2, 8, 7, 5, generator=gen), torch.randn(2, 12, 7, 5, generator=gen)
    w0 = torch.randn(12, 8, 3, 3, generator=gen) * 0.1
    p = [torch.rand(12, generator=gen) + 0.5, torch.randn(12, generator=gen)]
    gy, gr = torch.randn(2, 12, 7, 5, generator=gen), torch.randn(2, 12, 7, 5, generator=gen)

    def run(backend, dt, share=True):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        x, r, w = _leaf(x0.to(DEV, dt)), _leaf(_layout(r0.to(DEV, dt), res_layout)), _leaf(w0.to(DEV, dt))
        g, b = [_leaf(t.to(DEV, pd)) for t in p]
        stats = (torch.zeros(12, device=DEV, dtype=pd), torch.ones(12, device=DEV, dtype=pd),
                 torch.tensor(0, device=DEV))
        out = conv_bn_relu_train(x, w, g, b, *stats, padding=1, residual=r, relu=relu, backend=backend,
                                 share_residual=share)
        y, r2 = out if share else (out, r)
        if backend == "triton" and share:
            assert r2 is not r and r2._base is r
        with AddCounter(r.shape) as adds:
            torch.autograd.backward([y, r2 * 0.5], [gy.to(DEV, y.dtype), gr.to(DEV, r2.dtype)])
        return [y.detach(), x.grad, r.grad, w.grad, g.grad, b.grad, *stats[:2]], adds.n

    names = ["y", "dx", "dres", "dw", "dgamma", "dbeta", "rm", "rv"]
    shared, n_shared = run("triton", dtype)
    plain, n_plain = run("triton", dtype, share=False)
    assert n_plain >= 1 and n_shared == 0, (n_plain, n_shared)
    if relu:
        for n, a, b in zip(names, shared, plain):
            if n == "dres":  # g + extra rounded once, against round(round(g) + extra): a rounding of each
                e = (gr.to(DEV, dtype) * 0.5).abs().float()
                bound = 2 * torch.finfo(dtype).eps * (b.abs().float() + e) + 1e-6
                assert ((a.float() - b.float()).abs() <= bound).all(), "shared dres beyond a rounding of unshared"
            else:
                assert torch.equal(a, b), f"shared {n} differs from the unshared run"
    else:
        ref, _ = run("eager", torch.float64)
        eager, _ = run("eager", dtype)
        for n, a, b, e, r in zip(names, shared, plain, eager, ref):
            _judge(f"shared {n}", a, e, r, dtype)
            _judge(f"not shared {n}", b, e, r, dtype)
    with pytest.raises(ValueError, match="needs a residual"):
        conv_bn_relu_train(x0.to(DEV), w0.to(DEV), None, None, padding=1, backend="triton", share_residual=True)


@pytest.mark.interpreter
@needs_kernels
def test_shared_input_only_where_the_dgrad_can_take_it():
    """Convs whose data gradient is not a conv of the same size (3x3 unpadded, stride 2, grouped) hand back x
    itself; a Deferred x is refused with a message saying what to do."""
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(DEV).requires_grad_()
    g, b = torch.ones(8, device=DEV), torch.zeros(8, device=DEV)
    for w, kw in ((torch.randn(8, 8, 3, 3, device=DEV), dict(padding=0)), (torch.randn(8, 8, 1, 1, device=DEV),
                  dict(stride=2)), (torch.randn(8, 4, 1, 1, device=DEV), dict(groups=2))):
        y, x2 = conv_bn_relu_train(x, w, g, b, backend="triton", share_input=True, **kw)
        assert x2 is x, kw
    d = conv_bn_relu_train(x, torch.randn(8, 8, 1, 1, device=DEV), g, b, backend="triton", defer=True)
    with pytest.raises(ValueError, match="materialize"):
        conv_bn_relu_train(d, torch.randn(8, 8, 1, 1, device=DEV), g, b, backend="triton", share_input=True)


def _wgrad_eager(dz, x, w, stride, padding):
    return torch.ops.aten.convolution_backward(dz, x, w, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("n,cin,cout,k,stride,hw,dz_layout", [
    (2, 3, 16, 7, 1, (17, 19), "cl"),  # the RGB stem: 7x7, padded by 3
    (1, 16, 16, 3, 1, (20, 21), "nchw"),  # level 0, batch 1, dz not channels_last
    (2, 16, 32, 3, 2, (15, 16), "slice"),  # level 1: stride 2 on an odd side, dz a channel slice
    (3, 5, 24, 3, 2, (9, 7), "cl"),  # output channels not a multiple of 16, odd input channels
    (2, 16, 40, 1, 1, (6, 5), "cl"),  # a 1x1 conv, two output-channel blocks
], ids=["stem", "level0", "level1", "odd", "1x1"])
@pytest.mark.parametrize("idx64", [False, True], ids=["i32", "i64"])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_thin_conv_weight_gradient(dtype, idx64, n, cin, cout, k, stride, hw, dz_layout, monkeypatch):
    """The thin convs' weight gradient (split-pixel partials summed in a fixed order) against float64, within
    2x the error of ATen's in the same dtype, with 32- and 64-bit offsets; returned in the weight's dtype and
    memory format, and the same bits on a second call."""
    from dla_fast.backends.triton import _train as kt

    if idx64:
        monkeypatch.setattr(kt, "_IDX64_THRESHOLD", 0)
    gen = torch.Generator().manual_seed(31 + cin + k)
    pad = k // 2
    ho, wo = (hw[0] + 2 * pad - k) // stride + 1, (hw[1] + 2 * pad - k) // stride + 1
    x = torch.randn(n, cin, *hw, generator=gen).to(DEV, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, generator=gen) * 0.2).to(DEV, dtype).contiguous(
        memory_format=torch.channels_last)
    dz = _layout(torch.randn(n, cout, ho, wo, generator=gen).to(DEV, dtype), dz_layout)
    assert kt.wgrad_thin_ok(w.shape, 1)
    got = kt.wgrad_thin_launch(dz, x, w, (stride, stride), (pad, pad))
    assert got.dtype == dtype and got.shape == w.shape and got.stride() == w.stride()
    ref = _wgrad_eager(dz.double(), x.double(), w.double(), (stride, stride), (pad, pad))
    _judge("dw", got, _wgrad_eager(dz, x, w, (stride, stride), (pad, pad)), ref, dtype)
    assert torch.equal(got, kt.wgrad_thin_launch(dz, x, w, (stride, stride), (pad, pad)))


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("case", ["slice", "rgb_unpadded", "rgb_slice", "odd_slice", "per_row_stem", "per_row_s2",
                                  "per_row_slice"])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_thin_conv_weight_gradient_input_layouts(dtype, case, monkeypatch):
    """x's other layouts: a channel slice of a wider NHWC tensor (a pixel's kernel row is then not one run of
    x; also with a channel count that does not divide the tile's width), the RGB stem without its channels padded
    to four, and an RGB slice (padded into a copy); and each kernel row a program of its own (WGRAD_ROW_PROGRAMS:
    the stem, a stride-2 conv, a channel slice of x). Within 2x ATen's error against float64. The pixel chunks
    tile DLA's sides without padding."""
    from dla_fast.backends.triton import _train as kt

    assert kt._wgrad_tile(224, 224, 128) == (4, 32) and kt._wgrad_tile(112, 112, 128) == (8, 16)
    if case == "rgb_unpadded":
        monkeypatch.setattr(kt, "WGRAD_PAD_CIN", False)
    monkeypatch.setattr(kt, "WGRAD_ROW_PROGRAMS", case.startswith("per_row"))
    cin, k, stride, pitch, lo = {"slice": (16, 3, 1, 24, 4), "rgb_unpadded": (3, 7, 1, 3, 0),
                                 "rgb_slice": (3, 7, 1, 5, 1), "odd_slice": (12, 5, 1, 20, 3),
                                 "per_row_stem": (3, 7, 1, 3, 0), "per_row_s2": (16, 3, 2, 16, 0),
                                 "per_row_slice": (12, 5, 1, 20, 3)}[case]
    gen = torch.Generator().manual_seed(47 + pitch)
    wide = torch.randn(2, pitch, 12, 11, generator=gen).to(DEV, dtype).contiguous(memory_format=torch.channels_last)
    x = wide[:, lo:lo + cin]
    w = (torch.randn(16, cin, k, k, generator=gen) * 0.2).to(DEV, dtype).contiguous(memory_format=torch.channels_last)
    p = (k // 2, k // 2)
    ho, wo = (12 + 2 * p[0] - k) // stride + 1, (11 + 2 * p[1] - k) // stride + 1
    dz = torch.randn(2, 16, ho, wo, generator=gen).to(DEV, dtype).contiguous(memory_format=torch.channels_last)
    got = kt.wgrad_thin_launch(dz, x, w, (stride, stride), p)
    ref = _wgrad_eager(dz.double(), x.double(), w.double(), (stride, stride), p)
    _judge("dw", got, _wgrad_eager(dz, x, w, (stride, stride), p), ref, dtype)


@pytest.mark.interpreter
@needs_kernels
def test_thin_conv_weight_gradient_refuses_what_it_does_not_take():
    """The gate keeps to the front's thin convs; the launcher names what is wrong with a conv it does not take,
    and gives an empty batch a zero gradient."""
    from dla_fast.backends.triton import _train as kt

    assert kt.wgrad_thin_ok((16, 3, 7, 7), 1) and kt.wgrad_thin_ok((32, 16, 3, 3), 1)
    assert not kt.wgrad_thin_ok((64, 32, 3, 3), 1)  # wider input: the implicit GEMMs do well there
    assert not kt.wgrad_thin_ok((128, 16, 3, 3), 1)  # more than one 64-wide tile of outputs
    assert not kt.wgrad_thin_ok((16, 8, 3, 3), 2)  # grouped
    x = torch.randn(1, 32, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="not a conv it takes"):
        kt.wgrad_thin_launch(torch.randn(1, 64, 8, 8, device=DEV), x, torch.randn(64, 32, 3, 3, device=DEV),
                             (1, 1), (1, 1))
    w = torch.randn(16, 3, 7, 7, device=DEV)
    empty = kt.wgrad_thin_launch(torch.randn(0, 16, 8, 8, device=DEV), torch.randn(0, 3, 8, 8, device=DEV), w,
                                 (1, 1), (3, 3))
    assert torch.equal(empty, torch.zeros_like(w))  # an empty batch: a zero gradient, no launch
    x = torch.randn(1, 16, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="not the conv's output shape"):
        kt.wgrad_thin_launch(torch.randn(1, 16, 8, 8, device=DEV), x, torch.randn(16, 16, 3, 3, device=DEV),
                             (2, 2), (1, 1))


def _layer_under_switch(monkeypatch, dtype, var: str, module, attr: str, cin: int, k: int, seed: int, x_grad: bool):
    """A conv(cin -> 16, k x k) + BN + ReLU layer on a 13x11 input, its backward run on the Triton path with the
    switch ``var`` unset, aten and triton; every quantity (x's gradient too with ``x_grad``) within 2x eager's
    error against float64. Returns ({setting: calls of module.attr in that run}, the run function)."""
    from dla_fast import _env

    gen = torch.Generator().manual_seed(seed)
    x0, w0 = torch.randn(2, cin, 13, 11, generator=gen), torch.randn(16, cin, k, k, generator=gen) * 0.1
    gy = torch.randn(2, 16, 13, 11, generator=gen)
    calls = []
    real = getattr(module, attr)

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(module, attr, counted)

    def run(backend, dt):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        x = x0.to(DEV, dt).contiguous(memory_format=torch.channels_last)
        x = _leaf(x) if x_grad else x
        w = _leaf(w0.to(DEV, dt).contiguous(memory_format=torch.channels_last))
        g, b = _leaf(torch.ones(16, device=DEV, dtype=pd)), _leaf(torch.zeros(16, device=DEV, dtype=pd))
        y = conv_bn_relu_train(x, w, g, b, padding=k // 2, backend=backend)
        y.backward(gy.to(DEV, y.dtype))
        return [y.detach(), w.grad, g.grad, b.grad] + ([x.grad] if x_grad else [])

    names = ["y", "dw", "dgamma", "dbeta"] + (["dx"] if x_grad else [])
    ref, eager = run("eager", torch.float64), run("eager", dtype)
    launches = {}
    for mode in (None, "aten", "triton"):
        if mode is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, mode)
        _env.reload()
        calls.clear()
        got = run("triton", dtype)
        launches[mode] = len(calls)
        for name, a, e, r in zip(names, got, eager, ref):
            _judge(f"{var}={mode} {name}", a, e, r, dtype)
    return launches, run


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_thin_wgrad_in_the_training_layer(dtype, monkeypatch):
    """DLA_FAST_TRAIN_WGRAD: a stem-like layer's weight gradient comes from the thin-conv kernel (seen called)
    with triton, and unset on a GPU (the default; unset under the interpreter keeps ATen's), every quantity within
    2x eager's error against float64; aten keeps ATen's; another value is refused, saying which are valid."""
    from dla_fast import _env
    from dla_fast.backends.triton import _train as kt

    launches, run = _layer_under_switch(monkeypatch, dtype, "DLA_FAST_TRAIN_WGRAD", kt, "wgrad_thin_launch", 3, 7,
                                        37, x_grad=False)
    assert launches == {None: int(DEV == "cuda"), "aten": 0, "triton": 1}, launches
    monkeypatch.setenv("DLA_FAST_TRAIN_WGRAD", "cudnn")
    _env.reload()
    with pytest.raises(ValueError, match="use aten or triton"):
        run("triton", dtype)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_thin_dgrad_in_the_training_layer(dtype, monkeypatch):
    """DLA_FAST_TRAIN_DGRAD: a level-0-like layer's data gradient (3x3, 16 channels, stride 1) comes from the
    Triton conv kernel on the flipped weight (seen launched) with triton, and unset on a GPU (the default; unset
    under the interpreter keeps ATen's), every quantity within 2x eager's error against float64; aten keeps
    ATen's; the gate leaves strided, wider and grouped convs to ATen."""
    from dla_fast import _env
    from dla_fast.backends.triton import _launch
    from dla_fast.train import _autograd as ag

    launches, _ = _layer_under_switch(monkeypatch, dtype, "DLA_FAST_TRAIN_DGRAD", _launch, "conv_launch", 16, 3, 41,
                                      x_grad=True)
    assert launches == {None: int(DEV == "cuda"), "aten": 0, "triton": 1}, launches
    monkeypatch.setenv("DLA_FAST_TRAIN_DGRAD", "triton")
    _env.reload()
    x16, x32 = torch.empty(2, 16, 8, 8, device=DEV), torch.empty(2, 32, 8, 8, device=DEV)
    assert ag.thin_dgrad(x16, torch.empty(16, 16, 3, 3, device=DEV), (1, 1), (1, 1), 1)
    assert not ag.thin_dgrad(x16, torch.empty(32, 16, 3, 3, device=DEV), (2, 2), (1, 1), 1)  # strided (level 1)
    assert not ag.thin_dgrad(x32, torch.empty(32, 32, 3, 3, device=DEV), (1, 1), (1, 1), 1)  # wider input
    assert not ag.thin_dgrad(x16, torch.empty(16, 8, 3, 3, device=DEV), (1, 1), (1, 1), 2)  # grouped
    monkeypatch.setenv("DLA_FAST_TRAIN_DGRAD", "aten")
    _env.reload()
    assert not ag.thin_dgrad(x16, torch.empty(16, 16, 3, 3, device=DEV), (1, 1), (1, 1), 1)  # turned off


@pytest.mark.interpreter
@needs_kernels
def test_backward_kernels_match_torch_pieces():
    """The Triton BN+ReLU backward (two passes) and BN apply against their torch formulas, on a channels_last
    slice input and a strided gradient, with and without ReLU mask and residual gradient; without a residual,
    the mask recomputed from z (``relu_coef``) gives what the mask read from y gives."""
    from dla_fast.backends.triton import _train as kt
    gen = torch.Generator().manual_seed(16)
    z = _layout((torch.randn(2, 20, 7, 9, generator=gen) * 3 + 1).to(DEV), "slice")
    grad = _layout(torch.randn(2, 20, 7, 9, generator=gen).to(DEV), "strided")
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    rstd = torch.rsqrt(var + 1e-5)
    gamma, beta = (torch.rand(20, generator=gen) + 0.5).to(DEV), torch.randn(20, generator=gen).to(DEV)
    res = _layout(torch.randn(2, 20, 7, 9, generator=gen).to(DEV), "strided")
    for relu in (True, False):
        for r in (None, res):
            y = kt.bn_act_launch(z, mean, gamma * rstd, beta, r, relu, torch.float32)
            y_t = ag.bn_act_torch(z, mean, gamma * rstd, beta, r, relu, torch.float32)
            torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
            want = ag.bn_backward_torch(grad, y_t if relu else None, z, mean, rstd, gamma,
                                        None if r is None else r.dtype)
            # 126 rows: 4 tiles of 32 under the interpreter; 3 tiles a reduce program leaves a partial second
            # program whose last two tiles lie wholly past the end.
            for row_tiles in (None, 3):
                got = kt.bn_backward_launch(grad, y if relu else None, z, mean, rstd, gamma,
                                            None if r is None else r.dtype, row_tiles=row_tiles)
                for a, b in zip(got, want):
                    if b is None:
                        assert a is None
                    else:
                        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            if relu and r is None:
                coef = (gamma * rstd, beta)
                # got's row grouping (the loop's last), so that both sum their tiles in the same order
                from_z = kt.bn_backward_launch(grad, None, z, mean, rstd, gamma, None, relu_coef=coef,
                                               row_tiles=row_tiles)
                from_z_t = ag.bn_backward_torch(grad, None, z, mean, rstd, gamma, None, coef)
                for a, b, c in zip(from_z[:3], got[:3], from_z_t[:3]):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
                    torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5)
                with pytest.raises(ValueError, match="as y or as relu_coef, not both"):
                    kt.bn_backward_launch(grad, y, z, mean, rstd, gamma, None, relu_coef=coef)


@needs_kernels
def test_reduce_row_tiles_from_shape():
    """BN backward's reduce programs sum a power of two of row tiles, as many as still leave REDUCE_PROGRAMS
    programs, at most REDUCE_MAX_ROW_TILES; a launch asking for fewer than one is refused."""
    from dla_fast.backends.triton import _train as kt
    assert kt._reduce_row_tiles(100, 1) == 1
    # dla102's 56x56 64-channel layers at batch 256: 25088 tiles of 32 rows, one channel block.
    assert kt._reduce_row_tiles(25088, 1) == 16
    assert -(-25088 // 16) >= kt.REDUCE_PROGRAMS > -(-25088 // 32)
    assert kt._reduce_row_tiles(10 ** 7, 4) == kt.REDUCE_MAX_ROW_TILES
    z = torch.randn(1, 4, 3, 3, device=DEV)
    one = torch.ones(4, device=DEV)
    with pytest.raises(ValueError, match="row_tiles must be >= 1"):
        kt.bn_backward_launch(z, None, z, one, one, None, None, row_tiles=0)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("chunk_rows", [1, 3, 10**6], ids=["chunk1", "chunk3", "onestage"])
def test_finalize_in_chunks(monkeypatch, chunk_rows):
    """The two-stage finalize of the [tiles, C] workspaces (a first stage over chunks of rows, then the chunks),
    forced onto small shapes by a small chunk size: uneven chunks and a partial last tile give the statistics
    and BN backward's sums of the one-stage combination, within fp32 rounding, against float64."""
    from dla_fast.backends.triton import _train as kt
    monkeypatch.setattr(kt, "FINAL_CHUNK_ROWS", chunk_rows)
    gen = torch.Generator().manual_seed(27)
    x = (torch.randn(2, 12, 15, 15, generator=gen) * 2 + 40).to(DEV)  # 450 pixels: a partial last tile
    w = (torch.randn(20, 12, 1, 1, generator=gen) / 4).to(DEV)
    T = -(-450 // kt.train_conv_plan(450, 12, 20, 1, 1, 1, torch.float32, False)["BLOCK_M"])
    assert T > 3, T
    z, mean, var = kt.conv_stats_launch(x, w, (1, 1), (0, 0), 1)
    _, m64, v64 = ag.conv_stats_torch(x.double(), w.double(), (1, 1), (0, 0), 1, None, False)
    _, me, ve = ag.conv_stats_torch(x, w, (1, 1), (0, 0), 1, None, False)
    _judge(f"chunks={chunk_rows} mean", mean, me, m64, torch.float32)
    _judge(f"chunks={chunk_rows} var", var, ve, v64, torch.float32)
    grad = torch.randn(2, 20, 15, 15, generator=gen).to(DEV)
    rstd = torch.rsqrt(var + 1e-5)
    gamma = (torch.rand(20, generator=gen) + 0.5).to(DEV)
    y = kt.bn_act_launch(z, mean, gamma * rstd, torch.zeros_like(mean), None, True, torch.float32)
    got = kt.bn_backward_launch(grad, y, z, mean, rstd, gamma, None)
    ref = ag.bn_backward_torch(grad.double(), y.double(), z.double(), mean.double(), rstd.double(), gamma.double(),
                               None)
    eager = ag.bn_backward_torch(grad, y, z, mean, rstd, gamma, None)
    for n, a, e, r in zip(("dz", "dgamma", "dbeta"), got, eager, ref):
        _judge(f"chunks={chunk_rows} {n}", a, e, r, torch.float32)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("layout", ["cl", "slice"])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_tensor_stats_kernel(layout, dtype):
    """The statistics pass over an existing conv output (what follows the CUDA stem): mean and biased variance
    of a channels_last tensor and of a channel slice of one, a large-mean channel included, against float64."""
    from dla_fast.backends.triton import _train as kt
    gen = torch.Generator().manual_seed(28)
    z0 = torch.randn(3, 20, 11, 13, generator=gen) * 2
    z0[:, 3] += 200
    z = _layout(z0.to(DEV, dtype), layout)
    mean, var = kt.tensor_stats_launch(z)
    z64 = z.double()
    me, ve = z.float().mean((0, 2, 3)), z.float().var((0, 2, 3), unbiased=False)
    _judge(f"{layout} mean", mean, me, z64.mean((0, 2, 3)), dtype)
    _judge(f"{layout} var", var, ve, z64.var((0, 2, 3), unbiased=False), dtype)
    with pytest.raises(ValueError, match="channels_last"):
        kt.tensor_stats_launch(z0.to(DEV, dtype).permute(0, 1, 3, 2))


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_bn_fold_in_the_final_launch(affine):
    """The statistics' final launch finishing the layer's BN (``BnFold``): rstd, scale = gamma * rstd, the running
    statistics (momentum, unbiased variance) and the counter, from the conv kernel, from the statistics pass over
    an existing tensor (the CUDA stem's path) and by torch ops (``impl="torch"``), against the same formulas in
    float64 on the returned batch statistics."""
    from dla_fast.backends.triton import _train as kt
    gen = torch.Generator().manual_seed(33)
    x = torch.randn(3, 8, 9, 7, generator=gen).to(DEV)
    w = (torch.randn(12, 8, 3, 3, generator=gen) * 0.2).to(DEV)
    gamma = (torch.rand(12, generator=gen) + 0.5).to(DEV) if affine else None
    rm0, rv0 = torch.randn(12, generator=gen).to(DEV), (torch.rand(12, generator=gen) + 0.5).to(DEV)
    count = 3 * 9 * 7

    def fold():
        if not affine:  # track_running_stats=False as well: nothing to update
            return kt.BnFold(None, 1e-3, None, None, None, 0.1, count)
        return kt.BnFold(gamma, 1e-3, rm0.clone(), rv0.clone(), torch.tensor(5, device=DEV), 0.1, count)

    runs = {}
    for impl in ("triton", "torch"):
        f = fold()
        runs[impl] = (ag.ConvStats.apply(x, w, (1, 1), (1, 1), 1, impl, None, None, None, None, 0.0, False, f), f)
    z = runs["triton"][0][0]
    f = fold()
    runs["stats pass"] = ((z, *kt.tensor_stats_launch(z, fold=f)), f)
    for what, ((_, mean, var, rstd, scale), f) in runs.items():
        m, v = mean.double(), var.double()
        r = 1 / (v + 1e-3).sqrt()
        torch.testing.assert_close(rstd.double(), r, rtol=1e-6, atol=0, msg=what)
        torch.testing.assert_close(scale.double(), r * (gamma.double() if affine else 1), rtol=1e-6, atol=0,
                                   msg=what)
        if affine:
            torch.testing.assert_close(f.running_mean.double(), rm0.double() + 0.1 * (m - rm0.double()), rtol=1e-6,
                                       atol=1e-7, msg=what)
            torch.testing.assert_close(f.running_var.double(),
                                       rv0.double() + 0.1 * (v * count / (count - 1) - rv0.double()), rtol=1e-6,
                                       atol=1e-7, msg=what)
            assert int(f.num_batches_tracked) == 6, what


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("k,hw,layout", [(2, (8, 6), "cl"), (2, (9, 7), "nchw"), (3, (10, 11), "slice")])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
def test_max_pool_forward_backward(k, hw, layout, dtype):
    """The trees' max pool on the kernels (``MaxPool``: no indices stored, each window's winner found again in
    the backward) against F.max_pool2d's forward and backward, exactly: inputs drawn from 3 values, so most
    windows tie (the first maximum wins, as in torch), a NaN and an all -inf window, odd sizes (floor mode leaves
    rows and columns without gradient), a non-contiguous output gradient."""
    gen = torch.Generator().manual_seed(31)
    x0 = torch.randint(-1, 2, (3, 20, *hw), generator=gen).float()
    x0[0, 1, 0, 0] = float("nan")
    x0[1, 2, :k, :k] = float("-inf")
    x = _layout(x0.to(DEV, dtype), layout)
    g = torch.randn(3, 20, hw[1] // k, hw[0] // k, generator=gen).to(DEV, dtype).transpose(2, 3)
    xr = x.detach().clone().requires_grad_(True)
    yr = F.max_pool2d(xr, k, k)
    yr.backward(g)
    xa = x.detach().clone().requires_grad_(True)
    ya = ag.MaxPool.apply(xa, k)
    ya.backward(g)
    torch.testing.assert_close(ya, yr, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=0, atol=0)
    from dla_fast.backends.triton import _train as kt
    dx = kt.max_pool_backward_launch(x, g, k)
    assert dx.is_contiguous(memory_format=torch.channels_last) and dx.dtype == dtype
    torch.testing.assert_close(dx, xr.grad, rtol=0, atol=0)
    # Shared: x's other readers' gradient (a non-contiguous one) added as the pass writes, the floor mode's
    # leftover rows and columns included; no separate add of x-sized tensors.
    e = torch.randn(3, 20, hw[1], hw[0], generator=gen).to(DEV, dtype).transpose(2, 3)
    xs = x.detach().clone().requires_grad_(True)
    ys, x2 = ag.MaxPool.apply(xs, k, True)
    assert x2._base is xs
    with AddCounter(xs.shape) as adds:
        torch.autograd.backward([ys, x2], [g, e])
    assert adds.n == 0
    torch.testing.assert_close(xs.grad, (xr.grad.float() + e.float()).to(dtype), rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", ["stem", "1x1", "3x3", "grouped_s2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_ID)
def test_statistics_pass_on_the_cuda_conv_cuda(dtype, case, monkeypatch):
    """The CUDA extension's conv plus the statistics pass: the stem (3 -> 16 channels, 7x7) always where the
    extension is built, other convs only with DLA_FAST_TRAIN_STATS_PASS=all; z, mean and variance judged against
    float64 like the Triton kernel's; never with a BN prologue or in fp32."""
    from dla_fast import _env
    from dla_fast.backends import cuda
    cin, cout, k, stride, groups = {"stem": (3, 16, 7, 1, 1), "1x1": (128, 128, 1, 1, 1), "3x3": (32, 64, 3, 1, 1),
                                    "grouped_s2": (64, 64, 3, 2, 8)}[case]
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(4, cin, 31, 29, generator=gen).cuda().to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin // groups, k, k, generator=gen) * 0.1).cuda().to(dtype)
    built = cuda.unavailable_reason(x) is None
    monkeypatch.delenv("DLA_FAST_TRAIN_STATS_PASS", raising=False)
    _env.reload()
    assert ag.conv_on_cuda(x, w, groups, None) == (built and case == "stem")
    monkeypatch.setenv("DLA_FAST_TRAIN_STATS_PASS", "all")
    _env.reload()
    try:
        assert ag.conv_on_cuda(x, w, groups, None) == built
        assert not ag.conv_on_cuda(x, w, groups, (w, w, w)) and not ag.conv_on_cuda(x.float(), w.float(), groups, None)
        args = ((stride, stride), (k // 2, k // 2), groups, None, False)
        z, mean, var = ag.conv_stats("triton", x, w, *args)
        z64, m64, v64 = ag.conv_stats_torch(x.double(), w.double(), *args)
        ze, me, ve = ag.conv_stats_torch(x, w, *args)
    finally:
        monkeypatch.delenv("DLA_FAST_TRAIN_STATS_PASS")
        _env.reload()
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    for n, a, e, r in (("z", z, ze, z64), ("mean", mean, me, m64), ("var", var, ve, v64)):
        _judge(f"{case} {n}", a, e, r, dtype)


@pytest.mark.interpreter
@needs_kernels
def test_64bit_offsets(monkeypatch):
    """The IDX64 variants of every training kernel (used when a tensor spans >= 2^31 elements)."""
    from dla_fast.backends.triton import _train as kt
    monkeypatch.setattr(kt, "_IDX64_THRESHOLD", 0)
    _compare(Case(2, 16, 16, 7, 5, 3, 1, 1, 4, residual=True, seed=17), torch.float32, "idx64 grouped")
    _compare(Case(1, 20, 24, 7, 5, 3, 2, 1, 1, seed=18), torch.float16, "idx64 dense")


@pytest.mark.interpreter
@needs_kernels
def test_autocast_fp16():
    """Under torch.autocast the conv runs in the autocast dtype, the statistics in fp32, gradients reach the
    fp32 parameters in fp32, and a fp32 residual promotes the output to fp32, as eagerly."""
    c = Case(2, 8, 12, 9, 9, 3, 1, 1, 1, residual=True, seed=19)

    def run(backend, autocast, dt=torch.float32):
        # The float64 reference sees the operands the autocast conv sees: x and w rounded to fp16.
        lowp = (lambda t: t.half().to(dt)) if dt == torch.float64 else (lambda t: t)
        x, w = _leaf(lowp(c.x)), _leaf(lowp(c.w))
        gamma, beta, res = (_leaf(t.to(dt)) for t in (c.gamma, c.beta, c.res))
        rm, rv, n = c.rm.to(dt).clone(), c.rv.to(dt).clone(), torch.tensor(0, device=DEV)
        with torch.autocast(DEV, dtype=torch.float16, enabled=autocast):
            y = conv_bn_relu_train(x, w, gamma, beta, rm, rv, n, stride=1, padding=1, residual=res,
                                   backend=backend)
        y.backward(c.gy.to(y.dtype))
        return dict(y=y.detach(), dx=x.grad, dw=w.grad, dgamma=gamma.grad, dbeta=beta.grad, dres=res.grad,
                    running_mean=rm, running_var=rv)

    ours, eager, ref = run("triton", True), run("eager", True), run("eager", False, torch.float64)
    for k in ours:
        assert ours[k].dtype == eager[k].dtype, k
        _judge(f"autocast {k}", ours[k], eager[k], ref[k], torch.float16)
    assert ours["y"].dtype == torch.float32 and ours["dw"].dtype == torch.float32


# ------------------------------------------------------------------------------------------- gradcheck

def test_gradcheck_torch_pieces_float64():
    """The hand-written backward of ConvStats (with and without the prologue) and BnAct (ReLU, residual),
    through their torch implementations in float64, against finite differences."""
    gen = torch.Generator().manual_seed(21)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 4, 5, 4, generator=gen, **d).requires_grad_()
    w1 = (torch.randn(6, 4, 3, 3, generator=gen, **d) * 0.3).requires_grad_()
    w2 = (torch.randn(6, 3, 1, 1, generator=gen, **d) * 0.5).requires_grad_()
    g1, b1, g2, b2 = [(torch.rand(6, generator=gen, **d) + 0.5).requires_grad_() for _ in range(4)]
    res = torch.randn(2, 6, 3, 2, generator=gen, **d).requires_grad_()

    def layer(x, w1, w2, g1, b1, g2, b2, res):
        z1, m1, v1 = ag.ConvStats.apply(x, w1, (1, 1), (1, 1), 1, "torch", None, None, None, None, 0.0, False)
        z2, m2, v2 = ag.ConvStats.apply(z1, w2, (2, 2), (0, 0), 2, "torch", m1, v1, g1, b1, 1e-5, True)
        return ag.BnAct.apply(z2, m2, v2, g2, b2, res, 1e-5, True, torch.float64, "torch")

    assert torch.autograd.gradcheck(layer, (x, w1, w2, g1, b1, g2, b2, res), eps=1e-6, atol=1e-6, rtol=1e-4)

    def no_relu_no_affine(x, w1):
        z, m, v = ag.ConvStats.apply(x, w1, (1, 1), (1, 1), 1, "torch", None, None, None, None, 0.0, False)
        return ag.BnAct.apply(z, m, v, None, None, None, 1e-5, False, torch.float64, "torch")

    assert torch.autograd.gradcheck(no_relu_no_affine, (x, w1), eps=1e-6, atol=1e-6, rtol=1e-4)

    def shared(x, w, g, b):  # a conv sharing x with the residual of the BN after it, which shares it on
        p = w.shape[-1] // 2
        z, m, v, xs = ag.ConvStats.apply(x, w, (1, 1), (p, p), 1, "torch", None, None, None, None, 0.0, False, None,
                                         None, True, True)
        y, xs2 = ag.BnAct.apply(z, m, v, g, b, xs, 1e-5, True, torch.float64, "torch", None, True)
        return y, xs2 * xs2

    for k in (1, 3):
        w3 = (torch.randn(4, 4, k, k, generator=gen, **d) * 0.5 / k).requires_grad_()
        assert torch.autograd.gradcheck(shared, (x, w3, g1[:4], b1[:4]), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_double_backward_is_refused():
    """The hand-written backwards are first-order only: asking for a second derivative raises."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    z, m, v = ag.ConvStats.apply(x, w, (1, 1), (1, 1), 1, "torch", None, None, None, None, 0.0, False)
    y = ag.BnAct.apply(z, m, v, None, None, None, 1e-5, True, torch.float64, "torch")
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_gradcheck_eager_reference_float64():
    """The eager reference (the fallback) is differentiable in every input, float64 finite differences."""
    gen = torch.Generator().manual_seed(22)
    d = dict(dtype=torch.float64)
    args = [torch.randn(2, 4, 4, 5, generator=gen, **d), torch.randn(6, 2, 3, 3, generator=gen, **d) * 0.3,
            torch.rand(6, generator=gen, **d) + 0.5, torch.randn(6, generator=gen, **d),
            torch.randn(2, 6, 4, 5, generator=gen, **d)]
    args = [a.requires_grad_() for a in args]

    def f(x, w, g, b, r):
        return conv_bn_relu_train(x, w, g, b, None, None, None, stride=1, padding=1, groups=2, residual=r,
                                  backend="eager")

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------ the module

def _pair(cin=8, cout=12, k=3, stride=1, groups=1, seed=0, **conv_kw):
    torch.manual_seed(seed)
    conv_kw = dict(dict(stride=stride, padding=k // 2, groups=groups, bias=False), **conv_kw)
    conv = nn.Conv2d(cin, cout, k, **conv_kw)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return conv, bn


def test_module_shares_parameters_and_state_dict():
    conv, bn = _pair()
    m = TrainConvBnAct(conv, bn)
    assert m.conv is conv and m.bn is bn
    assert [p is q for p, q in zip(m.parameters(), [conv.weight, bn.weight, bn.bias])] == [True] * 3
    sd = m.state_dict()
    assert set(sd) == {f"conv.{k}" for k in conv.state_dict()} | {f"bn.{k}" for k in bn.state_dict()}
    assert sd["conv.weight"].data_ptr() == conv.weight.data_ptr()
    assert sd["bn.running_mean"].data_ptr() == bn.running_mean.data_ptr()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(2, 8, 5, 5)).sum().backward()
    before = conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(conv.weight, before)  # the optimizer stepped the user's own conv weight


def test_module_fallback_on_plain_cpu_is_the_eager_modules():
    """backend='auto' keeps the CPU on the eager modules: bit-identical output, gradients and running
    statistics to conv -> bn -> relu, in training and eval."""
    conv, bn = _pair(seed=1)
    conv2, bn2 = _pair(seed=1)
    m = TrainConvBnAct(conv, bn)
    x = torch.randn(2, 8, 7, 7)
    r = torch.randn(2, 12, 7, 7)
    assert "CUDA" in m.fallback_reason(x)
    for train in (True, False):
        m.train(train)
        conv2.train(train)
        bn2.train(train)
        y = m(x, r)
        y2 = torch.relu(bn2(conv2(x)) + r)
        assert torch.equal(y, y2)
        y.sum().backward()
        y2.sum().backward()
        assert torch.equal(conv.weight.grad, conv2.weight.grad) and torch.equal(bn.weight.grad, bn2.weight.grad)
        assert torch.equal(bn.running_mean, bn2.running_mean) and torch.equal(bn.running_var, bn2.running_var)
        assert bn.num_batches_tracked.item() == bn2.num_batches_tracked.item() == 1


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_module_fused_training_steps(momentum, dtype):
    """TrainConvBnAct(backend='triton') against the user's own modules over two SGD steps: outputs, gradients,
    the parameters after each step, running statistics and counter; eval() then gives the eager eval output
    exactly (it is the eager computation)."""
    def build(dt):
        conv, bn = _pair(groups=2, seed=2)
        bn.momentum = momentum
        conv.to(DEV, dt)
        bn.to(DEV, torch.float64 if dt == torch.float64 else torch.float32)
        return conv, bn

    xs = [torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(30 + i)).to(DEV) for i in range(2)]
    runs = {}
    for kind, dt in (("fused", dtype), ("eager", dtype), ("eager", torch.float64)):
        conv, bn = build(dt)
        m = TrainConvBnAct(conv, bn, backend="triton" if kind == "fused" else "eager")
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        snaps = []
        for x in xs:
            x = x.to(dt)
            y = m(x)
            # A loss whose gradient vanishes at y = 0: ReLU's kink cannot flip a gradient element (see _compare).
            (y.double().square() * torch.linspace(-1, 1, y.numel(), device=y.device,
                                                  dtype=torch.float64).view(y.shape)).sum().backward()
            snaps.append(dict(y=y.detach(), dw=conv.weight.grad.clone(), dgamma=bn.weight.grad.clone(),
                              dbeta=bn.bias.grad.clone(), rm=bn.running_mean.clone(), rv=bn.running_var.clone()))
            opt.step()
            opt.zero_grad()
            snaps[-1].update(w=conv.weight.detach().clone(), gamma=bn.weight.detach().clone())
        assert bn.num_batches_tracked.item() == 2
        m.eval()
        xe = xs[0].to(dt)
        snaps.append(dict(eval=m(xe)))
        assert torch.equal(snaps[-1]["eval"], torch.relu(bn(conv(xe))))
        runs[(kind, dt)] = snaps
    ours, eager, ref = runs[("fused", dtype)], runs[("eager", dtype)], runs[("eager", torch.float64)]
    for step in range(2):
        for k in ours[step]:
            _judge(f"module step {step} {k}", ours[step][k], eager[step][k], ref[step][k], dtype)
    _judge("module eval", ours[2]["eval"], eager[2]["eval"], ref[2]["eval"], dtype)


@pytest.mark.interpreter
@needs_kernels
def test_module_falls_back_on_unsupported_convs():
    """Convs the kernels do not take run eagerly under 'auto' (with the reason) and are refused under 'triton'."""
    x = torch.randn(2, 8, 7, 7)
    cases = [
        (dict(bias=True), "bias"),
        (dict(dilation=2), "dilated"),
        (dict(padding_mode="reflect"), "reflect"),
    ]
    for kw, word in cases:
        conv, bn = _pair(**kw)
        why = TrainConvBnAct(conv, bn).fallback_reason(x)
        assert word in why, why
        m = TrainConvBnAct(conv, bn, backend="triton")
        with pytest.raises(RuntimeError, match=word):
            m(x)
        m.backend = "auto"
        conv2, bn2 = _pair(**kw)
        assert torch.equal(m(x), torch.relu(bn2(conv2(x))))
    # very wide groups against narrow ones: no statistics kernel
    conv = nn.Conv2d(4, 2 * 160, 1, groups=2, bias=False).to(DEV)
    why = TrainConvBnAct(conv, nn.BatchNorm2d(320).to(DEV), backend="triton").fallback_reason(
        torch.randn(2, 4, 3, 3, device=DEV))
    assert "groups=2" in why
    # float64 has no kernel
    conv, bn = _pair()
    m = TrainConvBnAct(conv.double(), bn.double(), backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        m(x.double())
    # a single value per channel: eager, which raises BatchNorm's own error
    m = TrainConvBnAct(*_pair(k=1), backend="auto")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 8, 1, 1))


def test_module_construction_errors():
    conv, bn = _pair()
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        TrainConvBnAct(conv, nn.SyncBatchNorm(12))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        TrainConvBnAct(nn.Linear(3, 3), bn)
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        TrainConvBnAct(conv, nn.BatchNorm1d(12))
    with pytest.raises(ValueError, match="12 output channels"):
        TrainConvBnAct(conv, nn.BatchNorm2d(10))
    with pytest.raises(TypeError, match="relu must be a bool"):
        TrainConvBnAct(conv, bn, relu=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        TrainConvBnAct(conv, bn, backend="cuda")


# ----------------------------------------------------------------------------------------- validation

def _args(**over):
    a = dict(x=torch.randn(2, 8, 5, 5), weight=torch.randn(12, 8, 3, 3), bn_weight=torch.ones(12),
             bn_bias=torch.zeros(12), running_mean=torch.zeros(12), running_var=torch.ones(12),
             num_batches_tracked=torch.tensor(0))
    kw = dict(stride=1, padding=1, backend="eager")
    for k, v in over.items():
        (a if k in a else kw)[k] = v
    return a, kw


@pytest.mark.parametrize("over,exc,msg", [
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(x=torch.randn(8, 5, 5)), ValueError, "x must be a 4-D"),
    (dict(x=torch.randint(0, 3, (2, 8, 5, 5))), TypeError, "x must be a floating-point"),
    (dict(x=torch.randn(2, 6, 5, 5)), ValueError, "x has 6 channels"),
    (dict(weight=torch.randn(12, 8, 3, 3).half()), ValueError, "cast them to one dtype"),
    (dict(weight=torch.randn(12, 4, 3, 3), groups=3), ValueError, "x has 8 channels"),
    (dict(weight=torch.randn(10, 4, 3, 3), groups=2, bn_weight=torch.ones(10), bn_bias=torch.zeros(10),
          running_mean=torch.zeros(10), running_var=torch.ones(10), x=torch.randn(2, 8, 5, 5), stride=1),
     None, None),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(bn_weight=torch.ones(11)), ValueError, "bn_weight must have shape"),
    (dict(bn_bias=torch.zeros(12, dtype=torch.long)), TypeError, "bn_bias must be a floating-point"),
    (dict(running_var=None), ValueError, "both be tensors or both be None"),
    (dict(num_batches_tracked=torch.zeros(2)), TypeError, "num_batches_tracked"),
    (dict(momentum=1.5), ValueError, "momentum must be a number in"),
    (dict(eps=0.0), ValueError, "eps must be a positive number"),
    (dict(relu=1), TypeError, "relu must be a bool"),
    (dict(defer=1), TypeError, "defer must be a bool"),
    (dict(defer="later"), ValueError, "defer must be False, True"),
    (dict(defer=True, residual=torch.randn(2, 12, 5, 5)), ValueError, "cannot add a residual"),
    (dict(x=torch.randn(1, 8, 1, 1), weight=torch.randn(12, 8, 1, 1), padding=0), ValueError,
     "more than 1 value per channel"),
    (dict(x=torch.randn(2, 8, 2, 2), padding=0), ValueError, "too small"),
    (dict(residual=torch.randn(2, 12, 4, 5)), ValueError, "residual must have the output's shape"),
    (dict(residual=torch.randn(2, 12, 5, 5).long()), TypeError, "residual must be a floating-point"),
], ids=lambda v: str(v)[:40] if not isinstance(v, dict) else None)
def test_validation(over, exc, msg):
    a, kw = _args(**over)
    if exc is None:  # a valid grouped call, as a control
        conv_bn_relu_train(*a.values(), **kw)
        return
    with pytest.raises(exc, match=msg):
        conv_bn_relu_train(*a.values(), **kw)


@needs_triton
def test_triton_refuses_float64_clearly():
    a, kw = _args(backend="triton")
    a = {k: (v.double() if v.is_floating_point() else v) for k, v in a.items()}
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: .*float64"):
        conv_bn_relu_train(*a.values(), **kw)


def _run_py(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


_PLAIN_CPU = """
    import torch, torch.nn as nn
    from dla_fast.train import TrainConvBnAct, conv_bn_relu_train
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
    m = TrainConvBnAct(conv, bn)
    x = torch.randn(2, 8, 7, 7)
    why = m.fallback_reason(x)
    assert "CUDA" in why, why
    y = m(x)
    assert m.bn.num_batches_tracked.item() == 1
    try:
        TrainConvBnAct(conv, bn, backend="triton")(x)
    except RuntimeError as e:
        assert "TRITON_INTERPRET" in str(e), str(e)
    else:
        raise AssertionError("no error")
    try:
        conv_bn_relu_train(x, conv.weight, bn.weight, bn.bias, backend="triton", padding=1)
    except RuntimeError as e:
        assert "TRITON_INTERPRET" in str(e), str(e)
    else:
        raise AssertionError("no error")
    print("OK")
"""


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU without the interpreter")
def test_plain_cpu_without_interpreter():
    """Without TRITON_INTERPRET the CPU runs eagerly under 'auto' and 'triton' says how to run the kernels."""
    p = _run_py(_PLAIN_CPU)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


# ------------------------------------------------------------------------------------- compile and ops

@pytest.mark.interpreter
@needs_kernels
def test_opcheck():
    """The registered ops' schemas and fake implementations (what torch.compile traces)."""
    import dla_fast.backends.triton._train  # noqa: F401  (registers the ops)
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(DEV)
    w = (torch.randn(8, 8, 3, 3, generator=gen) * 0.2).to(DEV)
    v = [(torch.rand(8, generator=gen) + 0.5).to(DEV) for _ in range(3)]
    ops = torch.ops.dla_fast_train
    torch.library.opcheck(ops.conv_stats.default, (x, w, [1, 1], [1, 1], 1, None, None, None, False, False))
    torch.library.opcheck(ops.conv_stats.default, (x, w[:, :4], [2, 2], [1, 1], 2, v[0], v[1], v[2], True, False))
    torch.library.opcheck(ops.bn_act.default, (x, v[0], v[1], v[2], x, True, torch.float32))
    torch.library.opcheck(ops.bn_backward.default, (x, x.relu(), x, v[0], v[1], v[2], torch.float32))
    torch.library.opcheck(ops.bn_backward.default, (x, None, x, v[0], v[1], None, None))
    dz = torch.randn(2, 8, 3, 3, generator=gen).to(DEV)
    torch.library.opcheck(ops.wgrad_thin.default, (dz, x, w, [2, 2], [1, 1], False))


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("wgrad", ["aten", "triton"])
def test_torch_compile_module(wgrad, monkeypatch):
    """torch.compile around the module (graph capture through the autograd functions and the registered ops;
    on the CPU with the eager/aot_eager backends, Inductor in the cuda test): the same output and running
    statistics as without (to fp32 rounding), gradients within 2x the uncompiled run's error against float64.
    (Outside a compile the kernels' final statistics launch folds the BN coefficients; traced code computes
    them with torch ops. The two differ in the last bits, and a weight gradient sums those differences over
    every pixel.) The conv is thin (8 input channels), so with DLA_FAST_TRAIN_WGRAD=triton its weight gradient
    comes from the thin-conv kernel compiled and uncompiled alike (a registered op in the graph; on a GPU a
    triton_op, whose kernel AOT autograd traces into the graph), and from ATen's in neither with aten."""
    from dla_fast import _env
    from dla_fast.backends.triton import _train as kt

    monkeypatch.setenv("DLA_FAST_TRAIN_WGRAD", wgrad)
    _env.reload()
    launches = []
    launch = kt.wgrad_thin_launch

    def counted(dz, x, *args, **kwargs):  # a launch on real tensors, or a trace of it (a compile's fake ones)
        from torch._subclasses.fake_tensor import is_fake
        launches.append("traced" if is_fake(x) or x.device.type == "meta" else "run")
        return launch(dz, x, *args, **kwargs)

    monkeypatch.setattr(kt, "wgrad_thin_launch", counted)

    def run(compiled, dtype=torch.float32, impl="triton"):
        del launches[:]
        conv, bn = _pair(seed=3)
        m = TrainConvBnAct(conv.to(DEV, dtype), bn.to(DEV, dtype), backend=impl)
        f = torch.compile(m, backend=compiled, fullgraph=False) if compiled else m
        x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(24)).to(DEV, dtype)
        r = torch.randn(2, 12, 7, 7, generator=torch.Generator().manual_seed(25)).to(DEV, dtype)
        y = f(x, r)
        (y * y).sum().backward()
        if impl == "triton" and wgrad == "aten":
            assert not launches, f"compiled={compiled}: thin-conv kernel {launches} with DLA_FAST_TRAIN_WGRAD=aten"
        elif impl == "triton":
            # Launched from Python once; or, where the op is a triton_op (a GPU) and AOT autograd traces it
            # (aot_eager, Inductor), traced into the graph, which launches the kernel itself.
            runs = launches.count("run")
            assert runs == 1 or (runs == 0 and "traced" in launches and compiled not in (None, "eager")), \
                f"compiled={compiled}: thin-conv kernel {launches}"
        return [y.detach(), bn.running_mean, bn.running_var, bn.num_batches_tracked, conv.weight.grad,
                bn.weight.grad, bn.bias.grad]

    expect, ref = run(None), run(None, torch.float64, "eager")
    names = ("y", "running_mean", "running_var", "num_batches_tracked", "conv.weight.grad", "bn.weight.grad",
             "bn.bias.grad")
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        got = run(backend)
        for name, a, b in zip(names[:4], got, expect):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, backend=backend: f"{name}, backend={backend}: {m}")
        for name, a, b, r in zip(names[4:], got[4:], expect[4:], ref[4:]):
            _judge(f"{name}, backend={backend}", a, b, r, torch.float32)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("mode", [True, "recompute"], ids=["prologue", "recompute"])
def test_torch_compile_deferred_chain(mode):
    """torch.compile around a deferred chain (two layers, the activation between them never formed): the kernels
    traced through the registered ops with the prologue. The output, the gradients and both layers' running
    statistics, compiled and not, judged against float64 with eager's error as the bound: the traced path
    finishes BN with torch ops, the uncompiled one in the statistics' final launch, so the two round differently
    (on the H100 they differed by more than 1e-5 in the recompute mode)."""
    from dla_fast.train.modules import conv_bn_act

    def run(compiled, backend="triton", dt=torch.float32):
        (c1, b1), (c2, b2) = _pair(seed=4), _pair(cin=12, cout=10, seed=5)
        for m in (c1, b1, c2, b2):
            m.to(DEV, dt)

        def chain(x):
            a = conv_bn_act(c1, b1, x, None, True, backend, mode)
            return conv_bn_act(c2, b2, a, None, True, backend)
        f = torch.compile(chain, backend=compiled) if compiled else chain
        x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(26)).to(DEV, dt)
        y = f(x)
        (y * y).sum().backward()
        assert b1.num_batches_tracked.item() == b2.num_batches_tracked.item() == 1
        return dict(y=y.detach(), dw1=c1.weight.grad, dgamma1=b1.weight.grad, dbeta1=b1.bias.grad,
                    dw2=c2.weight.grad, dgamma2=b2.weight.grad, dbeta2=b2.bias.grad, rm1=b1.running_mean,
                    rv1=b1.running_var, rm2=b2.running_mean, rv2=b2.running_var)

    ref, eager = run(None, "eager", torch.float64), run(None, "eager")
    results = {"uncompiled": run(None)}
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        results[backend] = run(backend)
    for name, got in results.items():
        for k in ref:
            _judge(f"{name} {k}", got[k], eager[k], ref[k], torch.float32)


# --------------------------------------------------------------------------------- DLA shapes on a GPU

# (N, Cin, Cout, H, k, stride, groups, residual): the stem, a level-0/1 conv, DlaBasic 3x3s (stride 1/2), the
# bottleneck 1x1s, the x variants' grouped 3x3 (4 channels a group), a res2net split (28 channels), a root 1x1.
CUDA_SHAPES = [
    (8, 3, 32, 112, 7, 1, 1, False), (8, 32, 64, 56, 3, 2, 1, False), (8, 64, 64, 56, 3, 1, 1, True),
    (8, 128, 128, 28, 3, 2, 1, False), (8, 128, 64, 28, 1, 1, 1, False), (8, 64, 256, 28, 1, 1, 1, True),
    (8, 128, 128, 28, 3, 1, 32, False), (8, 256, 256, 14, 3, 2, 64, False), (8, 28, 28, 28, 3, 1, 1, False),
    (8, 768, 256, 14, 1, 1, 1, True),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_ID)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{s[1]}-{s[2]}k{s[4]}s{s[5]}g{s[6]}@{s[3]}")
def test_dla_shapes_autocast_cuda(shape, dtype):
    """DLA layer shapes under CUDA autocast (fp32 input and parameters, channels_last input, a residual in the
    autocast dtype), backend='auto' (which must pick the kernels), against eager autocast and float64."""
    N, Cin, Cout, H, k, s, g, res = shape
    case = Case(N, Cin, Cout, H, H, k, s, k // 2, g, residual=res, seed=5, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        assert fused_unavailable_reason(case.x, case.w, g, "auto") is None
    _compare(case, dtype, f"{shape}", backend="auto", autocast=True, x_layout="cl")


@pytest.mark.cuda
@needs_cuda
def test_deterministic_cuda(monkeypatch):
    """Two runs of one step give bit-identical outputs, statistics and gradients: the training kernels reduce
    without float atomics. (The conv's own backward is cuDNN's, deterministic when asked to be.)"""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    c = Case(16, 64, 64, 28, 28, 3, 1, 1, 1, residual=True, seed=7, device="cuda")
    a = c.run("triton", torch.bfloat16)
    b = c.run("triton", torch.bfloat16)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.cuda
@needs_cuda
def test_auto_keeps_fp32_on_cudnn_cuda():
    conv, bn = _pair()
    m = TrainConvBnAct(conv.cuda(), bn.cuda())
    x = torch.randn(2, 8, 9, 9, device="cuda")
    assert "float32" in m.fallback_reason(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert m.fallback_reason(x) is None


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_module_cuda(backend):
    """torch.compile (Inductor included) around the module under bf16 autocast: the kernels traced through the
    registered ops; output, gradients and running statistics judged like the uncompiled module (eager autocast
    and float64 as references)."""
    def run(kind, dt=torch.bfloat16):
        conv, bn = _pair(32, 64, seed=8)
        conv, bn = conv.cuda().to(memory_format=torch.channels_last), bn.cuda()
        if dt == torch.float64:
            conv, bn = conv.double(), bn.double()
        m = TrainConvBnAct(conv, bn, backend="eager" if kind == "eager" else "auto")
        f = torch.compile(m, backend=backend) if kind == "compiled" else m
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(8, 32, 28, 28, generator=gen).cuda().to(memory_format=torch.channels_last)
        r = torch.randn(8, 64, 28, 28, generator=gen).cuda().bfloat16()
        x, r = (x.double(), r.double()) if dt == torch.float64 else (x, r)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dt != torch.float64):
            y = f(x, r)
        (y.float() * y.float()).sum().backward()
        return dict(y=y.detach(), dw=conv.weight.grad, dgamma=bn.weight.grad, dbeta=bn.bias.grad,
                    rm=bn.running_mean, rv=bn.running_var), bn.num_batches_tracked.item()

    ours, n_ours = run("compiled")
    eager, _ = run("eager")
    ref, n_ref = run("eager", torch.float64)
    assert n_ours == n_ref == 1
    for k in ours:
        _judge(f"compiled {backend} {k}", ours[k], eager[k], ref[k], torch.bfloat16)


@needs_kernels
def test_schemas_are_what_triton_op_infers():
    """Some torch versions (2.11) register a triton_op under the schema inferred from the function's annotations,
    ignoring the one given: the two must agree, or the ops fail to register on the GPU."""
    from torch._library.infer_schema import infer_schema

    from dla_fast.backends.triton import _train
    for name, fn in _train._IMPLS.items():
        assert infer_schema(fn, mutates_args=()) == _train._SCHEMAS[name], name
