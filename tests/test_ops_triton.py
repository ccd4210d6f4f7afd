"""Tests of the Triton backend (dla_fast.backends.triton) through the public ops API.

Two ways to run them:

* CPU, in Triton's interpreter (what CI does)::

      TRITON_INTERPRET=1 python -m pytest tests/test_ops_triton.py -q

  runs the ``interpreter``-marked tests: small shapes (odd sizes, every kernel path, layouts) in fp32 and
  fp16 (the interpreter has no bf16).
* On a GPU, without TRITON_INTERPRET: the same small-shape tests run compiled on CUDA, and the
  ``cuda``-marked tests add the real DLA layer shapes in fp32/TF32/fp16/bf16, torch.compile and CUDA graphs.

Without either, everything skips with a reason, except the tests of the error messages.

Numerics: outputs are compared with a float64 reference. fp32 with TF32 off must be within 1e-5
(relative Frobenius error). fp16/bf16/TF32 may be at most 2x the error of eager PyTorch in that dtype
(on the same device) plus a floor of about one rounding of the output (fp16 1e-3, bf16 4e-3, TF32 1e-3),
both in norm and in the worst element. Outputs start as NaN (DLA_FAST_TRITON_POISON=1), so an element the
kernel never wrote fails the comparison.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

import dla_fast.ops as ops
from dla_fast.ops.reference import aggregate_ref, conv_bn_act_ref

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency of torch's CUDA builds
    HAS_TRITON = False

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if INTERP:
    DEV = "cpu"
elif HAS_CUDA:
    DEV = "cuda"
else:
    DEV = None

needs_kernels = pytest.mark.skipif(
    not HAS_TRITON or DEV is None,
    reason="no GPU and TRITON_INTERPRET is not set: run with TRITON_INTERPRET=1 in the environment to test "
           "the Triton kernels in the CPU interpreter")
needs_cuda = pytest.mark.skipif(
    not HAS_TRITON or not HAS_CUDA or INTERP,
    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

SMALL_DTYPES = [torch.float32, torch.float16] if INTERP else [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float32: 1e-3}  # float32 here = TF32


@pytest.fixture(autouse=True)
def _poison_and_ieee(monkeypatch):
    """NaN-filled outputs, IEEE fp32 unless a test turns TF32 on, and the heuristic's kernel choice."""
    monkeypatch.setenv("DLA_FAST_TRITON_POISON", "1")
    monkeypatch.delenv("DLA_FAST_TRITON_CONV", raising=False)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------------------------------------ helpers

def _rand(*shape, dtype=torch.float32, device=None, scale=1.0):
    # Random normal, never zeros: a kernel that drops a term cannot hide behind zero inputs.
    return (torch.randn(*shape, device=device or DEV, dtype=torch.float32) * scale).to(dtype)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _check(out, ref64, eager, dtype, tf32=False, what=""):
    assert out.dtype == dtype, what
    assert out.shape == ref64.shape, what
    assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output is not channels_last"
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an element left unwritten?)"
    err = _rel(out, ref64)
    scale = ref64.abs().max().item()
    if dtype == torch.float32 and not tf32:
        assert err <= 1e-5, f"{what}: fp32 rel error {err:.3e} > 1e-5"
        assert _max_err(out, ref64) <= 1e-5 * max(scale, 1e-30) * 10, f"{what}: worst element too far off"
        return err
    floor = FLOOR[dtype]
    e_eager = _rel(eager, ref64)
    assert err <= 2 * e_eager + floor, f"{what}: rel error {err:.3e} > 2 x eager {e_eager:.3e} + {floor}"
    m, m_eager = _max_err(out, ref64), _max_err(eager, ref64)
    assert m <= 2 * m_eager + floor * scale, \
        f"{what}: worst element error {m:.3e} > 2 x eager {m_eager:.3e} + {floor} x {scale:.3e}"
    return err


