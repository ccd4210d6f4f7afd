"""GPU tests of the CUDA C++ backend: through the public API (``dla_fast.ops.*(..., backend="cuda")``, the
extension's own kernel rule) and through ``dla_fast.backends.cuda`` with a per-call ``config`` (a kernel family,
tile width and A load forced; csrc/ops/plan.h), including every config ``conv_candidates`` /
``aggregate_candidates`` offers for real DLA layer shapes.

Reference: ``dla_fast.ops.reference`` on float64 copies of the inputs. fp32 runs with TF32 off and must be
IEEE-accurate (max error / max |ref| <= 1e-5); fp16/bf16 must be within 2x eager PyTorch's error in the same
dtype plus a small floor. Outputs are poisoned with NaN before every call so unwritten elements show up. The
environment overrides (DLA_FAST_CUDA_*) are read once per process, so they are tested in subprocesses.
Skipped without a GPU (conftest) and, unless DLA_FAST_REQUIRE_EXT=1, without the built extension.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import dla_fast
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


def _run_conv(case, dtype, lay="cl", with_res=True, relu=True, seed=0, config=None):
    """The conv through the public API (config None: the extension's rule) or the backend with ``config``."""
    g, x, wt, b, r = _conv_inputs(case, dtype, seed)
    n, c, h, w, co, k, s, p, grp = case
    res = r if with_res else None
    ref64 = conv_bn_act_ref(x.double(), wt.double(), b.double(), (s, s), (p, p), grp,
                            None if res is None else res.double(), relu)
    eager = conv_bn_act_ref(x, wt, b, (s, s), (p, p), grp, res, relu)
    xl = layout(x, lay, g)
    rl = None if res is None else layout(res, lay if lay != "slice" else "cl", g)
    poison(ref64.numel(), dtype)
    if config is None:
        y = ops.conv_bn_act(xl, wt, b, stride=s, padding=p, groups=grp, residual=rl, relu=relu, backend="cuda")
    else:
        wl = wt.contiguous(memory_format=torch.channels_last)
        y = cu.conv_bn_act(xl, wl, b, (s, s), (p, p), grp, rl, relu, config)
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
@pytest.mark.parametrize("config", [(), (0, 0, 1), (2, 0, 0)], ids=["rule", "rule-gather", "tc"])
@pytest.mark.parametrize("res_lay", ["slice", "slice8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("case", [(2, 16, 9, 11, 32, 3, 1, 1, 1), (2, 64, 7, 6, 64, 3, 1, 1, 16),
                                  (2, 64, 14, 14, 128, 1, 1, 0, 1), (1, 40, 5, 7, 48, 3, 1, 1, 1)],
                         ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv_residual_slice_epilogues(case, dtype, res_lay, config):
    g, x, wt, b, r = _conv_inputs(case, dtype, seed=3)
    n, c, h, w, co, k, s, p, grp = case
    ref64 = conv_bn_act_ref(x.double(), wt.double(), b.double(), (s, s), (p, p), grp, r.double(), True)
    eager = conv_bn_act_ref(x, wt, b, (s, s), (p, p), grp, r, True)
    rl = layout(r, res_lay, g)
    poison(ref64.numel(), dtype)
    y = cu.conv_bn_act(layout(x, "cl", g), wt.contiguous(memory_format=torch.channels_last), b, (s, s), (p, p), grp,
                       rl, True, config)
    assert_close(y, ref64, eager, dtype, f"{case} residual {res_lay} {config}")
    assert cu.last_kernel().startswith(("tc", "wgmma")), cu.last_kernel()


def _wgmma_can(case_cin_g: int, dtype) -> bool:
    """Whether a forced wgmma really runs: Hopper build + device, fp16/bf16, channel runs of 8 (16-byte gather)."""
    return cu.has_wgmma() and dtype != torch.float32 and case_cin_g % 8 == 0


FAMILY = {"wgmma": 1, "tc": 2, "simt": 3, "direct": 4}


@pytest.mark.parametrize("kernel", ["simt", "direct", "tc", "wgmma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", CONV_CASES[:14], ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv_forced_kernel(case, dtype, kernel):
    """Every kernel family on shapes it would not be picked for (the fallbacks must be right too)."""
    y, ref64, eager = _run_conv(case, dtype, config=(FAMILY[kernel], 0, 0))
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


@pytest.mark.parametrize("a_load", [2, 1], ids=["tma", "gather"])
@pytest.mark.parametrize("lay", ["cl", "slice8", "strided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("case", WGMMA_CASES, ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_conv_wgmma(case, dtype, lay, a_load):
    """Both ways of loading A on the 64/128-wide tiles: TMA im2col (dense, input channels a multiple of 64) and the
    cp.async gather (everything else, and everything with a_load 1)."""
    if not cu.has_wgmma():
        pytest.skip("needs an sm_90a build on a compute capability 9.x GPU")
    n, c, h, w, co, k, s, p, grp = case
    tma = a_load == 2 and grp == 1 and c % 64 == 0 and co > 32  # the rule's width: 64+ for more than 32 outputs
    family = 7 if grp > 1 and c // grp < 16 else 1  # 4 or 8 channels a group: the block-diagonal wgmma kernel
    for with_res, relu in RES_RELU if lay == "cl" else [(True, True)]:
        y, ref64, eager = _run_conv(case, dtype, lay, with_res, relu, seed=hash(case) % 1000,
                                    config=(family, 0, a_load))
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
                         ((2, 32, 10, 10, 32, 3, 1, 1, 8),
                          "wgmma-blockdiag f16 g4" if wg else "tc-blockdiag f16 g4 vw4"),
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


# The 192x256 tile (3 warpgroups, one block an SM, A by TMA im2col), forced by config (1, 256, 0): the rule picks
# it only for grids of thousands of rows, too big for a float64 reference in every combination. Input
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
def test_conv_wgmma_big(case, dtype, lay):
    if not cu.has_wgmma():
        pytest.skip("needs an sm_90a build on a compute capability 9.x GPU")
    for with_res, relu in RES_RELU if lay == "cl" else [(True, True)]:
        y, ref64, eager = _run_conv(case, dtype, lay, with_res, relu, seed=hash(case) % 1000, config=(1, 256, 0))
        assert_close(y, ref64, eager, dtype, f"{case} {lay} res{with_res} relu{relu}")
        assert cu.last_kernel() == f"wgmma {DT_ID[dtype]} bn256 tma", cu.last_kernel()


def test_conv_big_tile_needs_im2col():
    """Asked for 256 wide, a conv the im2col tensor map cannot serve (input channels not a multiple of 64, so a
    64-wide k tile would span two taps; or a grouped conv) runs at the rule's width instead, and right."""
    if not cu.has_wgmma():
        pytest.skip("needs an sm_90a build on a compute capability 9.x GPU")
    for case in [(2, 72, 11, 9, 264, 3, 2, 1, 1), (2, 96, 7, 9, 300, 1, 1, 0, 1), (2, 512, 7, 7, 512, 3, 1, 1, 2)]:
        _run_conv(case, torch.float16, seed=3)
        rule = cu.last_kernel()
        y, ref64, eager = _run_conv(case, torch.float16, seed=3, config=(1, 256, 0))
        assert_close(y, ref64, eager, torch.float16, f"{case}")
        assert cu.last_kernel() == rule and "bn256" not in rule, (case, rule, cu.last_kernel())


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


@pytest.mark.parametrize("bn", [16, 32, 64, 128, 256])
def test_conv_config_width(bn):
    """config (0, bn, 0) picks the tile of the rule's family, and every width is right, with an N tail (Cout 200)
    and a grid that is not a whole number of waves; 256 needs wgmma (else the rule's width runs)."""
    case = (3, 128, 7, 9, 200, 3, 1, 1, 1)
    for dtype in (torch.float16, torch.bfloat16):
        _run_conv(case, dtype, seed=bn)
        rule = cu.last_kernel()
        y, ref64, eager = _run_conv(case, dtype, seed=bn, config=(0, bn, 0))
        assert_close(y, ref64, eager, dtype, f"bn {bn}")
        if bn != 256 or cu.has_wgmma():
            assert f" bn{bn}" in cu.last_kernel(), cu.last_kernel()
            assert cu.last_kernel().split()[0] == rule.split()[0], (rule, cu.last_kernel())
        else:
            assert cu.last_kernel() == rule, (rule, cu.last_kernel())


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


def _run_agg(case, dtype, res_kind="none", relu=True, lay="cl", seed=0, config=None):
    """The aggregation through the public API (config None: the rule) or the backend with ``config``."""
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
    if config is None:
        y = ops.aggregate(kl, wt, b, residual=res_arg, relu=relu, backend="cuda")
    else:
        res = kl[0] if res_arg is True else (None if res_arg is False else res_arg)
        y = cu.aggregate(kl, wt, b, res, relu, config)
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
def test_aggregate_forced_kernel(case, dtype, kernel):
    for lay in ("cl", "slice8"):
        y, ref64, eager = _run_agg(case, dtype, "tensor", lay=lay, config=(FAMILY[kernel], 0, 0))
        assert_close(y, ref64, eager, dtype, f"{case} {lay} {kernel}")
        used = cu.last_kernel()
        if kernel == "wgmma" and all(c % 8 == 0 for c in case[0]) and cu.has_wgmma():
            assert used.startswith("wgmma"), used
        else:
            assert used.startswith("tc" if kernel == "wgmma" else kernel), used


def test_aggregate_does_not_concat():
    """The inputs are read in place: no cat-sized allocation happens (only the output)."""
    kids = [torch.randn(4, 256, 28, 28, device="cuda", dtype=torch.float16)
            .contiguous(memory_format=torch.channels_last) for _ in range(3)]
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
    def op(*args):
        return torch.ops.dla_fast.conv_bn_act(*args, [])

    def agg(*args):
        return torch.ops.dla_fast.aggregate(*args, [])

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
    with pytest.raises(RuntimeError, match="need 1 to 8 children, got 9"):
        agg([x] * 9, torch.randn(8, 144, device="cuda", dtype=torch.float16), None, None, True)
    with pytest.raises(RuntimeError, match="need 1 to 8 children, got 0"):
        agg([], torch.randn(8, 144, device="cuda", dtype=torch.float16), None, None, True)
    with pytest.raises(RuntimeError, match="need stride >= 1"):
        op(x, w, None, [0, 1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match="stride and padding need 2 entries"):
        op(x, w, None, [1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match=r"weight must be \[Cout, sum\(C_i\)\]"):
        agg([x, x], torch.randn(8, 32, 3, 3, device="cuda", dtype=torch.float16), None, None, True)
    # the candidate queries make the same checks
    with pytest.raises(RuntimeError, match="x has 16 channels"):
        torch.ops.dla_fast.conv_candidates(x, w[:, :8], None, [1, 1], [1, 1], 1, None)
    with pytest.raises(RuntimeError, match="need 1 to 8 children, got 9"):
        torch.ops.dla_fast.aggregate_candidates([x] * 9, torch.randn(8, 144, device="cuda", dtype=torch.float16),
                                                None, None)
    with pytest.raises(RuntimeError, match="weight expects 40 input channels"):
        agg([x, x], torch.randn(8, 40, device="cuda", dtype=torch.float16), None, None, True)
    with pytest.raises(RuntimeError, match="share batch and spatial size"):
        agg([x, x[:, :, :4]], torch.randn(8, 32, device="cuda", dtype=torch.float16), None, None, True)


def test_public_api_on_wrong_dtype():
    x = torch.randn(1, 4, 5, 5, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        ops.conv_bn_act(x, torch.randn(8, 4, 3, 3, device="cuda", dtype=torch.float64), padding=1, backend="cuda")


# ------------------------------------------------------------------------------------------- torch integrations
def test_opcheck_cuda():
    g, x, wt, b, r = _conv_inputs(CONV_CASES[0], torch.float16)
    wt = wt.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.dla_fast.conv_bn_act.default, (x, wt, b, [1, 1], [1, 1], 1, r, True, []))
    torch.library.opcheck(torch.ops.dla_fast.conv_bn_act.default, (x, wt, b, [1, 1], [1, 1], 1, r, True, [3, 0, 0]))
    kids = [rand(2, 16, 5, 7, dtype=torch.bfloat16), rand(2, 24, 5, 7, dtype=torch.bfloat16)]
    w2 = rand(32, 40, dtype=torch.bfloat16)
    r2 = rand(2, 32, 5, 7, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dla_fast.aggregate.default, (kids, w2, None, r2, True, []))
    torch.library.opcheck(torch.ops.dla_fast.aggregate.default, (kids, w2, None, r2, True, [2, 64, 0]))
    torch.library.opcheck(torch.ops.dla_fast.max_pool.default, (rand(2, 16, 9, 11, dtype=torch.float16), 2))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, w1, b1, w2, b2):
        y = cu.conv_bn_act(x, w1, b1, (1, 1), (1, 1), 1, None, True, (2, 16, 1))
        a = cu.aggregate([y, x], w2, b2, y, True)
        return cu.max_pool(a, 2)

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
        return cu.max_pool(ops.aggregate([y, x], w2, None, backend="cuda"), 2)

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
    """Every distinct fused-layer shape of the 12 variants at 224x224 (the one shape source, dla_fast.shapes)."""
    try:
        import sys
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import opbench
        from dla_fast.shapes import distinct_shapes
        return opbench, [e.shape for e in distinct_shapes(dla_fast.list_models(), batch=8, hw=224)]
    except Exception as e:  # pragma: no cover - keep collection alive; the test below reports it
        return e, []


_OPBENCH, _DLA_CASES = _dla_cases() if torch.cuda.is_available() else (None, [])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", _DLA_CASES or [None], ids=lambda c: "none" if c is None else
                         c.label().replace(" ", "_"))
def test_dla_layer_shapes_batch8(case, dtype):
    """Every real layer shape through the CUDA backend's rule, against float64 (inputs rounded to ``dtype``)."""
    if case is None:
        pytest.fail(f"could not load the DLA shape list: {_OPBENCH}")
    c = _OPBENCH.build_case(case, 8, dtype, "cuda")
    ref = _OPBENCH._reference64(c)
    fn, _ = _OPBENCH.impl_fn(c, "cuda")
    out = fn()
    eager, _ = _OPBENCH.impl_fn(c, "eager")
    assert_close(out.cpu(), ref, eager().cpu(), dtype, case.label())


# ------------------------------------------------------------------------------------------- config: fallbacks, errors
def _matches(kernel: str, config) -> bool:
    """Whether last_kernel() names what ``config`` (fully specified) asks for."""
    fam, bn, a_load = config
    words = kernel.split()
    prefix = {1: "wgmma", 2: "tc", 3: "simt", 4: "direct", 5: "grouped", 6: "stem7", 7: "wgmma-blockdiag",
              8: "tc-blockdiag"}[fam]
    if words[0] != prefix:
        return False
    if fam in (1, 2, 7, 8) and f"bn{bn}" not in words:
        return False
    return fam != 1 or (words[-1] == "tma") == (a_load == 2)


def test_conv_config_fallbacks():
    """A config that cannot run a call falls back element by element to what the rule would run, and is right."""
    wg = cu.has_wgmma()
    rule_cases = [  # (case, dtype, config): config cannot run, so the rule's kernel runs
        ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (6, 0, 0)),    # stem on a dense conv
        ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (7, 0, 0)),    # blockdiag on a dense conv
        ((2, 32, 10, 10, 32, 3, 1, 1, 8), torch.float16, (5, 0, 0)),   # grouped kernel on 4 channels a group
        ((3, 40, 5, 6, 40, 3, 1, 1, 10), torch.float16, (8, 0, 0)),    # blockdiag without 32-channel super-groups
        ((1, 3, 15, 17, 16, 7, 1, 3, 1), torch.float16, (6, 16, 1)),   # stem with a residual
    ]
    for case, dtype, config in rule_cases:
        _run_conv(case, dtype, seed=1)
        rule = cu.last_kernel()
        y, ref64, eager = _run_conv(case, dtype, seed=1, config=config)
        assert_close(y, ref64, eager, dtype, f"{case} {config}")
        assert cu.last_kernel() == rule, (case, config, rule, cu.last_kernel())
    expect_cases = [  # (case, dtype, config, the kernel that runs)
        ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float32, (1, 128, 2), "simt f32"),        # no tensor cores in fp32
        ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float32, (2, 0, 0), "simt f32"),
        ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (4, 128, 2), "direct f16"),      # direct runs anything
        ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (3, 16, 2), "simt f16"),
        ((1, 20, 7, 9, 200, 3, 2, 1, 1), torch.float16, (2, 128, 0), "tc f16 vw4 bn64"),  # 128 needs the 16-byte gather
        ((1, 20, 7, 9, 200, 3, 2, 1, 1), torch.float16, (1, 128, 0), "tc f16 vw4 bn64"),  # wgmma too: mma.sync
        ((2, 64, 9, 7, 64, 3, 1, 1, 8), torch.bfloat16, (8, 0, 0), "tc-blockdiag bf16 g8 vw8 bn32"),
        ((2, 64, 9, 7, 64, 3, 1, 1, 8), torch.bfloat16, (7, 0, 0),
         "wgmma-blockdiag bf16 g8 bn32" if wg else "tc-blockdiag bf16 g8 vw8 bn32"),
        ((2, 64, 9, 7, 64, 3, 1, 1, 8), torch.float32, (7, 0, 0), "grouped f32 g8"),    # the rule's
        ((2, 64, 9, 7, 64, 3, 1, 1, 8), torch.float16, (5, 0, 0), "grouped f16 g8"),
        ((2, 32, 10, 10, 32, 3, 1, 1, 8), torch.float16, (8, 64, 2), "tc-blockdiag f16 g4 vw4 bn32"),
        ((1, 3, 15, 17, 16, 7, 1, 3, 1), torch.float16, (2, 0, 0), "tc f16 vw1 bn16"),
    ]
    if wg:
        expect_cases += [
            ((2, 72, 9, 7, 128, 3, 1, 1, 1), torch.float16, (1, 128, 2), "wgmma f16 bn128"),      # no im2col map
            ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (1, 32, 2), "wgmma f16 bn32"),       # TMA needs 64+
            ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (1, 64, 2), "wgmma f16 bn64 tma"),
            ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (1, 128, 1), "wgmma f16 bn128"),
            ((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (1, 256, 1), "wgmma f16 bn256 tma"),  # 256: TMA only
            ((2, 64, 9, 7, 128, 3, 1, 1, 4), torch.float16, (1, 256, 2), None),  # grouped: no 256, no TMA
        ]
    else:
        expect_cases += [((2, 64, 9, 7, 128, 3, 1, 1, 1), torch.float16, (1, 128, 2), "tc f16 vw8 bn128")]
    for case, dtype, config, expect in expect_cases:
        y, ref64, eager = _run_conv(case, dtype, seed=2, config=config)
        assert_close(y, ref64, eager, dtype, f"{case} {config}")
        got = cu.last_kernel()
        if expect is None:
            assert got.startswith("wgmma") and "bn256" not in got and "tma" not in got, (case, config, got)
        else:
            assert got == expect, (case, config, got)


