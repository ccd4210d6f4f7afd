"""The fused high-resolution front of every DLA: stem, level 0 and level 1 in one Triton kernel.

    stem   = relu(conv7x7(x,    w0, stride 1, pad 3) + b0)    Cin -> C0, H x W
    level0 = relu(conv3x3(stem, w1, stride 1, pad 1) + b1)    C0  -> C0, H x W
    level1 = relu(conv3x3(lvl0, w2, stride 2, pad 1) + b2)    C0  -> C1, ceil(H/2) x ceil(W/2)

Run as three layers at batch 256, 224x224, fp16, the two full-resolution maps are 411 MB each, written once and
read once (plus halos) by memory-bound kernels. Here each work item is a TH x TW tile of level 1's output: its
program stages the input window, computes the stem on the tile's level-0 footprint plus a one-pixel halo, then
level 0 on level 1's footprint, then level 1, each phase an implicit GEMM on tensor cores reading the previous
phase from a small per-program scratch buffer. The scratch is reused by every work item of the program, so it
stays in L1/L2: only the input image and level 1's output travel to and from DRAM.

Zero padding is reproduced exactly: the stem's input outside the image is 0 (staged as zeros), and so are level
0's and level 1's inputs outside the image (the stem's and level 0's outputs are zeroed there, not computed from
the zero-padded input). Every phase rounds its output to the model's dtype before the next reads it, as the
separate layers do.

Scratch per program (elements of the model's dtype): the stem tile [SH*SW, C0P], then one region shared by the
staged input [XH*XW, CP] (dead once the stem is done) and the level-0 tile [LH*LW, C0P]. The grid is persistent
(about two programs per SM), so the scratch is a few tens of MB at most and is independent of the batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..schema import NAMESPACES, TRITON_ONLY
from ._kernels import _mma
from ._launch import (_I32_LIMIT, _IDX64_THRESHOLD, _TC_DTYPES, _cdiv, _kernel, _max_offset, _new_output, _pow2,
                      _prec, _round_tf32, _skip_launch, _sm_count, interpreted, register_ops)

# What the kernel's tiles hold without register spills in fp16/bf16 on sm_90 (compiled and checked): the stem's
# K tile is 8 taps of a kernel row x CP padded input channels, the accumulators C0P / C1P wide. Every DLA's front
# is 3 -> 16 -> 32.
MAX_CIN = 8
MAX_C0 = 32
MAX_C1 = 64


@triton.jit
def _front_kernel(
    x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, ws_ptr,
    H, W, Ho, Wo, CIN, C0, C1,
    sxn, sxc, sxh, sxw,
    tiles_w, tiles_per_img, items,
    TH: tl.constexpr, TW: tl.constexpr, CP: tl.constexpr, KS: tl.constexpr, C0P: tl.constexpr, C1P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, WS1: tl.constexpr, WSP: tl.constexpr,
    PREC: tl.constexpr, RND: tl.constexpr, IDX64: tl.constexpr,
):
    """One persistent program walks work items (image, TH x TW tile of level 1's output) with a stride of the
    grid size. Per item, four phases separated by CTA barriers (the scratch is written by some threads and read
    by others):

    0. stage the input window [XH, XW] x CP channels (zeros outside the image and past CIN) into the scratch;
    1. stem on [SH, SW] pixels: K = 7 kernel rows x (KS = 8 taps x CP channels). One kernel row of the staged window
       is 8 x CP contiguous elements, so each A tile is a plain run per pixel (8-byte vector loads at CP = 4);
       the 8th tap and the padded channels meet zero weights;
    2. level 0 on [LH, LW] pixels: 9 taps x C0P channels, the A tile a contiguous channel run of the stem tile;
    3. level 1 on the TH x TW output pixels, stride 2, from the level-0 tile; the only store to DRAM.

    Tile origins: level 0's footprint starts at (2*oh0 - 1, 2*ow0 - 1), the stem's one pixel further out, the
    staged input three more.
    """
    LH = 2 * TH + 1
    LW = 2 * TW + 1
    SH = LH + 2
    SW = LW + 2
    XH = SH + 6
    XW = SW + 7          # one column more than the 7x7 window needs: the stem's A tile reads 8 taps

    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    stem_ptr = ws_ptr + pid * WSP          # [SH * SW, C0P]
    buf_ptr = stem_ptr + WS1               # staged input [XH * XW, CP], then level 0 [LH * LW, C0P]

    ps = tl.arange(0, BLOCK_S)
    cp = tl.arange(0, CP)
    qm = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, KS)
    c0 = tl.arange(0, C0P)
    c1 = tl.arange(0, C1P)
    c0_ok = c0 < C0
    c1_ok = c1 < C1
    # Stem weight tile of one kernel row: k = tap * CP + channel; tap 7 and channels >= CIN are zero.
    ks_tap = ks // CP
    ks_ch = ks % CP
    w0_mask = ((ks_tap < 7) & (ks_ch < CIN))[:, None] & c0_ok[None, :]
    w0_off = c0[None, :] * (49 * CIN) + (ks_tap * CIN + ks_ch)[:, None]
    w1_mask = c0_ok[:, None] & c0_ok[None, :]
    w1_off = c0[None, :] * (9 * C0) + c0[:, None]
    w2_mask = c0_ok[:, None] & c1_ok[None, :]
    w2_off = c1[None, :] * (9 * C0) + c0[:, None]
    bias0 = tl.load(b0_ptr + c0, mask=c0_ok, other=0.0)
    bias1 = tl.load(b1_ptr + c0, mask=c0_ok, other=0.0)
    bias2 = tl.load(b2_ptr + c1, mask=c1_ok, other=0.0)

    for item in range(pid, items, nprog):
        img = item // tiles_per_img
        t = item % tiles_per_img
        if IDX64:
            img = img.to(tl.int64)
        oh0 = (t // tiles_w) * TH
        ow0 = (t % tiles_w) * TW

        # -- 0: the input window, zero-padded, CP channels a pixel.
        tl.debug_barrier()  # the previous item's level 1 has finished reading the shared region
        for p0 in range(0, XH * XW, BLOCK_S):
            p = p0 + ps
            iy = 2 * oh0 - 5 + p // XW
            ix = 2 * ow0 - 5 + p % XW
            ok = (p < XH * XW) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            v = tl.load(x_ptr + (img * sxn + iy * sxh + ix * sxw)[:, None] + (cp * sxc)[None, :],
                        mask=ok[:, None] & (cp < CIN)[None, :], other=0.0)
            tl.store(buf_ptr + p[:, None] * CP + cp[None, :], v.to(ws_ptr.dtype.element_ty),
                     mask=(p < XH * XW)[:, None])
        tl.debug_barrier()

        # -- 1: the stem on the [SH, SW] footprint; zero outside the image (level 0's padding).
        for q0 in range(0, SH * SW, BLOCK_M):
            q = q0 + qm
            qc = tl.minimum(q, SH * SW - 1)  # rows past the footprint recompute its last pixel (not stored)
            py = qc // SW
            px = qc % SW
            a_row = (py * XW + px) * CP
            acc = tl.zeros((BLOCK_M, C0P), dtype=tl.float32)
            for r in range(7):
                a = tl.load(buf_ptr + (a_row + r * (XW * CP))[:, None] + ks[None, :])
                b = tl.load(w0_ptr + w0_off + r * (7 * CIN), mask=w0_mask, other=0.0)
                acc = _mma(a, b, acc, PREC, RND)
            gy = 2 * oh0 - 2 + py
            gx = 2 * ow0 - 2 + px
            inside = (gy >= 0) & (gy < H) & (gx >= 0) & (gx < W)
            acc = acc + bias0[None, :]
            acc = tl.where(acc < 0.0, 0.0, acc)
            acc = tl.where(inside[:, None], acc, 0.0)
            tl.store(stem_ptr + q[:, None] * C0P + c0[None, :], acc.to(ws_ptr.dtype.element_ty),
                     mask=(q < SH * SW)[:, None])
        tl.debug_barrier()

        # -- 2: level 0 on the [LH, LW] footprint; zero outside the image (level 1's padding).
        for q0 in range(0, LH * LW, BLOCK_M):
            q = q0 + qm
            qc = tl.minimum(q, LH * LW - 1)
            qy = qc // LW
            qx = qc % LW
            a_row = (qy * SW + qx) * C0P
            acc = tl.zeros((BLOCK_M, C0P), dtype=tl.float32)
            for tap in range(9):
                a = tl.load(stem_ptr + (a_row + ((tap // 3) * SW + tap % 3) * C0P)[:, None] + c0[None, :])
                b = tl.load(w1_ptr + w1_off + tap * C0, mask=w1_mask, other=0.0)
                acc = _mma(a, b, acc, PREC, RND)
            gy = 2 * oh0 - 1 + qy
            gx = 2 * ow0 - 1 + qx
            inside = (gy >= 0) & (gy < H) & (gx >= 0) & (gx < W)
            acc = acc + bias1[None, :]
            acc = tl.where(acc < 0.0, 0.0, acc)
            acc = tl.where(inside[:, None], acc, 0.0)
            tl.store(buf_ptr + q[:, None] * C0P + c0[None, :], acc.to(ws_ptr.dtype.element_ty),
                     mask=(q < LH * LW)[:, None])
        tl.debug_barrier()

        # -- 3: level 1, stride 2, on the TH x TW output tile: the only DRAM write.
        for q0 in range(0, TH * TW, BLOCK_M):
            q = q0 + qm
            qc = tl.minimum(q, TH * TW - 1)
            ty = qc // TW
            tx = qc % TW
            a_row = (2 * ty * LW + 2 * tx) * C0P
            acc = tl.zeros((BLOCK_M, C1P), dtype=tl.float32)
            for tap in range(9):
                a = tl.load(buf_ptr + (a_row + ((tap // 3) * LW + tap % 3) * C0P)[:, None] + c0[None, :])
                b = tl.load(w2_ptr + w2_off + tap * C0, mask=w2_mask, other=0.0)
                acc = _mma(a, b, acc, PREC, RND)
            oh = oh0 + ty
            ow = ow0 + tx
            acc = acc + bias2[None, :]
            acc = tl.where(acc < 0.0, 0.0, acc)
            ok = (q < TH * TW) & (oh < Ho) & (ow < Wo)
            y_off = ((img * Ho + oh) * Wo + ow) * C1
            tl.store(y_ptr + y_off[:, None] + c1[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=ok[:, None] & c1_ok[None, :])


# ------------------------------------------------------------------------------------------------ configs

_FIELDS = ("TH", "TW", "BLOCK_M", "PROGRAMS", "num_warps", "num_stages")
# Programs per SM of the persistent grid: enough to overlap one program's barrier waits with another's work, few
# enough that the scratch (programs x ~74 KB at 16x16 tiles, fp16) stays far below the L2's size.
PROGRAMS_PER_SM = 2


def shape_reason(cin: int, c0: int, c1: int) -> Optional[str]:
    """None when the kernel's tiles hold these channel counts; otherwise what does not fit."""
    if cin > MAX_CIN:
        return f"the Triton front stages at most {MAX_CIN} input channels, got {cin}"
    if c0 > MAX_C0 or c1 > MAX_C1:
        return f"the Triton front holds at most {MAX_C0} stem and {MAX_C1} level-1 channels, got {c0} and {c1}"
    return None


def front_plan(dtype: torch.dtype, tf32: bool, interp: bool, sms: int, tiles16: object = None) -> Dict:
    """Tile sizes of the front kernel. 16x16 output tiles keep the recomputed halo small (the stem runs on 35x35
    pixels for 32x32 useful ones, 1.20x; level 0 on 33x33, 1.06x) at ~74 KB of fp16 scratch a program. When
    16x16 tiles (``tiles16``: how many the call has, None if unknown) cannot give every SM two, 8x8 tiles do
    (batch 1 at 224x224: 49 tiles of 16x16 would leave 83 SMs idle, 196 of 8x8 fill them).

    One stage, i.e. no software pipelining: the pipeliner turns 16-byte loads into cp.async.cg, which bypasses
    L1, and levels 0 and 1 read each scratch pixel nine times (once a tap), so plain loads that hit L1 are worth
    more than the overlap (which the two programs a SM give anyway)."""
    if interp:  # the interpreter's cost is per operation: fewer, larger tiles; a few programs take turns
        return dict(TH=8, TW=8, BLOCK_M=64, PROGRAMS=3, num_warps=4, num_stages=1)
    ieee = dtype not in _TC_DTYPES and not tf32
    n = max(1, sms)
    if isinstance(tiles16, int) and tiles16 < 2 * n:
        return dict(TH=8, TW=8, BLOCK_M=64, PROGRAMS=4 * n, num_warps=4, num_stages=1)
    return dict(TH=16, TW=16, BLOCK_M=64 if ieee else 128, PROGRAMS=PROGRAMS_PER_SM * n, num_warps=4,
                num_stages=1)


def candidates(dtype: torch.dtype, tf32: bool, sms: int) -> List[Tuple[int, ...]]:
    """The configs worth timing on a GPU, the heuristic's first: more programs a SM at 16x16, the pipelined loads,
    twice the warps, and smaller tiles with more programs a SM (less scratch each, more halo)."""
    base = front_plan(dtype, tf32, False, sms)
    n = max(1, sms)
    alts = [dict(base, PROGRAMS=3 * n), dict(base, PROGRAMS=4 * n), dict(base, num_stages=2),
            dict(base, TH=8, TW=16, PROGRAMS=3 * n), dict(base, TH=8, TW=8, BLOCK_M=64, PROGRAMS=4 * n)]
    if dtype in _TC_DTYPES or tf32:  # (IEEE fp32's FMA dot spills with 8 warps)
        alts.insert(3, dict(base, num_warps=8))
    return list(dict.fromkeys(config_tuple(c) for c in [base] + alts))


def config_tuple(cfg: Dict) -> Tuple[int, ...]:
    return tuple(int(cfg[f]) for f in _FIELDS)


def config_dict(t: Sequence[int]) -> Dict:
    """The int tuple of a front config (as the op's ``config`` carries it after the TF32 flag) as a dict."""
    t = tuple(int(v) for v in t)
    if len(t) != len(_FIELDS) or min(t) < 1:
        raise ValueError(f"Triton front config {t} is malformed: expected ({', '.join(_FIELDS)}), all positive")
    cfg = dict(zip(_FIELDS, t))
    if cfg["BLOCK_M"] < 16 or cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1):
        raise ValueError(f"Triton front config {t}: BLOCK_M must be a power of two >= 16, got {cfg['BLOCK_M']}")
    return cfg