def _conv_case(N, Cin, Cout, H, W, k, stride, pad, groups, dtype, *, residual=True, relu=True, bias=True,
               device=None, x_layout="nchw", res_layout="nchw", tf32=False):
    device = device or DEV
    fan_in = Cin // groups * k * k
    x = _make_layout(_rand(N, Cin, H, W, dtype=dtype, device=device), x_layout)
    w = _rand(Cout, Cin // groups, k, k, dtype=dtype, device=device, scale=fan_in ** -0.5)
    b = _rand(Cout, device=device) if bias else None
    Ho = (H + 2 * pad - k) // stride + 1
    Wo = (W + 2 * pad - k) // stride + 1
    r = _make_layout(_rand(N, Cout, Ho, Wo, dtype=dtype, device=device), res_layout) if residual else None
    out = ops.conv_bn_act(x, w, b, stride=stride, padding=pad, groups=groups, residual=r, relu=relu,
                          backend="triton")
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = conv_bn_act_ref(d(x), d(w), d(b), (stride, stride), (pad, pad), groups, d(r), relu)
    eager = conv_bn_act_ref(x, w, b, (stride, stride), (pad, pad), groups, r, relu)
    what = f"conv N{N} {Cin}->{Cout} {H}x{W} k{k} s{stride} p{pad} g{groups} {dtype} res={residual} relu={relu}"
    return _check(out, ref64, eager, dtype, tf32, what)


def _make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a channel slice of a wider channels_last tensor (res2net splits)
        n, c, h, w = t.shape
        big = torch.empty(n, c + 5, h, w, device=t.device, dtype=t.dtype).normal_()
        big = big.contiguous(memory_format=torch.channels_last)
        big[:, 2:2 + c] = t
        return big[:, 2:2 + c]
    if layout == "strided":  # every other column of a wider tensor: no dim is unit-stride
        n, c, h, w = t.shape
        big = torch.empty(n, c, h, 2 * w, device=t.device, dtype=t.dtype).normal_()
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "hwnc":  # a permuted allocation: channels at unit stride but (n, h, w) not collapsible
        return t.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    if layout == "expand":  # a broadcast (stride-0) residual: per-channel values
        return t[:1, :, :1, :1].expand(t.shape)
    raise ValueError(layout)


def _agg_case(N, chans, Cout, H, W, dtype, *, residual=False, relu=True, bias=True, layouts=None,
              device=None, tf32=False):
    device = device or DEV
    layouts = layouts or ["nchw"] * len(chans)
    kids = [_make_layout(_rand(N, c, H, W, dtype=dtype, device=device), lay) for c, lay in zip(chans, layouts)]
    w = _rand(Cout, sum(chans), dtype=dtype, device=device, scale=sum(chans) ** -0.5)
    b = _rand(Cout, device=device) if bias else None
    if isinstance(residual, str):
        res = _make_layout(_rand(N, Cout, H, W, dtype=dtype, device=device), residual)
    else:
        res = residual
    out = ops.aggregate(kids, w, b, residual=res, relu=relu, backend="triton")
    r_ref = kids[0] if res is True else (None if res is False else res)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = aggregate_ref([k.double() for k in kids], w.double(), d(b), d(r_ref), relu)
    eager = aggregate_ref(kids, w, b, r_ref, relu)
    what = f"aggregate {chans}->{Cout} {H}x{W} {dtype} res={residual!r} relu={relu}"
    return _check(out, ref64, eager, dtype, tf32, what)


# --------------------------------------------------------------------------- small shapes (interpreter)

# name: (N, Cin, Cout, H, W, k, stride, pad, groups)
SMALL_CONVS = {
    "stem7x7": (2, 3, 13, 9, 7, 7, 1, 3, 1),
    "stem7x7_s2": (1, 3, 8, 9, 9, 7, 2, 3, 1),
    "3x3": (2, 20, 24, 7, 9, 3, 1, 1, 1),
    "3x3_s2_smallcin": (1, 13, 20, 9, 7, 3, 2, 1, 1),
    "3x3_s2": (2, 24, 16, 9, 7, 3, 2, 1, 1),
    "3x3_p0": (1, 16, 16, 7, 5, 3, 1, 0, 1),
    "1x1": (2, 24, 13, 7, 9, 1, 1, 0, 1),
    "1x1_s2": (1, 20, 24, 9, 9, 1, 2, 0, 1),
    "1x1_batch1_1px": (1, 24, 20, 1, 1, 1, 1, 0, 1),
    "g4_4pg": (2, 16, 16, 9, 7, 3, 1, 1, 4),
    "g8_4pg_s2": (1, 32, 32, 9, 7, 3, 2, 1, 8),
    "g32_4pg": (1, 128, 128, 5, 5, 3, 1, 1, 32),
    "g4_2pg": (2, 8, 8, 7, 9, 3, 1, 1, 4),
    "g3_4to6pg": (1, 12, 18, 7, 5, 3, 1, 1, 3),
    "g2_16pg": (1, 32, 32, 7, 5, 3, 1, 1, 2),
}


def test_pixel_stride_of_every_layout_that_is_one_row_per_pixel():
    """The launchers read in place a tensor whose (n, h, w) collapse to one pixel index with unit-stride channels:
    channels_last, a channel slice of it, and an NCHW tensor of 1x1 spatial size (the same bytes as channels_last:
    a level-5 map of a 32x32 input); anything else gets a channels_last copy."""
    from dla_fast.backends.triton._launch import _row_stride

    cl = torch.channels_last
    assert _row_stride(torch.empty(2, 16, 4, 4).contiguous(memory_format=cl)) == 16
    assert _row_stride(torch.empty(2, 24, 4, 4).contiguous(memory_format=cl)[:, 8:]) == 24
    assert _row_stride(torch.empty(2, 16, 1, 1)) == 16
    assert _row_stride(torch.empty(1, 16, 1, 1)) == 16
    assert _row_stride(torch.empty(2, 16, 1, 3).contiguous(memory_format=cl)) == 16
    assert _row_stride(torch.empty(2, 16, 4, 4)) is None
    assert _row_stride(torch.empty(2, 16, 3, 1)) is None  # NCHW with a 3x1 map: channels are not unit-stride
    assert _row_stride(torch.empty(2, 16, 4, 4).contiguous(memory_format=cl)[:, :, ::2]) is None


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(SMALL_CONVS))
def test_conv_small(name, dtype):
    torch.manual_seed(zlib.crc32(name.encode()))
    N, Cin, Cout, H, W, k, s, p, g = SMALL_CONVS[name]
    _conv_case(N, Cin, Cout, H, W, k, s, p, g, dtype, residual=True, relu=True)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("residual,relu,bias", [(False, True, True), (True, False, True), (False, False, False)])