def test_aggregate_config_fallbacks():
    wg = cu.has_wgmma()
    case = ((64, 64), 96, 5, 7)
    for dtype, config, expect in [
        (torch.float32, (1, 0, 0), "simt f32"),
        (torch.float32, (2, 128, 0), "simt f32"),
        (torch.float16, (3, 128, 1), "simt f16"),
        (torch.float16, (2, 16, 0), "tc f16 vw8 bn64"),   # no 16-wide aggregate tile: the rule's width
        (torch.float16, (2, 32, 0), "tc f16 vw8 bn32"),
        (torch.float16, (2, 128, 1), "tc f16 vw8 bn128"),
        (torch.bfloat16, (1, 32, 0), "wgmma bf16 bn64" if wg else "tc bf16 vw8 bn32"),
        (torch.bfloat16, (1, 128, 0), "wgmma bf16 bn128" if wg else "tc bf16 vw8 bn128"),
    ]:
        y, ref64, eager = _run_agg(case, dtype, "tensor", config=config)
        assert_close(y, ref64, eager, dtype, f"{config}")
        assert cu.last_kernel() == expect, (dtype, config, cu.last_kernel())
    # 4-channel children: the 8-byte gather, whose only mma.sync tile is 64 wide; no wgmma
    y, ref64, eager = _run_agg(((28, 28, 28, 28), 128, 6, 7), torch.float16, "tensor", config=(1, 128, 0))
    assert_close(y, ref64, eager, torch.float16, "res2net widths")
    assert cu.last_kernel() == "tc f16 vw4 bn64", cu.last_kernel()


