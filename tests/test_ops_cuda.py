"""GPU tests of the CUDA C++ backend through the public API (``dla_fast.ops.*(..., backend="cuda")``).

Reference: ``dla_fast.ops.reference`` on float64 copies of the inputs. fp32 runs with TF32 off and must be
IEEE-accurate (max error / max |ref| <= 1e-5); fp16/bf16 must be within 2x eager PyTorch's error in the same
dtype plus a small floor. Outputs are poisoned with NaN before every call so unwritten elements show up.
Skipped without a GPU (conftest) and, unless DLA_FAST_REQUIRE_EXT=1, without the built extension.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import dla_fast.backends.cuda as cu
import dla_fast.ops as ops
from dla_fast.ops.reference import aggregate_ref, conv_bn_act_ref

pytestmark = pytest.mark.cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE = os.environ.get("DLA_FAST_REQUIRE_EXT", "").strip() not in ("", "0")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
DT_ID = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


@pytest.fixture(autouse=True)
def _needs_ext_and_ieee():
    if cu._C is None:
        if REQUIRE:
            pytest.fail(f"DLA_FAST_REQUIRE_EXT=1 but dla_fast._C is not importable: {cu._load_error}")
        pytest.skip(f"dla_fast._C not built ({cu._load_error})")
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------------------------------- helpers
def poison(numel: int, dtype):
    junk = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device="cuda")
    del junk


def max_err(y, ref) -> float:
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_close(y, ref64, eager, dtype, what=""):
    assert y.dtype == dtype, what
    assert tuple(y.shape) == tuple(ref64.shape), what
    assert y.is_contiguous(memory_format=torch.channels_last), f"{what}: output not channels_last {y.stride()}"
    e, e_eager = max_err(y, ref64), max_err(eager, ref64)
    tol = 2 * e_eager + FLOOR[dtype]
    assert e <= tol, f"{what}: err {e:.3g} > tol {tol:.3g} (eager {e_eager:.3g}) kernel '{cu.last_kernel()}'"


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, device="cuda", generator=gen).to(dtype)


def layout(t: torch.Tensor, kind: str, gen) -> torch.Tensor:
    """The same values in another memory layout: channels_last, NCHW, a channel slice of a wider NHWC tensor
    (torch.split's views), or a spatially strided NHWC view."""
    if kind == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "nchw":
        return t.contiguous()
    n, c, h, w = t.shape
    if kind in ("slice", "slice8"):  # slice8: offset 8, pitch c + 16: the 16-byte gather still applies
        o, extra = (4, 12) if kind == "slice" else (8, 16)
        big = torch.randn(n, c + extra, h, w, device="cuda", generator=gen).to(t.dtype)
        big = big.contiguous(memory_format=torch.channels_last)
        big[:, o:o + c].copy_(t)
        return big[:, o:o + c]
    if kind == "strided":
        big = torch.randn(n, c, 2 * h, w + 1, device="cuda", generator=gen).to(t.dtype)
        big = big.contiguous(memory_format=torch.channels_last)
        v = big[:, :, ::2, 1:]
        v.copy_(t)
        return v
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------- conv
# (N, Cin, H, W, Cout, k, stride, pad, groups): odd H/W, batch 1, channels not multiple of 8, kernel 1/3/7,
# stride 1/2, groups 1/4/8/32/depthwise, Cout tails beyond a tile
CONV_CASES = [
    (2, 16, 9, 11, 32, 3, 1, 1, 1),     # tc vw8, bn32
    (1, 3, 15, 17, 16, 7, 1, 3, 1),     # stem-like, scalar gather, bn16
    (2, 3, 20, 21, 32, 7, 2, 3, 1),     # stem stride 2
    (1, 20, 7, 9, 24, 3, 2, 1, 1),      # Cin % 8 = 4: 8-byte gather
    (2, 12, 6, 6, 20, 1, 1, 0, 1),      # 1x1, C % 8 = 4, Cout % 8 = 4
    (2, 13, 5, 7, 19, 3, 1, 1, 1),      # odd channels: scalar gather, odd Cout (scalar stores)
    (2, 64, 14, 14, 128, 1, 1, 0, 1),   # plain GEMM
    (1, 64, 13, 13, 64, 3, 2, 1, 1),    # stride 2, odd spatial
    (2, 200, 7, 7, 300, 1, 1, 0, 1),    # Cout tail past a 128 tile
    (1, 96, 3, 3, 1000, 1, 1, 0, 1),    # classifier-like, many column tiles
    (2, 32, 10, 10, 32, 3, 1, 1, 8),    # 4 ch/group: direct
    (2, 128, 9, 9, 128, 3, 2, 1, 32),   # 4 ch/group, stride 2: direct
    (2, 256, 7, 7, 256, 3, 1, 1, 8),    # 32 ch/group: tensor cores, group grid
    (2, 64, 8, 8, 64, 3, 1, 1, 4),      # 16 ch/group: tensor cores, bn16
    (2, 8, 5, 5, 8, 3, 1, 1, 8),        # depthwise
    (1, 48, 1, 1, 40, 3, 1, 1, 1),      # 1x1 spatial with padding: all taps but the centre are halo
    (2, 3, 70, 33, 16, 7, 1, 3, 1),     # the RGB stem kernel (no residual): partial 32x32 tiles both ways
    (1, 3, 97, 130, 16, 7, 1, 3, 1),    # stem kernel, batch 1, many tiles
    (2, 64, 9, 7, 64, 3, 1, 1, 8),      # 8 ch/group: grouped kernel, 16-byte loads
    (1, 256, 7, 7, 256, 3, 2, 1, 32),   # 8 ch/group, stride 2, batch 1, several blocks of 8 groups
    (3, 40, 5, 6, 40, 3, 1, 1, 10),     # 4 ch/group (direct kernel), 10 groups
]
RES_RELU = [(False, True), (True, True), (True, False), (False, False)]


def _conv_inputs(case, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n, c, h, w, co, k, s, p, grp = case
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    x = rand(n, c, h, w, dtype=dtype, gen=g)
    wt = (rand(co, c // grp, k, k, gen=g) / ((c // grp) * k * k) ** 0.5).to(dtype)
    b = 0.1 * rand(co, gen=g)
    r = rand(n, co, ho, wo, dtype=dtype, gen=g)
    return g, x, wt, b, r


def _run_conv(case, dtype, lay="cl", with_res=True, relu=True, seed=0):
    g, x, wt, b, r = _conv_inputs(case, dtype, seed)
    n, c, h, w, co, k, s, p, grp = case
    res = r if with_res else None
    ref64 = conv_bn_act_ref(x.double(), wt.double(), b.double(), (s, s), (p, p), grp,
                            None if res is None else res.double(), relu)
    eager = conv_bn_act_ref(x, wt, b, (s, s), (p, p), grp, res, relu)
    xl = layout(x, lay, g)
    rl = None if res is None else layout(res, lay if lay != "slice" else "cl", g)
    poison(ref64.numel(), dtype)
    y = ops.conv_bn_act(xl, wt, b, stride=s, padding=p, groups=grp, residual=rl, relu=relu, backend="cuda")
    return y, ref64, eager


@pytest.mark.parametrize("res_relu", RES_RELU, ids=lambda v: f"res{int(v[0])}relu{int(v[1])}")
@pytest.mark.parametrize("lay", ["cl", "nchw", "slice", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv(case, dtype, lay, res_relu):
    with_res, relu = res_relu
    if lay in ("slice", "strided") and res_relu != (True, True):
        pytest.skip("layouts are covered with residual+relu; the epilogue variants with channels_last")
    y, ref64, eager = _run_conv(case, dtype, lay, with_res, relu)
    assert_close(y, ref64, eager, dtype, f"{case} {lay}")


# The tensor-core kernels finish 16-byte-aligned outputs through a staged epilogue (8 channels per store) and the
# rest pair by pair: a residual that is a channel slice at offset 4 (not 16-byte aligned) must take the pair path,
# one at offset 8 the staged path, and both be right. Cases: mma.sync bn32, block-diagonal, wgmma/mma.sync bn128,
# and an M tail inside the staged tile.
@pytest.mark.parametrize("kernel", ["auto", "auto-gather", "tc"])
@pytest.mark.parametrize("res_lay", ["slice", "slice8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("case", [(2, 16, 9, 11, 32, 3, 1, 1, 1), (2, 64, 7, 6, 64, 3, 1, 1, 16),
                                  (2, 64, 14, 14, 128, 1, 1, 0, 1), (1, 40, 5, 7, 48, 3, 1, 1, 1)],
                         ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv_residual_slice_epilogues(case, dtype, res_lay, kernel, monkeypatch):
    monkeypatch.setenv("DLA_FAST_CUDA_KERNEL", kernel.replace("-gather", ""))
    monkeypatch.setenv("DLA_FAST_CUDA_IM2COL", "0" if kernel.endswith("-gather") else "1")
    g, x, wt, b, r = _conv_inputs(case, dtype, seed=3)
    n, c, h, w, co, k, s, p, grp = case
    ref64 = conv_bn_act_ref(x.double(), wt.double(), b.double(), (s, s), (p, p), grp, r.double(), True)
    eager = conv_bn_act_ref(x, wt, b, (s, s), (p, p), grp, r, True)
    rl = layout(r, res_lay, g)
    poison(ref64.numel(), dtype)
    y = ops.conv_bn_act(layout(x, "cl", g), wt, b, stride=s, padding=p, groups=grp, residual=rl, relu=True,
                        backend="cuda")
    assert_close(y, ref64, eager, dtype, f"{case} residual {res_lay} {kernel}")
    assert cu.last_kernel().startswith(("tc", "wgmma")), cu.last_kernel()


def _wgmma_can(case_cin_g: int, dtype) -> bool:
    """Whether a forced wgmma really runs: Hopper build + device, fp16/bf16, channel runs of 8 (16-byte gather)."""
    return cu.has_wgmma() and dtype != torch.float32 and case_cin_g % 8 == 0


@pytest.mark.parametrize("kernel", ["simt", "direct", "tc", "wgmma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", CONV_CASES[:14], ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv_forced_kernel(case, dtype, kernel, monkeypatch):
    """Every kernel family on shapes it would not be picked for (the fallbacks must be right too)."""
    monkeypatch.setenv("DLA_FAST_CUDA_KERNEL", kernel)
    y, ref64, eager = _run_conv(case, dtype)
    assert_close(y, ref64, eager, dtype, f"{case} forced {kernel}")
    used = cu.last_kernel()
    if kernel == "direct":
        assert used.startswith("direct"), used
    elif kernel == "simt" or dtype == torch.float32:
        assert used.startswith("simt"), used
    elif kernel == "tc" or not _wgmma_can(case[1] // case[8], dtype):
        assert used.startswith("tc"), used  # mma.sync, also where a forced wgmma cannot run
    else:
        assert used.startswith("wgmma"), used


# Hopper kernel on DLA-like shapes: many k tiles (pipeline wrap-around), K not a multiple of the 64-wide k tile,
# M and N tails, batch 1, grouped with 16 channels a group, strided and sliced inputs.
WGMMA_CASES = [
    (2, 256, 14, 14, 256, 3, 1, 1, 1),   # K = 2304: 36 k tiles
    (1, 64, 15, 13, 64, 3, 1, 1, 1),     # batch 1, odd spatial
    (2, 24, 11, 9, 72, 3, 2, 1, 1),      # K = 216: tail of the last k tile; Cout 72: N tail
    (1, 512, 7, 7, 512, 3, 1, 1, 1),     # the dla34 level-5 shape at batch 1
    (2, 128, 28, 28, 256, 1, 1, 0, 1),   # 1x1, wide
    (2, 256, 9, 9, 128, 3, 2, 1, 2),     # grouped, 128 channels a group
    (3, 64, 6, 5, 300, 1, 1, 0, 1),      # 3 column tiles with a tail
    # narrow tiles (BN 16/32, BK 32, one warpgroup)
    (2, 32, 13, 11, 32, 3, 1, 1, 1),     # BN 32, odd spatial, 9 k tiles
    (1, 16, 9, 7, 16, 3, 2, 1, 1),       # BN 16, batch 1, stride 2, K = 144: half a last k tile
    (2, 24, 7, 9, 24, 3, 1, 1, 1),       # K = 216, Cout 24 of a 32-wide tile
    (2, 40, 5, 6, 8, 1, 1, 0, 1),        # 1x1, Cout 8 of a 16-wide tile, K = 40
    (2, 64, 9, 9, 64, 3, 1, 1, 4),       # 16 channels a group: BN 16 per group
    (1, 128, 6, 7, 128, 3, 2, 1, 4),     # 32 channels a group, batch 1, stride 2
    # block-diagonal (4 / 8 channels a group, 32-channel super-groups)
    (2, 64, 9, 11, 64, 3, 1, 1, 16),     # 4 a group: B chunks filled by two 8-byte copies
    (1, 64, 7, 5, 64, 3, 2, 1, 8),       # 8 a group, batch 1, stride 2
    (2, 96, 5, 6, 96, 3, 1, 1, 24),      # 4 a group, 3 super-groups
]


@pytest.mark.parametrize("im2col", ["1", "0"])
@pytest.mark.parametrize("lay", ["cl", "slice8", "strided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("case", WGMMA_CASES, ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv_wgmma(case, dtype, lay, im2col, monkeypatch):
    """Both ways of loading A on the 64/128-wide tiles: TMA im2col (dense, input channels a multiple of 64) and the
    cp.async gather (everything else, and everything with DLA_FAST_CUDA_IM2COL=0)."""
    if not cu.has_wgmma():
        pytest.skip("needs an sm_90a build on a compute capability 9.x GPU")
    monkeypatch.setenv("DLA_FAST_CUDA_IM2COL", im2col)
    n, c, h, w, co, k, s, p, grp = case
    tma = im2col == "1" and grp == 1 and c % 64 == 0 and co > 32
    for with_res, relu in RES_RELU if lay == "cl" else [(True, True)]:
        y, ref64, eager = _run_conv(case, dtype, lay, with_res, relu, seed=hash(case) % 1000)
        assert_close(y, ref64, eager, dtype, f"{case} {lay} res{with_res} relu{relu}")
        assert cu.last_kernel().startswith("wgmma"), cu.last_kernel()
        assert cu.last_kernel().endswith(" tma") == tma, cu.last_kernel()


def test_conv_kernel_choice():
    """fp16 picks tensor cores with the widest legal gather (wgmma where it runs); few channels per group go
    block-diagonal or direct."""
    wg = cu.has_wgmma()
    for case, expect in [((2, 16, 9, 11, 32, 3, 1, 1, 1), "wgmma f16 bn32" if wg else "tc f16 vw8"),
                         ((1, 20, 7, 9, 24, 3, 2, 1, 1), "tc f16 vw4"),
                         ((1, 3, 15, 17, 16, 7, 1, 3, 1), "simt f16"),  # RGB stem with a residual: generic path
                         ((2, 3, 20, 21, 32, 7, 2, 3, 1), "simt f16"),  # < 8 input channels, not the stem
                         ((2, 13, 5, 7, 19, 3, 1, 1, 1), "tc f16 vw1"),
                         ((2, 32, 10, 10, 32, 3, 1, 1, 8), "wgmma-blockdiag f16 g4" if wg else "tc-blockdiag f16 g4 vw4"),
                         ((2, 64, 9, 7, 64, 3, 1, 1, 8), "wgmma-blockdiag f16 g8" if wg else "tc-blockdiag f16 g8 vw8"),
                         ((2, 64, 9, 7, 64, 3, 1, 1, 4), "wgmma f16 bn16" if wg else "tc f16 vw8 bn16"),
                         ((3, 40, 5, 6, 40, 3, 1, 1, 10), "direct f16"),  # 40 channels: no 32-channel super-groups
                         ((2, 8, 5, 5, 8, 3, 1, 1, 8), "direct f16")]:
        _run_conv(case, torch.float16)
        assert cu.last_kernel().startswith(expect), (case, cu.last_kernel())
    # 64+ output channels with the 16-byte gather: wgmma on Hopper builds/devices, else mma.sync
    _run_conv((2, 64, 14, 14, 128, 1, 1, 0, 1), torch.float16)
    assert cu.last_kernel() == ("wgmma f16 bn64 tma" if cu.has_wgmma() else "tc f16 vw8 bn64"), cu.last_kernel()
    _run_conv((2, 72, 14, 14, 128, 1, 1, 0, 1), torch.float16)  # 72 channels: no im2col map, the gather
    assert cu.last_kernel() == ("wgmma f16 bn64" if cu.has_wgmma() else "tc f16 vw8 bn64"), cu.last_kernel()
    for dtype in DTYPES:  # the RGB stem without a residual: its own kernel, in every dtype
        y, ref64, eager = _run_conv((1, 3, 15, 17, 16, 7, 1, 3, 1), dtype, with_res=False)
        assert cu.last_kernel() == f"stem7 {DT_ID[dtype]}", cu.last_kernel()
        assert_close(y, ref64, eager, dtype, "stem kernel")
    _run_conv(CONV_CASES[0], torch.float32)
    assert cu.last_kernel().startswith("simt f32")
    _run_conv((2, 64, 9, 7, 64, 3, 1, 1, 8), torch.float32)  # 8 channels a group in fp32: the CUDA-core kernel
    assert cu.last_kernel() == "grouped f32 g8", cu.last_kernel()


# The 192x256 tile (3 warpgroups, one block an SM, A by TMA im2col), forced by DLA_FAST_CUDA_WIDE_BN=256: the auto
# rule picks it only for grids of thousands of rows, too big for a float64 reference in every combination. Input
# channels are multiples of 64 (big_tile_ok() in launch.h); the im2col box starts mid-row and mid-image, wraps
# across images and runs past the last one (M tails), with strides 1 and 2, and taps up to 7x7 in the padding.
BIG_CASES = [
    (1, 64, 15, 13, 512, 3, 1, 1, 1),    # batch 1, 2 column tiles, M = 195: a 3-row second row tile
    (2, 64, 11, 9, 264, 3, 2, 1, 1),     # stride 2 on odd sizes (6x5 out); Cout 264: an 8-channel second column tile
    (3, 256, 9, 10, 260, 3, 1, 1, 1),    # K = 2304, 36 k tiles, M = 270; Cout 260: the unstaged epilogue
    (2, 128, 17, 16, 384, 1, 1, 0, 1),   # 1x1, 2 k tiles (fewer than the 4 stages), N tail of 128
    (2, 64, 12, 11, 256, 7, 2, 3, 1),    # 7x7 stride 2 padding 3: 49 taps, corners 3 pixels into the padding
    (3, 128, 14, 13, 256, 1, 2, 0, 1),   # 1x1 stride 2 (7x7 out), 2 k tiles
]


@pytest.mark.parametrize("lay", ["cl", "slice8", "strided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("case", BIG_CASES, ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv_wgmma_big(case, dtype, lay, monkeypatch):
    if not cu.has_wgmma():
        pytest.skip("needs an sm_90a build on a compute capability 9.x GPU")
    monkeypatch.setenv("DLA_FAST_CUDA_WIDE_BN", "256")
    for with_res, relu in RES_RELU if lay == "cl" else [(True, True)]:
        y, ref64, eager = _run_conv(case, dtype, lay, with_res, relu, seed=hash(case) % 1000)
        assert_close(y, ref64, eager, dtype, f"{case} {lay} res{with_res} relu{relu}")
        assert cu.last_kernel() == f"wgmma {DT_ID[dtype]} bn256 tma", cu.last_kernel()


def test_conv_big_tile_needs_im2col(monkeypatch):
    """Forced to 256 wide, a conv the im2col tensor map cannot serve (input channels not a multiple of 64, so a
    64-wide k tile would span two taps) runs on the 128-wide tile instead, and right."""
    if not cu.has_wgmma():
        pytest.skip("needs an sm_90a build on a compute capability 9.x GPU")
    monkeypatch.setenv("DLA_FAST_CUDA_WIDE_BN", "256")
    for case in [(2, 72, 11, 9, 264, 3, 2, 1, 1), (2, 96, 7, 9, 300, 1, 1, 0, 1)]:
        y, ref64, eager = _run_conv(case, torch.float16, seed=3)
        assert_close(y, ref64, eager, torch.float16, f"{case}")
        assert cu.last_kernel() == "wgmma f16 bn128", (case, cu.last_kernel())


def test_conv_big_tile_rule():
    """Without the override, a dense conv with > 128 outputs, input channels a multiple of 64 and K >= 256 gets the
    192x256 tile exactly when its grid needs at most 1.25x the wave-area of the 128x128 grid at two blocks an SM
    (pick_bn in host_utils.h), and the result is right."""
    if not cu.has_wgmma():
        pytest.skip("needs an sm_90a build on a compute capability 9.x GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for case, with_res in [((2, 512, 68, 68, 512, 3, 1, 1, 1), True),   # K 4608
                           ((2, 512, 68, 68, 512, 1, 1, 0, 1), True),   # K 512 with a residual
                           ((2, 256, 68, 68, 512, 1, 1, 0, 1), False),  # K 256
                           ((2, 256, 140, 140, 512, 1, 1, 0, 1), False),  # on the H100: area ratio 1.2
                           ((256, 256, 7, 7, 256, 1, 1, 0, 1), False),  # area ratio 1.5: 128 wide
                           ((2, 128, 68, 68, 512, 1, 1, 0, 1), False),  # K 128: 128 wide
                           ((2, 96, 68, 68, 512, 3, 1, 1, 1), False),   # 96 input channels: no im2col map
                           ((1, 512, 14, 14, 512, 3, 1, 1, 1), True)]:  # a small grid: 64 wide
        n, c, h, w, co, k = case[:6]
        m, kk = n * h * w, c * k * k
        b128 = -(-m // 128) * -(-co // 128)
        b256 = -(-m // 192) * -(-co // 256)
        area128 = -(-b128 // (2 * sms)) * 2 * 128 * 128
        area256 = -(-b256 // sms) * 192 * 256
        big = 4 * area256 <= 5 * area128 and kk >= 256 and c % 64 == 0
        y, ref64, eager = _run_conv(case, torch.float16, with_res=with_res, seed=5)
        assert_close(y, ref64, eager, torch.float16, f"{case}")
        expect = "wgmma f16 bn256" if big else ("wgmma f16 bn128" if b128 >= sms else "wgmma f16 bn64")
        expect += " tma" if c % 64 == 0 else ""
        assert cu.last_kernel() == expect, (case, with_res, cu.last_kernel())


@pytest.mark.parametrize("bn", ["64", "128", "256"])
def test_conv_wide_bn_override(bn, monkeypatch):
    """DLA_FAST_CUDA_WIDE_BN (benchmarking the width rule) picks the tile, and every width is right, with
    an N tail (Cout 200) and a grid that is not a whole number of waves."""
    monkeypatch.setenv("DLA_FAST_CUDA_WIDE_BN", bn)
    for dtype in (torch.float16, torch.bfloat16):
        y, ref64, eager = _run_conv((3, 128, 7, 9, 200, 3, 1, 1, 1), dtype, seed=int(bn))
        assert_close(y, ref64, eager, dtype, f"wide bn {bn}")
        assert f" bn{bn if bn != '256' or cu.has_wgmma() else '128'}" in cu.last_kernel(), cu.last_kernel()


def test_conv_wide_bn_bad_value(monkeypatch):
    monkeypatch.setenv("DLA_FAST_CUDA_WIDE_BN", "96")
    with pytest.raises(RuntimeError, match="DLA_FAST_CUDA_WIDE_BN must be 64, 128 or 256; got '96'"):
        _run_conv((1, 64, 5, 5, 256, 1, 1, 0, 1), torch.float16)


def test_conv_im2col_bad_value(monkeypatch):
    if not cu.has_wgmma():
        pytest.skip("the switch is read where a wgmma tile could load by TMA")
    monkeypatch.setenv("DLA_FAST_CUDA_IM2COL", "yes")
    with pytest.raises(RuntimeError, match="DLA_FAST_CUDA_IM2COL must be 0 or 1; got 'yes'"):
        _run_conv((1, 64, 5, 5, 256, 1, 1, 0, 1), torch.float16)


def test_conv_input_not_modified():
    g, x, wt, b, r = _conv_inputs(CONV_CASES[0], torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    r = r.contiguous(memory_format=torch.channels_last)
    x0, r0, w0 = x.clone(), r.clone(), wt.clone()
    ops.conv_bn_act(x, wt, b, padding=1, residual=r, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(x, x0) and torch.equal(r, r0) and torch.equal(wt, w0)


def test_conv_empty_batch():
    x = torch.empty(0, 16, 5, 5, device="cuda", dtype=torch.float16)
    w = torch.randn(8, 16, 3, 3, device="cuda", dtype=torch.float16)
    y = ops.conv_bn_act(x, w, padding=1, backend="cuda")
    assert y.shape == (0, 8, 5, 5)


# ------------------------------------------------------------------------------------------- aggregate
AGG_CASES = [
    # (child channels, Cout, H, W)
    ((64,), 64, 7, 9),
    ((64, 64), 64, 9, 7),
    ((128, 128, 64, 128), 128, 5, 5),
    ((28, 28, 28, 28), 128, 6, 7),   # Res2Net widths: 8-byte gather
    ((13, 7, 20), 24, 5, 3),          # odd channels: scalar gather
    ((8,) * 8, 16, 4, 4),             # the maximum of 8 children
    ((16, 48, 8), 300, 3, 5),         # Cout tail
    ((256, 256, 128), 256, 1, 1),     # 1x1 spatial
]
RES_KINDS = ["none", "child0", "tensor"]


def _run_agg(case, dtype, res_kind="none", relu=True, lay="cl", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    chans, co, h, w = case
    n = 2
    kids = [rand(n, c, h, w, dtype=dtype, gen=g) for c in chans]
    wt = (rand(co, sum(chans), gen=g) / sum(chans) ** 0.5).to(dtype)
    b = 0.1 * rand(co, gen=g)
    if res_kind == "child0":
        if chans[0] != co:
            pytest.skip("residual=True needs children[0] with Cout channels")
        res_t, res_arg = kids[0], True
    elif res_kind == "tensor":
        res_t = rand(n, co, h, w, dtype=dtype, gen=g)
        res_arg = res_t
    else:
        res_t, res_arg = None, False
    ref64 = aggregate_ref([k.double() for k in kids], wt.double(), b.double(),
                          None if res_t is None else res_t.double(), relu)
    eager = aggregate_ref(kids, wt, b, res_t, relu)
    kl = [layout(k, lay if i % 2 == 0 else "cl", g) for i, k in enumerate(kids)]  # mix layouts
    if res_kind == "child0":
        res_arg = True
    elif res_kind == "tensor":
        res_arg = layout(res_t, "cl" if lay == "slice" else lay, g)
    poison(ref64.numel(), dtype)
    y = ops.aggregate(kl, wt, b, residual=res_arg, relu=relu, backend="cuda")
    return y, ref64, eager


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("res_kind", RES_KINDS)
@pytest.mark.parametrize("lay", ["cl", "nchw", "slice"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", AGG_CASES, ids=lambda c: "c{}-o{}-{}x{}".format("+".join(map(str, c[0])), *c[1:]))
def test_aggregate(case, dtype, lay, res_kind, relu):
    if lay != "cl" and (res_kind, relu) != ("tensor", True):
        pytest.skip("layouts are covered with a tensor residual + relu")
    y, ref64, eager = _run_agg(case, dtype, res_kind, relu, lay)
    assert_close(y, ref64, eager, dtype, f"{case} {lay} {res_kind}")


@pytest.mark.parametrize("kernel", ["simt", "tc", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("case", AGG_CASES, ids=lambda c: "c{}-o{}-{}x{}".format("+".join(map(str, c[0])), *c[1:]))
def test_aggregate_forced_kernel(case, dtype, kernel, monkeypatch):
    monkeypatch.setenv("DLA_FAST_CUDA_KERNEL", kernel)
    for lay in ("cl", "slice8"):
        y, ref64, eager = _run_agg(case, dtype, "tensor", lay=lay)
        assert_close(y, ref64, eager, dtype, f"{case} {lay} {kernel}")
        used = cu.last_kernel()
        if kernel == "wgmma" and all(c % 8 == 0 for c in case[0]) and cu.has_wgmma():
            assert used.startswith("wgmma"), used
        else:
            assert used.startswith("tc" if kernel == "wgmma" else kernel), used


def test_aggregate_does_not_concat():
    """The inputs are read in place: no cat-sized allocation happens (only the output)."""
    kids = [torch.randn(4, 256, 28, 28, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
            for _ in range(3)]
    w = torch.randn(256, 768, device="cuda", dtype=torch.float16)
    ops.aggregate(kids, w, backend="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = ops.aggregate(kids, w, backend="cuda")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= y.numel() * y.element_size() + (1 << 20)


# ------------------------------------------------------------------------------------------- errors
def test_cpp_errors_are_clear():
    x = torch.randn(2, 16, 5, 5, device="cuda", dtype=torch.float16)
    w = torch.randn(8, 16, 3, 3, device="cuda", dtype=torch.float16)
    op, agg = torch.ops.dla_fast.conv_bn_act, torch.ops.dla_fast.aggregate
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        op(x.double(), w.double(), None, [1, 1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        op(x, w.float(), None, [1, 1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match="x has 16 channels"):
        op(x, w[:, :8], None, [1, 1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        op(x, w, None, [1, 1], [1, 1], 1, torch.randn(2, 8, 4, 4, device="cuda", dtype=torch.float16), True)
    with pytest.raises(RuntimeError, match="too small"):
        op(x[:, :, :1, :1], w, None, [1, 1], [0, 0], 1, None, True)
    with pytest.raises(RuntimeError, match="is on cpu"):
        op(x, w.cpu(), None, [1, 1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match="at most 8 children"):
        agg([x] * 9, torch.randn(8, 144, device="cuda", dtype=torch.float16), None, None, True)
    with pytest.raises(RuntimeError, match="weight expects 40 input channels"):
        agg([x, x], torch.randn(8, 40, device="cuda", dtype=torch.float16), None, None, True)
    with pytest.raises(RuntimeError, match="share batch and spatial size"):
        agg([x, x[:, :, :4]], torch.randn(8, 32, device="cuda", dtype=torch.float16), None, None, True)


def test_forced_kernel_name_must_be_known(monkeypatch):
    x = torch.randn(1, 16, 5, 5, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.float16)
    monkeypatch.setenv("DLA_FAST_CUDA_KERNEL", "fastest")
    with pytest.raises(RuntimeError, match="must be one of auto, wgmma, tc, simt, direct; got 'fastest'"):
        torch.ops.dla_fast.conv_bn_act(x, w, None, [1, 1], [1, 1], 1, None, True)


def test_public_api_on_wrong_dtype():
    x = torch.randn(1, 4, 5, 5, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        ops.conv_bn_act(x, torch.randn(8, 4, 3, 3, device="cuda", dtype=torch.float64), padding=1, backend="cuda")


# ------------------------------------------------------------------------------------------- torch integrations
def test_opcheck_cuda():
    g, x, wt, b, r = _conv_inputs(CONV_CASES[0], torch.float16)
    wt = wt.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.dla_fast.conv_bn_act.default, (x, wt, b, [1, 1], [1, 1], 1, r, True))
    kids = [rand(2, 16, 5, 7, dtype=torch.bfloat16), rand(2, 24, 5, 7, dtype=torch.bfloat16)]
    w2 = rand(32, 40, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dla_fast.aggregate.default, (kids, w2, None, rand(2, 32, 5, 7, dtype=torch.bfloat16), True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, w1, b1, w2, b2):
        y = cu.conv_bn_act(x, w1, b1, (1, 1), (1, 1), 1, None, True)
        return cu.aggregate([y, x], w2, b2, y, True)

    x = rand(2, 16, 9, 9, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w1 = rand(16, 16, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w2 = rand(16, 32, dtype=torch.float16)
    b1, b2 = rand(16), rand(16)
    expect = f(x, w1, b1, w2, b2)
    got = torch.compile(f, fullgraph=True)(x, w1, b1, w2, b2)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expect)


def test_cuda_graph_capture_and_replay():
    x = rand(2, 16, 9, 11, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w1 = (rand(32, 16, 3, 3) / 12).to(torch.float16).contiguous(memory_format=torch.channels_last)
    w2 = (rand(24, 48) / 7).to(torch.float16)
    b = rand(32)

    def run():
        y = ops.conv_bn_act(x, w1, b, padding=1, backend="cuda")
        return ops.aggregate([y, x], w2, None, backend="cuda")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up outside capture (lazy init, shared-memory attribute)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(rand(*x.shape, dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, run())


# ------------------------------------------------------------------------------------------- real DLA shapes
def _dla_cases():
    path = os.path.join(ROOT, "benchmarks", "gpu_cuda_check.py")
    try:
        import sys
        sys.path.insert(0, os.path.dirname(path))
        spec = importlib.util.spec_from_file_location("gpu_cuda_check", path)
        mod = importlib.util.module_from_spec(spec)
        # dataclasses look their module up in sys.modules while the class is being built
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        cases, _ = mod.load_cases(mod.MODELS)
        return mod, cases
    except Exception as e:  # pragma: no cover - keep collection alive; the test below reports it
        return e, []


_GPU_CHECK, _DLA_CASES = _dla_cases() if torch.cuda.is_available() else (None, [])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", _DLA_CASES or [None], ids=lambda c: "none" if c is None else
                         c.label().replace(" ", "_"))
def test_dla_layer_shapes_batch8(case, dtype):
    if case is None:
        pytest.fail(f"could not load the DLA shape list: {_GPU_CHECK}")
    rec = _GPU_CHECK.check_case(case, 8, dtype)
    assert rec["ok"], rec