@pytest.mark.parametrize("name", ["3x3_s2_smallcin", "g4_4pg", "1x1"])
def test_conv_epilogue_variants(name, residual, relu, bias):
    torch.manual_seed(1)
    N, Cin, Cout, H, W, k, s, p, g = SMALL_CONVS[name]
    _conv_case(N, Cin, Cout, H, W, k, s, p, g, torch.float32, residual=residual, relu=relu, bias=bias)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("x_layout,res_layout", [
    ("cl", "cl"), ("slice", "nchw"), ("strided", "strided"), ("hwnc", "hwnc"), ("nchw", "expand"),
])
@pytest.mark.parametrize("name", ["3x3", "g4_4pg"])
def test_conv_layouts(name, x_layout, res_layout):
    torch.manual_seed(2)
    N, Cin, Cout, H, W, k, s, p, g = SMALL_CONVS[name]
    _conv_case(N, Cin, Cout, H, W, k, s, p, g, torch.float32, x_layout=x_layout, res_layout=res_layout)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("kind", ["dense", "flat", "blockdiag", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_conv_every_kernel(kind, dtype, monkeypatch):
    """Every kernel path is correct on shapes the heuristic would send elsewhere."""
    monkeypatch.setenv("DLA_FAST_TRITON_CONV", kind)
    torch.manual_seed(3)
    _conv_case(2, 16, 24, 7, 5, 3, 1, 1, 4, dtype)       # grouped, 4 -> 6 per group
    _conv_case(1, 12, 20, 7, 9, 3, 2, 1, 1, dtype)       # dense, stride 2
    _conv_case(1, 40, 24, 5, 5, 3, 1, 1, 1, dtype)       # several channel chunks per tap


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_split_k(split, dtype):
    """Split-K (partials in an fp32 workspace, then the epilogue kernel) gives the unsplit results, with K
    iteration counts that the split does not divide (slices may be short or empty), residual in another
    layout, and without bias/ReLU."""
    from dla_fast.backends.triton import _launch
    torch.manual_seed(20 + split)
    for N, Cin, Cout, H, W, k, st, pad, res, relu, bias in [(1, 40, 24, 5, 7, 3, 1, 1, "nchw", True, True),
                                                           (2, 20, 20, 7, 5, 3, 2, 1, None, False, False),
                                                           (1, 48, 10, 3, 3, 1, 1, 0, "cl", True, True)]:
        x = _rand(N, Cin, H, W, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = _rand(Cout, Cin, k, k, dtype=dtype, scale=(Cin * k * k) ** -0.5)
        b = _rand(Cout) if bias else None
        Ho, Wo = (H + 2 * pad - k) // st + 1, (W + 2 * pad - k) // st + 1
        r = None if res is None else _make_layout(_rand(N, Cout, Ho, Wo, dtype=dtype), res)
        cfg = dict(kind="dense", MODE=0, GB=1, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1,
                   SPLIT=split)
        out = _launch.conv_launch(x, w, b, (st, st), (pad, pad), 1, r, relu, False, config=cfg)
        d = lambda t: None if t is None else t.double()  # noqa: E731
        ref64 = conv_bn_act_ref(d(x), d(w), d(b), (st, st), (pad, pad), 1, d(r), relu)
        eager = conv_bn_act_ref(x, w, b, (st, st), (pad, pad), 1, r, relu)
        _check(out, ref64, eager, dtype, what=f"split-K {split} conv {Cin}->{Cout} k{k} s{st} {dtype}")

    kids = [_rand(1, c, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last) for c in (24, 9, 40)]
    w2 = _rand(24, 73, dtype=dtype, scale=73 ** -0.5)
    b2 = _rand(24)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, SPLIT=split)
    out = _launch.aggregate_launch(kids, w2, b2, kids[0], True, False, config=cfg)
    ref64 = aggregate_ref([k.double() for k in kids], w2.double(), b2.double(), kids[0].double(), True)
    eager = aggregate_ref(kids, w2, b2, kids[0], True)
    _check(out, ref64, eager, dtype, what=f"split-K {split} aggregate {dtype}")


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("split", [2, 5])
def test_split_k_reduced_in_the_kernel(split):
    """REDUCE=1 (each tile's last program sums the partials inside the GEMM kernel) gives the very bits of the
    epilogue kernel's sum, leaves its tile counters at zero for the next launch, and repeats; a launch that can
    have no counters (more tiles than a region holds) falls back to the epilogue kernel, with the same bits."""
    from dla_fast.backends.triton import _launch
    dtype = torch.float16 if DEV == "cuda" else torch.float32
    torch.manual_seed(40 + split)
    x = _rand(2, 40, 7, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = _rand(24, 40, 3, 3, dtype=dtype, scale=(40 * 9) ** -0.5)
    b = _rand(24)
    r = _make_layout(_rand(2, 24, 7, 9, dtype=dtype), "nchw")
    cfg = dict(kind="dense", MODE=0, GB=1, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1,
               SPLIT=split)
    two = _launch.conv_launch(x, w, b, (1, 1), (1, 1), 1, r, True, False, config=dict(cfg, REDUCE=0))
    one = _launch.conv_launch(x, w, b, (1, 1), (1, 1), 1, r, True, False, config=dict(cfg, REDUCE=1))
    again = _launch.conv_launch(x, w, b, (1, 1), (1, 1), 1, r, True, False, config=dict(cfg, REDUCE=1))
    assert torch.equal(one, two) and torch.equal(again, two)
    pools = list(_launch._COUNTER_POOLS.values())
    assert pools and all(int(p.buf.count_nonzero()) == 0 for p in pools)

    kids = [_rand(1, c, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last) for c in (24, 9, 40)]
    w2 = _rand(24, 73, dtype=dtype, scale=73 ** -0.5)
    acfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, SPLIT=split)
    two = _launch.aggregate_launch(kids, w2, b, kids[0], True, False, config=dict(acfg, REDUCE=0))
    one = _launch.aggregate_launch(kids, w2, b, kids[0], True, False, config=dict(acfg, REDUCE=1))
    assert torch.equal(one, two)
    assert all(int(p.buf.count_nonzero()) == 0 for p in _launch._COUNTER_POOLS.values())
    ref64 = aggregate_ref([k.double() for k in kids], w2.double(), b.double(), kids[0].double(), True)
    _check(one, ref64, aggregate_ref(kids, w2, b, kids[0], True), dtype, what=f"in-kernel split-K {split}")

    small = dict(cfg, BLOCK_M=16, REDUCE=1)  # 8 row tiles x 2 column tiles
    region = _launch._COUNTER_REGION
    try:
        _launch._COUNTER_REGION = 8
        assert _launch._reduce_counters(small, split, 16, one) is None
        fell_back = _launch.conv_launch(x, w, b, (1, 1), (1, 1), 1, r, True, False, config=small)
    finally:
        _launch._COUNTER_REGION = region
    assert torch.equal(fell_back, _launch.conv_launch(x, w, b, (1, 1), (1, 1), 1, r, True, False,
                                                      config=dict(small, REDUCE=0)))


@needs_triton
def test_split_k_counters_stay_apart(monkeypatch):
    """Counter regions: one per stream for eager launches (reused), a fresh one per launch under CUDA-graph
    capture, none during a capture before the device's pool exists (no memset may enter the graph), none for
    configs without REDUCE or split, and none once the pool is used up."""
    from dla_fast.backends.triton import _launch
    monkeypatch.setattr(_launch, "_COUNTER_POOLS", {})
    y = torch.empty(4)
    cfg = dict(SPLIT=4, REDUCE=1)
    assert _launch._reduce_counters(dict(cfg, REDUCE=0), 4, 8, y) is None
    assert _launch._reduce_counters(cfg, 1, 8, y) is None
    a = _launch._reduce_counters(cfg, 4, 8, y)
    b = _launch._reduce_counters(cfg, 4, 8, y)
    assert a is not None and a.data_ptr() == b.data_ptr() and a.dtype == torch.int32 and int(a.abs().sum()) == 0
    pool = _launch._COUNTER_POOLS[("cpu", 0)]
    assert pool.used == _launch._COUNTER_REGION
    while pool.take(1000) is not None:
        pass
    assert _launch._tile_counters(torch.device("cpu"), 8) is a  # the stream keeps its region

    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: type("S", (), {"cuda_stream": 7})())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    real_pool = _launch._CounterPool
    monkeypatch.setattr(_launch, "_CounterPool", lambda device: real_pool(torch.device("cpu")))  # a GPU's, here
    dev = torch.device("cuda", 0)
    assert _launch._tile_counters(dev, 8) is None  # capturing, and no pool zeroed before
    capturing[0] = False
    eager = _launch._tile_counters(dev, 8)
    capturing[0] = True
    g1, g2 = _launch._tile_counters(dev, 8), _launch._tile_counters(dev, 40)
    assert len({t.data_ptr() for t in (eager, g1, g2)}) == 3
    assert (g1.numel(), g2.numel(), g2.data_ptr() - g1.data_ptr()) == (32, 64, 128)  # 128-byte steps
    assert _launch._tile_counters(dev, _launch._COUNTER_REGION + 1) is None


@needs_triton
def test_split_k_plan():
    """Split-K is chosen only where the plain grid leaves most SMs idle, and never on the interpreter."""
    from dla_fast.backends.triton._launch import aggregate_plan, conv_plan
    f16 = torch.float16
    # dla34 level 5 3x3 512->512 at batch 1 (7x7): 4 tiles of 72 iterations on 132 SMs
    p = conv_plan(49, 512, 512, 1, 3, 3, f16, False, False, sms=132)
    assert p["kind"] == "dense" and p["BLOCK_N"] == 64 and 8 <= p["SPLIT"] <= 16
    assert p["SPLIT"] * 4 <= 9 * 512 // p["BLOCK_K"]      # every slice keeps >= 4 K iterations
    # the same layer at batch 256 fills the GPU: no split, wide tiles
    p = conv_plan(256 * 49, 512, 512, 1, 3, 3, f16, False, False, sms=132)
    assert p["SPLIT"] == 1 and p["BLOCK_N"] == 128
    # no SM count (interpreter, or a caller that does not know the GPU): no split
    assert conv_plan(49, 512, 512, 1, 3, 3, f16, False, False).get("SPLIT", 1) == 1
    assert conv_plan(49, 512, 512, 1, 3, 3, f16, False, True, sms=132).get("SPLIT", 1) == 1
    # short K (1x1 conv 64->64): nothing to split
    assert conv_plan(49, 64, 64, 1, 1, 1, f16, False, False, sms=132)["SPLIT"] == 1
    # grouped convs keep their own kernels
    assert conv_plan(49, 4, 4, 32, 3, 3, f16, False, False, sms=132).get("SPLIT", 1) == 1
    # dla34 level 5 root at batch 1: 512+512+256 -> 512
    p = aggregate_plan(49, [512, 512, 256], 512, f16, False, True, sms=132)
    assert p["SPLIT"] > 1 and p["BLOCK_N"] == 64
    assert aggregate_plan(256 * 49, [512, 512, 256], 512, f16, False, True, sms=132)["SPLIT"] == 1


@needs_triton
def test_split_k_workspace_too_large_is_a_clear_error():
    """A split-K workspace beyond 32-bit offsets is refused (before allocating) with what to do instead."""
    from dla_fast.backends.triton._launch import _workspace
    y = torch.empty(0)
    assert _workspace(1, 2**30, 64, y) is y  # no split: no workspace at all
    with pytest.raises(ValueError, match="exceeds 32-bit offsets; use SPLIT=1"):
        _workspace(4, 2**22, 1024, y)



@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_max_pool(dtype):
    """The trees' k x k / stride-k max pooling equals F.max_pool2d exactly (max is exact in any dtype): odd
    sizes (floor), every input layout, NaN propagation, channels past one tile."""
    import torch.nn.functional as F

    import dla_fast.backends.triton as tb
    torch.manual_seed(30)
    for (N, C, H, W, k, layout) in [(2, 13, 9, 7, 2, "nchw"), (1, 72, 8, 8, 2, "cl"), (1, 20, 7, 9, 3, "slice"),
                                    (2, 6, 5, 5, 2, "strided"), (1, 16, 2, 2, 2, "hwnc")]:
        x = _make_layout(_rand(N, C, H, W, dtype=dtype), layout)
        if layout == "nchw":
            x[0, 3, 1, 0] = float("nan")
        out = tb.max_pool(x, k)
        ref = F.max_pool2d(x, k, k)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        if layout == "nchw":
            assert torch.isnan(out[0, 3, 0, 0])


# name: (N, chans, Cout, H, W, residual, relu, layouts)
SMALL_AGGS = {
    "1child_shortcut": (2, (13,), 13, 9, 7, True, True, None),
    "2children_restensor": (2, (8, 5), 20, 9, 7, "nchw", True, None),
    "3children_mixed_layouts": (1, (16, 3, 20), 16, 7, 9, True, True, ["slice", "nchw", "cl"]),
    "4children_norelu": (1, (6, 7, 8, 9), 24, 7, 9, False, False, None),
    "7children": (1, (5,) * 7, 10, 5, 5, "cl", True, None),
    "10children_chained": (1, (2, 3, 4, 5, 6, 7, 8, 9, 10, 11), 7, 5, 5, "strided", True, None),
    "strided_children": (2, (6, 10), 6, 5, 7, True, True, ["hwnc", "strided"]),
}


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(SMALL_AGGS))
def test_aggregate_small(name, dtype):
    torch.manual_seed(zlib.crc32(name.encode()))
    N, chans, Cout, H, W, res, relu, layouts = SMALL_AGGS[name]
    _agg_case(N, chans, Cout, H, W, dtype, residual=res, relu=relu, layouts=layouts)