@pytest.mark.parametrize("config,match", [
    ([1], r"config must be \[\] \(the rule\) or \[family, bn, a_load\], got \[1\]"),
    ([1, 64, 1, 0], r"got \[1, 64, 1, 0\]"),
    ([9, 0, 0], r"config \[9, 0, 0\] has family 9; valid: 0 \(the rule's\), 1 wgmma, 2 tc, 3 simt, 4 direct, "
                r"5 grouped, 6 stem, 7 blockdiag-wgmma, 8 blockdiag-tc"),
    ([-1, 0, 0], r"has family -1"),
    ([1, 48, 1], r"config \[1, 48, 1\] has bn 48; valid: 0 \(the rule's\), 16, 32, 64, 128, 256"),
    ([1, 64, 3], r"config \[1, 64, 3\] has a_load 3; valid: 0 \(the rule's\), 1 gather, 2 TMA im2col"),
])
def test_conv_malformed_config(config, match):
    x = rand(1, 16, 5, 5, dtype=torch.float16)
    w = rand(16, 16, 3, 3, dtype=torch.float16)
    for _ in range(2):  # the same error every time
        with pytest.raises(RuntimeError, match=r"(?m)dla_fast::conv_bn_act: .*" + match):
            torch.ops.dla_fast.conv_bn_act(x, w, None, [1, 1], [1, 1], 1, None, True, config)