def describe(config: Sequence[int]) -> str:
    if not config:
        return "heuristic"
    c = config_dict(config)
    return f"front {c['TH']}x{c['TW']} m{c['BLOCK_M']} p{c['PROGRAMS']} w{c['num_warps']} s{c['num_stages']}"


def _round64(n: int) -> int:
    return -(-n // 64) * 64


def scratch_elements(th: int, tw: int, cp: int, c0p: int) -> Tuple[int, int]:
    """(offset of the shared region, elements a program) of the scratch for a TH x TW tile."""
    lh, lw = 2 * th + 1, 2 * tw + 1
    sh, sw = lh + 2, lw + 2
    xh, xw = sh + 6, sw + 7
    ws1 = _round64(sh * sw * c0p)
    return ws1, ws1 + _round64(max(xh * xw * cp, lh * lw * c0p))


def out_size(h: int, w: int) -> Tuple[int, int]:
    """Level 1's output size (3x3, stride 2, padding 1 of an h x w map)."""
    return (h - 1) // 2 + 1, (w - 1) // 2 + 1


# ----------------------------------------------------------------------------------------------- launcher

def front_launch(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, tf32: bool, config: Optional[Dict] = None,
                 raw: bool = False) -> torch.Tensor:
    """Level 1's output (channels_last, x's dtype). Weights are standard conv weights in x's dtype (any layout;
    channels_last ones are read in place), biases float32; shapes as :func:`dla_fast.ops.front` checks them."""
    N, CIN, H, W = x.shape
    C0, C1 = w0.shape[0], w2.shape[0]
    Ho, Wo = out_size(H, W)
    y = _new_output(N, C1, Ho, Wo, x.device, x.dtype)
    if N == 0 or Ho == 0 or Wo == 0 or _skip_launch(y):
        return y
    # [Cout, kh, kw, Cin] contiguous: free views of channels_last weights.
    w0, w1, w2 = (w.permute(0, 2, 3, 1).contiguous() for w in (w0, w1, w2))
    interp = interpreted()
    sms = 0 if interp else _sm_count(x.device)
    cfg = dict(config) if config is not None else front_plan(x.dtype, tf32, interp, sms,
                                                              N * _cdiv(Ho, 16) * _cdiv(Wo, 16))
    th, tw = int(cfg["TH"]), int(cfg["TW"])
    cp = max(2, _pow2(CIN))
    c0p, c1p = max(16, _pow2(C0)), max(16, _pow2(C1))
    tiles_w = _cdiv(Wo, tw)
    tiles_per_img = _cdiv(Ho, th) * tiles_w
    items = N * tiles_per_img
    programs = int(cfg["PROGRAMS"])
    if isinstance(items, int):  # a symbolic batch (torch.export) keeps the full grid rather than a guard on it
        programs = min(programs, items)
    ws1, wsp = scratch_elements(th, tw, cp, c0p)
    if programs * wsp >= _I32_LIMIT or items >= _I32_LIMIT:
        raise RuntimeError(f"front (triton): {programs} programs x {wsp} scratch elements or {items} work items "
                           "exceed the kernel's 32-bit offsets; use fewer programs or smaller tiles")
    ws = torch.empty(programs * wsp, device=x.device, dtype=x.dtype)
    idx64 = max(_max_offset(x), y.numel()) >= _IDX64_THRESHOLD
    sxn, sxc, sxh, sxw = x.stride()
    _kernel(_front_kernel, raw)[lambda meta: (programs,)](
        x, w0, b0, w1, b1, w2, b2, y, ws,
        H, W, Ho, Wo, CIN, C0, C1,
        sxn, sxc, sxh, sxw,
        tiles_w, tiles_per_img, items,
        TH=th, TW=tw, CP=cp, KS=8 * cp, C0P=c0p, C1P=c1p, BLOCK_M=int(cfg["BLOCK_M"]), BLOCK_S=64 if interp else 256,
        WS1=ws1, WSP=wsp, PREC=_prec(x.dtype, tf32), RND=_round_tf32(x.dtype, tf32, interp), IDX64=idx64,
        num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]))
    return y


# ----------------------------------------------------------------------------------------------- the op

def _front_impl(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor, config: List[int]) -> torch.Tensor:
    if len(config) < 1:
        raise ValueError("the Triton front takes config = [tf32] + a tile tuple (which may be empty)")
    tiles = tuple(int(v) for v in config[1:])
    return front_launch(x, w0, b0, w1, b1, w2, b2, bool(config[0]), config=config_dict(tiles) if tiles else None)


def _register() -> None:
    register_ops(NAMESPACES["triton"], {"front": _front_impl}, TRITON_ONLY)

_register()