@pytest.mark.interpreter
@needs_kernels
def test_aggregate_no_bias_4d_weight():
    torch.manual_seed(4)
    kids = [_rand(1, 6, 5, 7), _rand(1, 10, 5, 7)]
    w = _rand(8, 16, 1, 1, scale=0.25)
    out = ops.aggregate(kids, w, None, residual=False, relu=True, backend="triton")
    ref = aggregate_ref([k.double() for k in kids], w.double().view(8, 16), None, None, True)
    _check(out, ref, None, torch.float32)


@pytest.mark.interpreter
@needs_kernels
def test_64bit_offsets(monkeypatch):
    """The IDX64 variants (used when a tensor spans >= 2^31 elements) on small tensors."""
    from dla_fast.backends.triton import _launch
    monkeypatch.setattr(_launch, "_IDX64_THRESHOLD", 0)
    torch.manual_seed(11)
    _conv_case(1, 20, 24, 5, 7, 3, 2, 1, 1, torch.float32)
    _conv_case(1, 16, 16, 5, 7, 3, 1, 1, 4, torch.float32)                      # direct (IEEE fp32)
    _conv_case(1, 16, 16, 5, 7, 3, 1, 1, 4, torch.float16)                      # block-diagonal
    _agg_case(1, (6, 10), 8, 5, 7, torch.float32, residual="nchw")