@pytest.mark.parametrize("config,match", [
    ([4, 0, 0], r"has family 4; valid: 0 \(the rule's\), 1 wgmma, 2 tc, 3 simt$"),
    ([1, 64, 2], r"has a_load 2; valid: 0 or 1 \(the aggregate's input is always gathered\)"),
    ([2, 100, 0], r"has bn 100"),
    ([2, 64], r"config must be \[\] \(the rule\) or \[family, bn, a_load\]"),
])
def test_aggregate_malformed_config(config, match):
    x = rand(1, 16, 5, 5, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"(?m)dla_fast::aggregate: .*" + match):
        torch.ops.dla_fast.aggregate([x, x], rand(8, 32, dtype=torch.float16), None, None, True, config)


# ------------------------------------------------------------------------------------------- candidates
# Real DLA layer shapes (N, Cin, H, W, Cout, k, stride, pad, groups), the input layout, and whether a residual is
# added: dense 3x3 / 1x1 at 56, 28, 14 and 7, strided, the RGB stem and its neighbours, grouped convs with 4 and 8
# channels a group (g 32 and 64), Res2Net's channel slices, batch 1 and odd sizes.
CAND_CONV = [
    ((2, 64, 56, 56, 64, 3, 1, 1, 1), "cl", True),
    ((2, 128, 28, 28, 128, 3, 1, 1, 1), "cl", False),
    ((2, 256, 14, 14, 256, 3, 1, 1, 1), "cl", True),
    ((2, 512, 7, 7, 512, 3, 1, 1, 1), "cl", True),
    ((2, 128, 56, 56, 256, 3, 2, 1, 1), "cl", False),
    ((2, 256, 28, 28, 128, 1, 1, 0, 1), "cl", False),
    ((2, 1024, 7, 7, 512, 1, 1, 0, 1), "cl", True),
    ((1, 256, 15, 13, 256, 3, 1, 1, 1), "cl", True),
    ((1, 512, 7, 7, 512, 3, 1, 1, 1), "strided", False),
    ((3, 128, 9, 11, 200, 3, 1, 1, 1), "nchw", True),
    ((2, 3, 64, 48, 16, 7, 1, 3, 1), "cl", False),       # the RGB stem
    ((2, 3, 40, 36, 16, 7, 1, 3, 1), "cl", True),        # the stem shape with a residual: not the stem kernel
    ((2, 16, 56, 56, 16, 3, 1, 1, 1), "cl", False),
    ((2, 16, 56, 56, 32, 3, 2, 1, 1), "cl", False),
    ((2, 128, 28, 28, 128, 3, 1, 1, 32), "cl", False),   # 4 channels a group
    ((2, 256, 14, 14, 256, 3, 2, 1, 32), "cl", True),    # 8 a group, strided
    ((1, 256, 14, 14, 256, 3, 1, 1, 64), "cl", True),    # 4 a group, batch 1
    ((2, 512, 7, 7, 512, 3, 1, 1, 64), "slice8", True),  # 8 a group
    ((2, 26, 28, 28, 26, 3, 1, 1, 1), "slice", True),    # Res2Net: a 26-channel split of a wider tensor
    ((2, 52, 14, 14, 52, 3, 2, 1, 1), "slice8", False),
    ((1, 104, 7, 7, 104, 3, 1, 1, 1), "slice", True),
    ((2, 64, 28, 28, 64, 3, 1, 1, 8), "slice", True),    # Res2NeXt: 8 a group on a channel slice
]


def _cand_id(c):
    case, lay, res = c
    return "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*case) + f"-{lay}" + ("-res" if res else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("cand", CAND_CONV, ids=_cand_id)
def test_conv_candidates_run(cand, dtype):
    """Every config conv_candidates offers runs as named and is right; the first is the rule's pick, spelled out."""
    case, lay, with_res = cand
    g, x, wt, b, r = _conv_inputs(case, dtype, seed=7)
    n, c, h, w, co, k, s, p, grp = case
    res = r if with_res else None
    ref64 = conv_bn_act_ref(x.double(), wt.double(), b.double(), (s, s), (p, p), grp,
                            None if res is None else res.double(), True)
    eager = conv_bn_act_ref(x, wt, b, (s, s), (p, p), grp, res, True)
    xl = layout(x, lay, g)
    rl = None if res is None else layout(res, "cl", g)
    wl = wt.contiguous(memory_format=torch.channels_last)
    cands = cu.conv_candidates(xl, wl, b, (s, s), (p, p), grp, rl)
    assert 1 <= len(cands) <= 6 and len(set(cands)) == len(cands), cands
    assert all(isinstance(cfg, tuple) and len(cfg) == 3 for cfg in cands), cands
    assert all(v > 0 for v in cands[0]), cands  # fully specified
    if dtype == torch.float32:
        assert all(cfg[0] in (3, 4, 5, 6) for cfg in cands), cands  # no tensor cores in fp32
    cu.conv_bn_act(xl, wl, b, (s, s), (p, p), grp, rl, True, ())
    rule = cu.last_kernel()
    for cfg in cands:
        poison(ref64.numel(), dtype)
        y = cu.conv_bn_act(xl, wl, b, (s, s), (p, p), grp, rl, True, cfg)
        assert_close(y, ref64, eager, dtype, f"{case} {lay} {cfg} ({cu.describe(cfg)})")
        assert _matches(cu.last_kernel(), cfg), (cfg, cu.last_kernel())
    cu.conv_bn_act(xl, wl, b, (s, s), (p, p), grp, rl, True, cands[0])
    assert cu.last_kernel() == rule, (cands[0], rule, cu.last_kernel())