@pytest.mark.interpreter
@needs_kernels
def test_torch_compile_fullgraph():
    """The ops trace under torch.compile(fullgraph=True) and give the eager results (on CPU this checks the
    graph capture and the fake implementations; the cuda test runs Inductor too)."""
    import dla_fast.backends.triton as tb
    torch.manual_seed(5)
    x = _rand(2, 8, 7, 5)
    w = _rand(16, 8, 3, 3, scale=0.1).contiguous(memory_format=torch.channels_last)
    b = _rand(16)
    w2 = _rand(16, 24, scale=0.2)

    def f(x):
        y = tb.conv_bn_act(x, w, b, (1, 1), (1, 1), 1, None, True)
        return tb.aggregate([y, x], w2, b, y, True)

    expect = f(x)
    backends = ["eager", "aot_eager"] if INTERP else ["aot_eager", "inductor"]
    for backend in backends:
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5, msg=f"backend={backend}")


@pytest.mark.interpreter
@needs_kernels
def test_opcheck():
    torch.manual_seed(6)
    x = _rand(1, 8, 5, 5)
    w = _rand(8, 8, 3, 3, scale=0.1).contiguous(memory_format=torch.channels_last)
    r = _rand(1, 8, 5, 5)
    torch.library.opcheck(torch.ops.dla_fast_triton.conv_bn_act.default,
                          (x, w, None, [1, 1], [1, 1], 1, r, True, [0]))
    torch.library.opcheck(torch.ops.dla_fast_triton.aggregate.default,
                          ([x, r], _rand(4, 16), _rand(4), None, False, [0]))


@needs_triton
def test_schemas_are_the_shared_ones():
    """The Triton ops take exactly the arguments of dla_fast/backends/schema.py (the CUDA extension's too)."""
    import dla_fast.backends.triton  # noqa: F401  (registers the ops)
    from dla_fast.backends.schema import OPS
    for name, sig in OPS.items():
        schema = str(getattr(torch.ops.dla_fast_triton, name).default._schema)
        assert schema == f"dla_fast_triton::{name}{sig}", schema


@needs_triton
def test_config_tuples_round_trip_and_bad_ones_are_refused():
    from dla_fast.backends.triton import _launch
    f16 = torch.float16
    for p in (_launch.conv_plan(25088, 64, 64, 1, 3, 3, f16, False, False, sms=132),
              _launch.conv_plan(49, 512, 512, 1, 3, 3, f16, False, False, sms=132),
              _launch.conv_plan(6272, 4, 4, 32, 3, 3, f16, False, False, sms=132),
              _launch.conv_plan(6272, 4, 4, 32, 3, 3, torch.float32, False, False, sms=132)):
        t = _launch.conv_config_tuple(p)
        back = _launch.conv_config_dict(t)
        assert all(back[k] == v for k, v in p.items() if k != "SPLIT") and back["SPLIT"] == p.get("SPLIT", 1)
        assert _launch.conv_config_tuple(back) == t
    a = _launch.aggregate_plan(25088, [64, 64], 64, f16, False, True, sms=132)
    assert _launch.aggregate_config_dict(_launch.aggregate_config_tuple(a)) == a
    a = _launch.aggregate_plan(49, [512, 512, 256], 512, f16, False, True, sms=132)
    assert a["SPLIT"] > 1 and _launch.aggregate_config_dict(_launch.aggregate_config_tuple(a)) == a
    # plans kept before REDUCE existed (one element fewer) read as the epilogue kernel's reduction
    old = _launch.conv_config_tuple(_launch.conv_plan(49, 512, 512, 1, 3, 3, f16, False, False, sms=132))[:-1]
    assert _launch.conv_config_dict(old)["REDUCE"] == 0
    assert _launch.aggregate_config_dict((64, 64, 32, 4, 3, 4))["REDUCE"] == 0
    with pytest.raises(ValueError, match="Triton conv config .* is malformed"):
        _launch.conv_config_dict((9, 1, 2))
    with pytest.raises(ValueError, match="Triton conv config .* is malformed"):
        _launch.conv_config_dict(old + (2,))
    with pytest.raises(ValueError, match="Triton aggregate config .* is malformed"):
        _launch.aggregate_config_dict((64, 64, 0, 4, 3, 1))
    with pytest.raises(ValueError, match="Triton aggregate config .* is malformed"):
        _launch.aggregate_config_dict((64, 64, 32, 4, 3, 4, 3))