def test_conv_candidates_cover_the_alternatives():
    """What the candidates offer where it applies: the widths and A loads of a wide dense conv, the block-diagonal
    and CUDA-core kernels of a grouped one, mma.sync for the stem shape the rule leaves to simt."""
    def cands(case, dtype=torch.float16, with_res=False):
        g, x, wt, b, r = _conv_inputs(case, dtype)
        n, c, h, w, co, k, s, p, grp = case
        return cu.conv_candidates(x.contiguous(memory_format=torch.channels_last), wt, b, (s, s), (p, p), grp,
                                  r if with_res else None)
    wide = cands((2, 256, 14, 14, 256, 3, 1, 1, 1))
    if cu.has_wgmma():
        assert set(wide) == {(1, 64, 1), (1, 64, 2), (1, 128, 1), (1, 128, 2), (1, 256, 2)}, wide
    else:
        assert set(wide) == {(2, 64, 1), (2, 128, 1)}, wide
    assert cands((2, 256, 14, 14, 64, 3, 1, 1, 1))[1:] == []  # 64 outputs: the rule's width only
    g8 = cands((2, 256, 14, 14, 256, 3, 1, 1, 32))
    assert set(g8) == ({(7, 32, 1)} if cu.has_wgmma() else set()) | {(8, 32, 1), (5, 64, 1)}, g8
    g4 = cands((2, 128, 14, 14, 128, 3, 1, 1, 32))
    assert set(g4) == ({(7, 32, 1)} if cu.has_wgmma() else set()) | {(8, 32, 1), (4, 32, 1)}, g4
    assert cands((2, 3, 32, 32, 16, 7, 1, 3, 1)) == [(6, 16, 1)]
    assert cands((2, 3, 32, 32, 16, 7, 1, 3, 1), with_res=True) == [(3, 64, 1), (2, 16, 1)]
    assert cands((2, 256, 14, 14, 256, 3, 1, 1, 1), torch.float32) == [(3, 64, 1)]
    assert cands((2, 64, 14, 14, 64, 3, 1, 1, 8), torch.float32) == [(5, 64, 1)]


CAND_AGG = [
    ((64, 64), 64, 56, 56),
    ((128, 128), 128, 28, 28),
    ((256, 256, 128), 256, 14, 14),
    ((512, 512, 256), 512, 7, 7),
    ((28, 28, 28, 28), 128, 14, 14),   # Res2Net widths
    ((16, 48, 8), 300, 3, 5),
    ((256, 256, 128), 256, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", CAND_AGG, ids=lambda c: "c{}-o{}-{}x{}".format("+".join(map(str, c[0])), *c[1:]))
def test_aggregate_candidates_run(case, dtype):
    g = torch.Generator(device="cuda").manual_seed(11)
    chans, co, h, w = case
    kids = [rand(2, c, h, w, dtype=dtype, gen=g).contiguous(memory_format=torch.channels_last) for c in chans]
    wt = (rand(co, sum(chans), gen=g) / sum(chans) ** 0.5).to(dtype)
    b = 0.1 * rand(co, gen=g)
    r = rand(2, co, h, w, dtype=dtype, gen=g).contiguous(memory_format=torch.channels_last)
    ref64 = aggregate_ref([k.double() for k in kids], wt.double(), b.double(), r.double(), True)
    eager = aggregate_ref(kids, wt, b, r, True)
    cands = cu.aggregate_candidates(kids, wt, b, r)
    assert 1 <= len(cands) <= 3 and len(set(cands)) == len(cands), cands
    assert cands[0][0] > 0 and cands[0][1] > 0 and cands[0][2] == 1, cands
    assert all(cfg[0] in (1, 2, 3) for cfg in cands), cands
    if dtype == torch.float32:
        assert cands == [(3, 64, 1)], cands
    elif co > 64 and cands[0][0] == 1:
        assert {cfg[1] for cfg in cands} == {64, 128}, cands
    cu.aggregate(kids, wt, b, r, True, ())
    rule = cu.last_kernel()
    for cfg in cands:
        poison(ref64.numel(), dtype)
        y = cu.aggregate(kids, wt, b, r, True, cfg)
        assert_close(y, ref64, eager, dtype, f"{case} {cfg}")
        assert _matches(cu.last_kernel(), cfg), (cfg, cu.last_kernel())
    cu.aggregate(kids, wt, b, r, True, cands[0])
    assert cu.last_kernel() == rule, (cands[0], rule, cu.last_kernel())


# ------------------------------------------------------------------------------------------- environment overrides
# Read once per process, so each variant runs in a fresh interpreter.
_ENV_SCRIPT = textwrap.dedent("""
    import json, os, torch
    import dla_fast.backends.cuda as cu
    cl = torch.channels_last
    x = torch.randn(2, 64, 9, 9, device="cuda", dtype=torch.float16).contiguous(memory_format=cl)
    w = (torch.randn(128, 64, 3, 3, device="cuda", dtype=torch.float16) / 24).contiguous(memory_format=cl)
    wa = torch.randn(128, 128, device="cuda", dtype=torch.float16) / 12
    out = {}
    def call(name, fn):
        try:
            fn()
            torch.cuda.synchronize()
            out[name] = cu.last_kernel()
        except RuntimeError as e:
            out[name] = "error: " + str(e).splitlines()[0]
    conv = lambda cfg: cu.conv_bn_act(x, w, None, (1, 1), (1, 1), 1, None, True, cfg)
    call("rule", lambda: conv(()))
    call("wgmma128tma", lambda: conv((1, 128, 2)))
    call("tc", lambda: conv((2, 0, 0)))
    call("again", lambda: conv(()))
    os.environ["DLA_FAST_CUDA_KERNEL"] = "direct"  # too late: read at the first call
    os.environ["DLA_FAST_CUDA_WIDE_BN"] = "128"
    call("after_change", lambda: conv(()))
    call("aggregate", lambda: cu.aggregate([x, x], wa, None, None, True, ()))
    call("candidates", lambda: cu.conv_candidates(x, w, None, (1, 1), (1, 1), 1, None))
    call("max_pool", lambda: cu.max_pool(x, 2))
    print("RESULT" + json.dumps(out))
""")


def _env_run(env: dict) -> dict:
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("DLA_FAST_CUDA_KERNEL", "DLA_FAST_CUDA_WIDE_BN", "DLA_FAST_CUDA_IM2COL"):
        full.pop(k, None)
    full.update(env)
    r = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], capture_output=True, text=True, env=full, cwd=ROOT,
                       timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert r.returncode == 0 and line, r.stdout + r.stderr
    return json.loads(line[0][len("RESULT"):])


def test_env_overrides_applied():
    wg = cu.has_wgmma()
    # no variable: the config decides
    got = _env_run({})
    assert got["wgmma128tma"] == ("wgmma f16 bn128 tma" if wg else "tc f16 vw8 bn128"), got
    assert got["tc"] == "tc f16 vw8 bn64" and got["rule"] == got["again"] == got["after_change"], got
    # the family, ahead of the config, and read once
    got = _env_run({"DLA_FAST_CUDA_KERNEL": "simt"})
    assert {got[k] for k in ("rule", "wgmma128tma", "tc", "again", "after_change", "aggregate")} == {"simt f16"}, got
    got = _env_run({"DLA_FAST_CUDA_KERNEL": "direct"})
    assert got["rule"] == got["wgmma128tma"] == got["after_change"] == "direct f16", got
    assert got["aggregate"] == "simt f16", got  # the aggregate has no direct kernel
    got = _env_run({"DLA_FAST_CUDA_KERNEL": "tc"})
    assert got["wgmma128tma"] == "tc f16 vw8 bn128" and got["rule"] == "tc f16 vw8 bn64", got
    # the width of the calls with more than 64 outputs, ahead of the config
    got = _env_run({"DLA_FAST_CUDA_WIDE_BN": "64"})
    assert got["wgmma128tma"] == ("wgmma f16 bn64 tma" if wg else "tc f16 vw8 bn64"), got
    assert "bn64" in got["aggregate"], got
    got = _env_run({"DLA_FAST_CUDA_WIDE_BN": "256"})  # the big tile where it can run, else the rule's width
    assert got["wgmma128tma"] == ("wgmma f16 bn256 tma" if wg else "tc f16 vw8 bn64"), got
    # the A load of the wgmma tiles
    got = _env_run({"DLA_FAST_CUDA_IM2COL": "0"})
    assert got["wgmma128tma"] == ("wgmma f16 bn128" if wg else "tc f16 vw8 bn128"), got
    assert "tma" not in got["rule"] and "tma" not in got["after_change"], got
    got = _env_run({"DLA_FAST_CUDA_IM2COL": "1", "DLA_FAST_CUDA_KERNEL": "auto"})
    assert got["rule"] == ("wgmma f16 bn64 tma" if wg else "tc f16 vw8 bn64"), got


@pytest.mark.parametrize("env,msg", [
    ({"DLA_FAST_CUDA_KERNEL": "fastest"}, "DLA_FAST_CUDA_KERNEL must be one of auto, wgmma, tc, simt, direct; "
                                          "got 'fastest'"),
    ({"DLA_FAST_CUDA_WIDE_BN": "96"}, "DLA_FAST_CUDA_WIDE_BN must be 64, 128 or 256; got '96'"),
    ({"DLA_FAST_CUDA_IM2COL": "yes"}, "DLA_FAST_CUDA_IM2COL must be 0 or 1; got 'yes'"),
])
def test_env_override_bad_value(env, msg):
    """An invalid value is the same clear error on every conv / aggregate / candidates call (max_pool has no
    switches)."""
    got = _env_run(env)
    for k in ("rule", "wgmma128tma", "tc", "again", "after_change", "aggregate", "candidates"):
        assert got[k].startswith("error: dla_fast::") and msg in got[k], (k, got[k])
    assert got["rule"] == got["again"] == got["after_change"], got
    assert got["max_pool"].startswith("max_pool f16"), got


# ------------------------------------------------------------------------------------------- max_pool
MP_SHAPES = [(2, 64, 56, 56), (1, 32, 7, 9), (3, 20, 11, 10), (2, 16, 17, 33), (1, 3, 5, 5), (2, 256, 28, 28),
             (1, 12, 6, 6)]


def _mp_input(shape, dtype, seed=0):
    """Random values with NaN, +inf and -inf planted (one NaN where it would not be a window's maximum)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", generator=g).to(dtype)
    n, c, h, w = shape
    x[0, 0, 0, 0] = float("nan")
    x[-1, c - 1, h - 1, w - 1] = float("nan")
    x[0, c // 2, h // 2, w // 2] = float("-inf")
    x[-1, c // 3, (h - 1) // 2, 1 % w] = float("inf")
    if h >= 4 and w >= 4:
        x[0, c - 1, 2:4, 2:4] = float("-inf")  # a whole window of -inf (k = 2)
    return x, g


def _mp_vw(x: torch.Tensor) -> int:
    """The vector width the kernel should use: 16 bytes where every pixel's channels are 16-byte aligned."""
    t = x if x.size(1) == 1 or x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)
    v = 16 // t.element_size()
    eff = [0 if t.size(d) == 1 else t.stride(d) for d in (0, 2, 3)]
    return v if t.size(1) % v == 0 and t.data_ptr() % 16 == 0 and all(s % v == 0 for s in eff) else 1


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("lay", ["cl", "nchw", "slice", "slice8", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", MP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_max_pool(shape, dtype, lay, k):
    """Bit-exact against F.max_pool2d (NaN propagates, floor mode), channels_last out, from any channel-stride-1
    view without a copy and from anything else through one channels_last copy."""
    x, g = _mp_input(shape, dtype)
    if min(shape[2:]) < k:
        pytest.skip("window larger than the input")  # pragma: no cover - none of MP_SHAPES
    ref = F.max_pool2d(x, k, k)
    xl = layout(x, lay, g)
    poison(ref.numel(), dtype)
    y = cu.max_pool(xl, k)
    assert y.dtype == dtype and y.shape == ref.shape, (y.shape, ref.shape)
    assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    assert cu.last_kernel() == f"max_pool {DT_ID[dtype]} vw{_mp_vw(xl)}", cu.last_kernel()


def test_max_pool_vector_path_is_taken():
    for dtype, vw in ((torch.float16, 8), (torch.bfloat16, 8), (torch.float32, 4)):
        x = rand(2, 64, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
        cu.max_pool(x, 2)
        assert cu.last_kernel() == f"max_pool {DT_ID[dtype]} vw{vw}", cu.last_kernel()
        cu.max_pool(x[:, 1:], 2)  # a channel slice at an odd offset: one element at a time
        assert cu.last_kernel() == f"max_pool {DT_ID[dtype]} vw1", cu.last_kernel()


@pytest.mark.parametrize("k", [4, 8, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_max_pool_large_windows(dtype, k):
    """k = 4, 8, 16 never occur in DLA but must be right, with floor-mode remainders."""
    for shape in ((2, 16, 33, 35), (1, 24, 16, 47)):
        x, g = _mp_input(shape, dtype, seed=k)
        ref = F.max_pool2d(x, k, k)
        for lay in ("cl", "nchw"):
            y = cu.max_pool(layout(x, lay, g), k)
            torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


def test_max_pool_errors_and_empty():
    x = rand(2, 8, 5, 6, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"dla_fast::max_pool: the window k must be in \[1, min\(H, W\)\] = "
                                           r"\[1, 5\], got 0"):
        cu.max_pool(x, 0)
    with pytest.raises(RuntimeError, match=r"\[1, 5\], got 6"):
        cu.max_pool(x, 6)
    with pytest.raises(RuntimeError, match="must be a 4-D"):
        torch.ops.dla_fast.max_pool(x[0], 2)
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        torch.ops.dla_fast.max_pool(x.double(), 2)
    e = cu.max_pool(torch.empty(0, 8, 5, 6, device="cuda", dtype=torch.float16), 2)
    assert e.shape == (0, 8, 2, 3)
    e = cu.max_pool(torch.empty(2, 0, 5, 6, device="cuda", dtype=torch.float16), 2)
    assert e.shape == (2, 0, 2, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
def test_direct_entry_points_match_the_ops(dtype):
    """The backend module's eager calls (dla_fast._C's direct entry points) give the registered ops' bits and run
    the same kernel, configs included; the profiler still names the op."""
    assert cu._HAS_DIRECT
    torch.manual_seed(31)
    x = torch.randn(2, 64, 14, 15, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(128, 64, 3, 3, device="cuda", dtype=dtype) * 0.05).contiguous(memory_format=torch.channels_last)
    b = torch.randn(128, device="cuda")
    r = torch.randn(2, 128, 7, 8, device="cuda", dtype=dtype)
    w2 = torch.randn(96, 192, device="cuda", dtype=dtype) * 0.05
    y = torch.randn(2, 128, 14, 15, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    for cfg in [(), (0, 0, 0), (2, 64, 1), (3, 64, 0)]:
        assert cu._direct(x)
        a = cu.conv_bn_act(x, w, b, (2, 2), (1, 1), 1, r, True, cfg)
        ka = cu.last_kernel()
        o = torch.ops.dla_fast.conv_bn_act(x, w, b, [2, 2], [1, 1], 1, r, True, list(cfg or (0, 0, 0)))
        assert torch.equal(a, o) and ka == cu.last_kernel(), (cfg, ka, cu.last_kernel())
        acfg = cfg[:1] + (64, 0) if cfg else ()
        a = cu.aggregate([y, x], w2, b[:96], None, False, acfg)
        ka = cu.last_kernel()
        o = torch.ops.dla_fast.aggregate([y, x], w2, b[:96], None, False, list(acfg or (0, 0, 0)))
        assert torch.equal(a, o) and ka == cu.last_kernel(), (cfg, ka, cu.last_kernel())
    assert torch.equal(cu.max_pool(x, 2), torch.ops.dla_fast.max_pool(x, 2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cu.conv_bn_act(x, w, b, (1, 1), (1, 1), 1, None, True)
        cu.max_pool(x, 2)
    names = {e.name for e in prof.events()}
    assert {"dla_fast::conv_bn_act", "dla_fast::max_pool"} <= names, names