@pytest.mark.interpreter
@needs_kernels
def test_every_candidate_tiling_is_right():
    """The tilings the tuner may pick beside the heuristic's (other row tile, 64-wide columns, no split-K or the
    other reduction of its partials; the block-diagonal / direct alternatives of small groups) compute the same
    function, here in the interpreter."""
    from dla_fast.backends.triton import _launch
    import dla_fast.backends.triton as tb
    torch.manual_seed(8)
    f16 = torch.float16
    cases = [  # (x shape, weight shape, stride, padding, groups): a deep layer split along K, a wide one, groups
        ((1, 128, 7, 7), (160, 128, 3, 3), 1, 1, 1),
        ((2, 64, 6, 5), (160, 64, 1, 1), 1, 0, 1),
        ((1, 64, 6, 6), (64, 4, 3, 3), 2, 1, 16),
    ]
    for xs, ws, st, pad, g in cases:
        x = _rand(*xs, dtype=f16)
        w = _rand(*ws, dtype=f16, scale=0.05).contiguous(memory_format=torch.channels_last)
        b = _rand(ws[0])
        M = xs[0] * ((xs[2] + 2 * pad - ws[2]) // st + 1) * ((xs[3] + 2 * pad - ws[3]) // st + 1)
        base = _launch.conv_plan(M, ws[1], ws[0] // g, g, ws[2], ws[3], f16, False, False, sms=132)
        cands = (_launch._alternatives(base, M, ws[0] // g, 132) if base["kind"] == "dense" else
                 [base, _launch.conv_plan(M, ws[1], ws[0] // g, g, ws[2], ws[3], f16, False, False, "direct", 132)])
        assert len(cands) >= 2
        if base.get("SPLIT", 1) > 1:  # both ways of summing the partials are timed
            assert {c.get("REDUCE", 0) for c in cands if c.get("SPLIT", 1) > 1} == {0, 1}
        ref = F.conv2d(x.double(), w.double(), b.double(), st, pad, 1, g).relu()
        for c in cands:
            out = tb.conv_bn_act(x, w, b, (st, st), (pad, pad), g, None, True, _launch.conv_config_tuple(c))
            assert (out.double() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item(), c
    kids = [_rand(1, 96, 7, 7, dtype=f16), _rand(1, 64, 7, 7, dtype=f16)]
    w2 = _rand(160, 160, dtype=f16, scale=0.05)
    base = _launch.aggregate_plan(49, [96, 64], 160, f16, False, True, sms=132)
    root = _launch.aggregate_plan(49, [512, 512, 256], 512, f16, False, True, sms=132)  # dla34's level-5 root
    assert root["SPLIT"] > 1 and {c["REDUCE"] for c in _launch._alternatives(root, 49, 512, 132) if c["SPLIT"] > 1} \
        == {0, 1}
    ref = F.conv2d(torch.cat(kids, 1).double(), w2.double()[:, :, None, None]).relu()
    for c in _launch._alternatives(base, 49, 160, 132):
        out = tb.aggregate(kids, w2, None, None, True, _launch.aggregate_config_tuple(c))
        assert (out.double() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item(), c


# ------------------------------------------------------------------------------------ errors and fakes

def _run_py(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


_NO_INTERP_CODE = """
    import torch, dla_fast.ops as ops
    from dla_fast.backends import triton as tb
    x = torch.randn(1, 3, 5, 5)
    why = tb.unavailable_reason(x)
    assert why is not None and "TRITON_INTERPRET" in why and "CUDA" in why, why
    try:
        ops.conv_bn_act(x, torch.randn(4, 3, 3, 3), backend="triton")
    except RuntimeError as e:
        assert "TRITON_INTERPRET" in str(e), str(e)
    else:
        raise AssertionError("no error")
    print("OK")
"""


@needs_triton
def test_cpu_without_interpreter_is_refused_clearly():
    if INTERP:
        p = _run_py(_NO_INTERP_CODE, interpret=False)
        assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
    else:
        exec(textwrap.dedent(_NO_INTERP_CODE), {})


_BF16_CODE = """
    import torch, dla_fast.ops as ops
    from dla_fast.backends import triton as tb
    x = torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)
    why = tb.unavailable_reason(x)
    assert why is not None and "bfloat16" in why, why
    try:
        ops.aggregate([x], torch.randn(4, 3, dtype=torch.bfloat16), backend="triton")
    except RuntimeError as e:
        assert "bfloat16" in str(e) and "interpreter" in str(e), str(e)
    else:
        raise AssertionError("no error")
    assert tb.unavailable_reason(x.float()) is None
    print("OK")
"""


@needs_triton
def test_bf16_in_interpreter_is_refused_clearly():
    if INTERP:
        exec(textwrap.dedent(_BF16_CODE), {})
    else:
        p = _run_py(_BF16_CODE, interpret=True)
        assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


@needs_triton
def test_unsupported_dtype_is_refused_clearly():
    from dla_fast.backends import triton as tb
    why = tb.unavailable_reason(torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    assert why is not None and "float64" in why and "backend='eager'" in why


@needs_triton
def test_fake_tensors_give_channels_last_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode
    import dla_fast.backends.triton  # noqa: F401  (registers the ops)
    with FakeTensorMode():
        x = torch.empty(2, 8, 7, 5)
        w = torch.empty(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        y = torch.ops.dla_fast_triton.conv_bn_act(x, w, None, [2, 2], [1, 1], 1, None, True, [0])
        assert y.shape == (2, 16, 4, 3) and y.is_contiguous(memory_format=torch.channels_last)
        z = torch.ops.dla_fast_triton.aggregate([x, x[:, :3]], torch.empty(4, 11), None, None, True, [0])
        assert z.shape == (2, 4, 7, 5) and z.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------- real shapes on a GPU

def _dla_shapes():
    """One conv and one aggregation node of each kind among the layers of the 12 variants at 224x224, read off
    the models (dla_fast.shapes), as the dicts below take them: the first layer (in model order) of each kind
    (grouping and stride; for dense convs also kernel, output width and channel alignment; for roots the number
    of children, residual kind and alignment). Residual and layout are these tests' own parameters."""
    from dla_fast import list_models
    from dla_fast.shapes import distinct_shapes
    convs, aggs = {}, {}
    for e in distinct_shapes(list_models(), batch=2, hw=224):
        s = e.shape
        if s.op == "aggregate":
            d = dict(children=s.cin, cout=s.cout, h=s.hw[0],
                     shortcut={"none": False, "child0": True, "tensor": "res"}[s.residual])
            d["name"] = f"agg {'+'.join(map(str, s.cin))}->{s.cout} @{s.hw[0]} {s.residual}"
            aggs.setdefault((len(s.cin), s.residual, all(c % 64 == 0 for c in s.cin)), d)
            continue
        cin_g = s.cin[0] // s.groups
        kind = "rgb" if s.cin[0] < 8 else "dense" if s.groups == 1 else f"{cin_g}/group"
        d = dict(cin=s.cin[0], cout=s.cout, h=s.hw[0], k=s.kernel[0], stride=s.stride[0], pad=s.padding[0],
                 groups=s.groups, kind=kind)
        d["name"] = f"conv {s.cin[0]}->{s.cout} k{s.kernel[0]} s{s.stride[0]} g{s.groups} @{s.hw[0]}"
        tiles = (min(w for w in (16, 32, 64, 128, 256, 10 ** 9) if s.cout <= w), s.cin[0] % 64 == 0, s.cin[0] % 8 == 0,
                 s.cout % 64 == 0)
        convs.setdefault((kind, s.stride[0]) + ((s.kernel[0],) + tiles if kind == "dense" else ()), d)
    return list(convs.values()), list(aggs.values())


# Read off the models only where these tests can run: building the 12 variants takes seconds per process.
_CONV_SHAPES, _AGG_SHAPES = _dla_shapes() if torch.cuda.is_available() else ([], [])
# A core subset gets every dtype; all shapes get fp16 (and bf16 for the roots). Compiling ~100 kernel
# specialisations dominates the run time: on a GPU machine use pytest-xdist (-n 8). The core: the stem, the
# first dense 3x3 (stride 1 and 2) and 1x1 layers, a 64-channel-aligned 3x3, the 28-channel Res2Net 3x3s, and
# the grouped convs with 2, 4 and 16 channels a group.
_CORE_CONVS = {s["name"] for s in _CONV_SHAPES if s["kind"] in ("rgb", "2/group", "4/group", "16/group")
               and s["stride"] == 1 or s["kind"] == "dense" and (s["h"] == 224 or s["cin"] == 28
                                                                  or (s["k"], s["cin"], s["stride"]) == (3, 128, 1))}
_CORE_CONVS |= set([s["name"] for s in _CONV_SHAPES if s["kind"] == "dense" and s["k"] == 1][:1])
_CONV_PARAMS = [(s, torch.float16, False) for s in _CONV_SHAPES] + [
    (s, dt, tf) for s in _CONV_SHAPES if s["name"] in _CORE_CONVS
    for dt, tf in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True))]
# The core roots: two children, four (dla34's level 3), the most (dla169's seven, with the shortcut), and the
# Res2Net block's four 28-channel splits with a residual tensor.
_CORE_AGGS = {s["name"] for s in _AGG_SHAPES if len(s["children"]) in (2, 4) and s["shortcut"] is False
              or len(s["children"]) == 7 or s["children"][0] == 28}
_AGG_PARAMS = [(s, dt, False) for s in _AGG_SHAPES for dt in (torch.float16, torch.bfloat16)] + [
    (s, torch.float32, tf) for s in _AGG_SHAPES if s["name"] in _CORE_AGGS for tf in (False, True)]


def _pid(p):
    s, dt, tf = p
    return f"{s['name']}-{str(dt).split('.')[-1]}{'-tf32' if tf else ''}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("p", _CONV_PARAMS, ids=[_pid(p) for p in _CONV_PARAMS])
def test_conv_dla_shapes_cuda(p):
    s, dtype, tf32 = p
    torch.manual_seed(7)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    _conv_case(2, s["cin"], s["cout"], s["h"], s["h"], s["k"], s["stride"], s["pad"], s["groups"], dtype,
               residual=True, relu=True, device="cuda", x_layout="cl", res_layout="cl", tf32=tf32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("p", _AGG_PARAMS, ids=[_pid(p) for p in _AGG_PARAMS])
def test_aggregate_dla_shapes_cuda(p):
    s, dtype, tf32 = p
    torch.manual_seed(8)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    res = {True: True, False: False, "res": "cl"}[s["shortcut"]]
    _agg_case(2, s["children"], s["cout"], s["h"], s["h"], dtype, residual=res, relu=True,
              layouts=["cl"] * len(s["children"]), device="cuda", tf32=tf32)


@pytest.mark.cuda
@needs_cuda
def test_recycled_nan_memory_cuda(monkeypatch):
    """Without the poison switch: outputs land in freed NaN-filled blocks of the caching allocator."""
    monkeypatch.delenv("DLA_FAST_TRITON_POISON")
    torch.manual_seed(9)
    x = _rand(2, 64, 28, 28, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = _rand(64, 2, 3, 3, dtype=torch.float16, scale=0.2).contiguous(memory_format=torch.channels_last)
    w2 = _rand(64, 128, dtype=torch.float16, scale=0.1)
    for _ in range(3):
        junk = torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)
        del junk
        y = ops.conv_bn_act(x, w, None, stride=1, padding=1, groups=32, relu=True, backend="triton")
        z = ops.aggregate([x, y], w2, None, residual=True, relu=True, backend="triton")
        torch.cuda.synchronize()
        assert torch.isfinite(y).all() and torch.isfinite(z).all()


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_capture():
    import dla_fast.backends.triton as tb
    torch.manual_seed(10)
    x = _rand(2, 32, 14, 14, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = _rand(64, 32, 3, 3, dtype=torch.float16, scale=0.05).contiguous(memory_format=torch.channels_last)
    b = _rand(64)
    w2 = _rand(64, 96, dtype=torch.float16, scale=0.1)

    def f(x):
        y = tb.conv_bn_act(x, w, b, (1, 1), (1, 1), 1, None, True)
        return tb.aggregate([y, x], w2, b, y, True)

    expect = f(x)  # also compiles the kernels outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f(x)
    x.copy_(_rand(2, 32, 14, 14, dtype=torch.float16))
    expect = f(x)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_split_k_reduced_in_the_kernel_cuda(dtype):
    """The in-kernel split-K reduction on dla34's batch-1 split layers (the heuristic's own split counts): the
    epilogue kernel's bits on every one of many launches (a race on the counters or a stale partial would show
    as a mismatch), eagerly on two streams, and replayed from CUDA graphs, two graphs replayed back to back."""
    from dla_fast.backends.triton import _launch
    torch.manual_seed(12)
    cases = [(512, 512, 7, 3, 1), (256, 256, 14, 3, 1), (128, 256, 28, 3, 2), (64, 64, 56, 3, 1)]
    for cin, cout, h, k, st in cases:
        x = _rand(1, cin, h, h, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = _rand(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5).contiguous(
            memory_format=torch.channels_last)
        b = _rand(cout)
        ho = (h + 2 - k) // st + 1
        r = _rand(1, cout, ho, ho, dtype=dtype).contiguous(memory_format=torch.channels_last)
        cfg = _launch.conv_plan(ho * ho, cin, cout, 1, k, k, dtype, True, False,
                                sms=_launch._sm_count(torch.device("cuda")))
        assert cfg["SPLIT"] > 1, (cin, cout, h, cfg)

        def run(reduce):
            return _launch.conv_launch(x, w, b, (st, st), (1, 1), 1, r, True, True, config=dict(cfg, REDUCE=reduce))
        expect = run(0)
        outs = [run(1) for _ in range(50)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outs += [run(1) for _ in range(20)]
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert all(torch.equal(o, expect) for o in outs), (cin, cout, h)
        graphs = []
        for _ in range(2):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = run(1)
            graphs.append((g, y))
        for _ in range(10):
            for g, _ in graphs:
                g.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(y, expect) for _, y in graphs), (cin, cout, h)
    pool = _launch._COUNTER_POOLS[("cuda", torch.cuda.current_device())]
    assert int(pool.buf.count_nonzero()) == 0


# ---------------------------------------------------------------------------------------- TF32 rounding
def _tf32_round_ref(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, to 10 mantissa bits (what cvt.rna.tf32.f32 does)."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (u + 0x1000) & 0xFFFFE000
    r = torch.where(r >= 2 ** 31, r - 2 ** 32, r).to(torch.int32)
    return r.view(torch.float32)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from dla_fast.backends.triton._kernels import tf32_round

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(y_ptr + offs, tf32_round(tl.load(x_ptr + offs, mask=ok, other=0.0)), mask=ok)


@pytest.mark.interpreter
@needs_kernels
def test_tf32_round_is_round_to_nearest():
    """fp32 GEMM operands are rounded to TF32 before the tensor cores truncate them: plain truncation biased
    a whole DLA's fp32 output 2-6x further from float64 than cuDNN's."""
    g = torch.Generator().manual_seed(11)
    one = 1.0
    ties = torch.tensor([one + 2 ** -11, -(one + 2 ** -11), one + 3 * 2 ** -11, 2 ** -11 + 2 ** -22])
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), 3.0e38, 1e-40])
    x = torch.cat([torch.randn(1000, generator=g) * 10.0 ** torch.randint(-20, 20, (1000,), generator=g),
                   ties, special]).float()
    y = torch.empty_like(x)
    xd, yd = x.to(DEV), y.to(DEV)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](xd, yd, x.numel(), BLOCK=256)
    out = yd.cpu()
    expect = _tf32_round_ref(x)
    assert torch.equal(out.view(torch.int32), expect.view(torch.int32))
    assert (out.view(torch.int32) & 0x1FFF).eq(0).all()                   # 10 mantissa bits left
    assert out[1000].item() == one + 2 ** -10 and out[1001].item() == -(one + 2 ** -10)  # ties away from 0
    assert out[1002].item() == one + 2 ** -9
    fin = torch.isfinite(x) & (x.abs() > 1e-37)
    rel = ((out[fin].double() - x[fin].double()).abs() / x[fin].double().abs()).max().item()
    assert rel <= 2 ** -11
