"""Triton kernels and launchers of the training path: convolution with batch statistics, BN apply, BN backward.

Training cannot fold BatchNorm into the conv: each BN normalises with the statistics of the batch, known only
once the whole conv output exists. The kernels here split a conv -> BN(train) -> ReLU layer where the data
forces it:

* ``_conv_stats_kernel``: the implicit-GEMM convolution (NHWC, fp32 accumulation; the tap-major, flat-K and
  block-diagonal K walks of ``_conv_gemm_kernel``) whose epilogue writes the raw conv output ``z`` and, per
  output channel, the tile's sum and its sum of squared deviations from the tile's own mean. Optionally a
  prologue applies the *previous* layer's BN (its batch statistics, affine, ReLU) to the input as it loads it,
  so the normalised input is never written (the "NormConv" pattern).
* ``_agg_stats_kernel``: the aggregation node's 1x1 conv over the concat of its children, the children read
  in place (the K loop of the inference ``_aggregate_kernel``), with the same statistics epilogue.
* ``_bn_act_kernel``: ``act((z - mean) * scale + bias + residual)``, one elementwise pass.
* ``_bn_bwd_reduce_kernel`` / ``_bn_bwd_apply_kernel``: BatchNorm(+ReLU) backward in two passes, the per-channel
  sums ``sum(g)`` and ``sum(g * xhat)`` (``g`` the gradient after the ReLU mask) and then the input gradient.
* ``_max_pool_bwd_kernel``: the trees' K x K max-pool backward, the winner of each window found again from the
  input (the forward is the inference max-pool kernel and stores no indices).

Per-channel reductions are deterministic: each program writes its partial to its own row of an fp32
workspace ``[tiles, C]`` and fixed-shape torch reductions combine the rows; no float atomics, so two runs of
one step give bit-identical statistics and gradients. The statistics partials are (sum, M2) pairs combined
with Chan's parallel formula rather than raw sums of squares: ``E[z^2] - E[z]^2`` in fp32 loses every digit
of the variance once a channel's mean is large against its spread.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ... import _env
from ._kernels import _acc_zeros, _child_select, _conv_tile, _mma, _mma_into, _pool_tile, _tile_coords
from ._launch import (_I32_LIMIT, MAX_CHILDREN, _cdiv, _kernel, _max_offset, _n_tiling, _new_output, _nhwc, _pow2,
                      _prec, _round_tf32, _row_stride, _skip_launch, aggregate_plan, conv_plan, interpreted,
                      register_ops)

NAMESPACE = "dla_fast_train"
# Element offsets switch to 64-bit when a tensor spans this many elements (tests lower it to cover IDX64).
_IDX64_THRESHOLD = _I32_LIMIT
TRAIN_CONV_KINDS = ("dense", "flat", "blockdiag")
# Pipeline depth and warps of the statistics conv with the BN prologue (see train_conv_plan).
STAGES_NORM = 2
WARPS_NORM = 8
# Statistics-conv tiles that replace the inference plan's 128x128x64 on 8 warps (train_class_tiles): 1x1 convs
# run it on 4 warps; k x k convs, and aggregation nodes over at least WIDE_AGG_MIN_K input channels, take 256-row
# tiles where those still make WIDE_MIN_PROGRAMS programs (fewer leave a GPU of 100+ SMs a half-empty last wave).
TILE_1X1 = (128, 128, 64, 4, 3)
TILE_WIDE = (256, 128, 64, 8, 3)
WIDE_MIN_PROGRAMS = 512
WIDE_AGG_MIN_K = 768
# Elements a program of the elementwise BN kernels covers (rows x up to ELTWISE_MAX_C channels), and its warps.
# Timed alone (`opbench.py --train --tiles`), 1024 elements beat 2048 by ~1 % of those kernels' time; on the
# captured step 2048 is level on the wide variants and 1-2 % faster on the `_c` ones, so the step decides. 4096
# elements on 4 warps spill in the backward kernels on sm_90. DLA_FAST_TRAIN_ELTWISE overrides the three
# (eltwise_config) for the BN apply, BN backward's two passes and the statistics pass.
ELTWISE_TILE = 2048
WARPS_ELTWISE = 4
ELTWISE_MAX_C = 64
# Elements a program of the max-pool backward covers (its own setting, not one the elementwise sweep varies).
POOL_BWD_TILE = 2048
# BN backward's reduce pass: each program sums up to REDUCE_MAX_ROW_TILES row tiles, as many as leave at least
# REDUCE_PROGRAMS programs (enough to fill any current GPU).
REDUCE_PROGRAMS = 1024
REDUCE_MAX_ROW_TILES = 32
# The thin convs' weight gradient (wgrad_thin_launch): pixels x kernel rows an MMA step reduces, its warps and stages,
# programs it aims at (splits of the pixels x kernel rows x output-channel blocks; a constant, so the summation
# order is the same on every card), the widest input it takes, and whether a few-channel input (RGB) is padded
# to a power of two so that its kernel rows load as vectors. Swept on an H100 at DLA's front shapes
# (benchmarks/results/h100-train-ab-bf16.json, wgrad_thin_sweep*).
WGRAD_BLOCK_P = 256
WGRAD_WARPS = 4
WGRAD_STAGES = 3
WGRAD_PROGRAMS = 1024
WGRAD_PROGRAMS_INTERPRETED = 8
WGRAD_MAX_CIN = 16
WGRAD_PAD_CIN = True
# Whether each kernel row of the thin weight gradient is a program of its own (dz read once a row) rather than one
# program taking all rows of a pixel chunk (dz read once, a chunk of WGRAD_BLOCK_P / rows pixels).
WGRAD_ROW_PROGRAMS = False


# ------------------------------------------------------------------------------------------------- kernels

@triton.jit
def _tile_stats(zs, mask, cols, col_ok, M, C, pid_m, psum_ptr, pm2_ptr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
                SWAP: tl.constexpr):
    """Row ``pid_m`` of the (sum, M2) workspaces from a [BLOCK_M, C] fp32 tile (with SWAP its [C, BLOCK_M]
    transpose): its per-channel sums and squared deviations from the tile's own mean, the partials that Chan's
    formula combines across tiles (_stats_combine_kernel)."""
    n_rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    if SWAP:
        s1 = tl.sum(tl.where(mask, zs, 0.0), axis=1)
        dev = tl.where(mask, zs - (s1 / n_rows)[:, None], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
    else:
        s1 = tl.sum(tl.where(mask, zs, 0.0), axis=0)
        dev = tl.where(mask, zs - (s1 / n_rows)[None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=0)
    t_row = pid_m
    if IDX64:
        t_row = t_row.to(tl.int64)
    tl.store(psum_ptr + t_row * C + cols, s1, mask=col_ok)
    tl.store(pm2_ptr + t_row * C + cols, m2, mask=col_ok)


@triton.jit
def _stats_epilogue(acc, rows, row_ok, cols, col_ok, pid_m, z_ptr, psum_ptr, pm2_ptr, M, Cout,
                    IDX64: tl.constexpr, BLOCK_M: tl.constexpr, SWAP: tl.constexpr):
    """The statistics convs' epilogue: z = acc in z's dtype, then row ``pid_m`` of the (sum, M2) workspaces.
    ``acc``: [pixels, channels], or with SWAP [channels, pixels]: then each channel's pixels lie in one warp's
    registers and lanes, and the reductions need no shared-memory rounds across warps (in the pixel-major tile
    Triton reduces across the 8 warps in 16 rounds of shared memory and barriers a tile, which cost the 1x1
    convs about as much as the conv itself)."""
    zr = acc.to(z_ptr.dtype.element_ty)
    if SWAP:
        mask = col_ok[:, None] & row_ok[None, :]
        tl.store(z_ptr + rows[None, :] * Cout + cols[:, None], zr, mask=mask)
    else:
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(z_ptr + rows[:, None] * Cout + cols[None, :], zr, mask=mask)
    # The tile's statistics: its channel sums, and squared deviations from the tile's own mean (combined
    # across tiles by Chan's formula in _stats_combine_kernel, which keeps the variance exact to fp32 rounding).
    # They are the statistics of z as stored, rounded: BN's backward differentiates through the mean and
    # variance *of the z it saved*, and statistics of the unrounded accumulator would not sum to zero over the
    # stored z's deviations (at fp16, with few values per channel, that doubled the input gradient's error).
    _tile_stats(zr.to(tl.float32), mask, cols, col_ok, M, Cout, pid_m, psum_ptr, pm2_ptr, IDX64, BLOCK_M, SWAP)


@triton.jit
def _conv_stats_kernel(
    x_ptr, w_ptr, z_ptr, psum_ptr, pm2_ptr, mu_ptr, sc_ptr, bi_ptr,
    M, H, W, Ho, Wo, Cin, Cin_g, Cout_g, Cout,
    sxn, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w,
    n_tiles_n, tiles_per_group,
    KH: tl.constexpr, KW: tl.constexpr,
    MODE: tl.constexpr, GB: tl.constexpr, FULL: tl.constexpr, PAD: tl.constexpr,
    NORM: tl.constexpr, NORM_RELU: tl.constexpr,
    PREC: tl.constexpr, RND: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
):
    """z = conv(x) (or conv(act(bn(x))) with NORM) plus per-tile channel statistics of z; SWAP: the tile
    computed transposed, channels as the MMA's rows (see ``_stats_epilogue``).

    The tile's GEMM is ``_conv_tile``, the K walks of ``_conv_gemm_kernel`` (MODE 0 tap-major, 1 flat K,
    2 block-diagonal; see there), with NORM applying the BN prologue to each loaded input tile.
    The epilogue stores z in z's dtype and, for program (m-tile i, n-tile j), row i of the workspaces: the
    sum over the tile's valid rows of each channel, and the sum of squared deviations from that tile mean,
    in fp32, of z as stored.
    """
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    rows, row_ok, img, oh, ow, cols, col_ok = _tile_coords(pid_m, pid_n, M, Ho, Wo, Cout_g, Cout, tiles_per_group,
                                                           MODE, GB, FULL, IDX64, BLOCK_M, BLOCK_N)
    acc = _conv_tile(
        x_ptr, w_ptr, mu_ptr, sc_ptr, bi_ptr, pid_n, row_ok, img, oh, ow, cols, col_ok,
        H, W, Cin, Cin_g, Cout_g, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
        tiles_per_group, KH, KW, MODE, GB, FULL, PAD, NORM, NORM_RELU, PREC, RND,
        BLOCK_M, BLOCK_N, BLOCK_K, 1, SWAP)

    _stats_epilogue(acc, rows, row_ok, cols, col_ok, pid_m, z_ptr, psum_ptr, pm2_ptr, M, Cout, IDX64, BLOCK_M,
                    SWAP)


@triton.jit
def _agg_stats_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7,
    C0, C1, C2, C3, C4, C5, C6, C7,
    S0, S1, S2, S3, S4, S5, S6, S7,
    w_ptr, z_ptr, psum_ptr, pm2_ptr,
    M, Cout, Ctot,
    n_tiles_n,
    NUM_CHILDREN: tl.constexpr,
    PREC: tl.constexpr, RND: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
):
    """z = cat(children) @ W^T (the aggregation node's 1x1 conv) plus per-tile channel statistics of z,
    without the concat: the flat K loop of the inference ``_aggregate_kernel`` (child i read in place at
    ``p_i + m * S_i + c``, its pointer picked per iteration by scalar selects) and the epilogue of
    ``_conv_stats_kernel`` (z, then row ``pid_m`` of the (sum, M2) workspaces; SWAP: the tile transposed)."""
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        rows = rows.to(tl.int64)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Cout
    kk = tl.arange(0, BLOCK_K)
    w_row = cols * Ctot

    # Child boundaries in iterations (T) and in weight columns (K).
    T1 = tl.cdiv(C0, BLOCK_K)
    K1 = C0
    T2 = T1 + tl.cdiv(C1, BLOCK_K)
    K2 = K1 + C1
    T3 = T2 + tl.cdiv(C2, BLOCK_K)
    K3 = K2 + C2
    T4 = T3 + tl.cdiv(C3, BLOCK_K)
    K4 = K3 + C3
    T5 = T4 + tl.cdiv(C4, BLOCK_K)
    K5 = K4 + C4
    T6 = T5 + tl.cdiv(C5, BLOCK_K)
    K6 = K5 + C5
    T7 = T6 + tl.cdiv(C6, BLOCK_K)
    K7 = K6 + C6
    T8 = T7 + tl.cdiv(C7, BLOCK_K)
    if NUM_CHILDREN == 1:
        total = T1
    elif NUM_CHILDREN == 2:
        total = T2
    elif NUM_CHILDREN == 3:
        total = T3
    elif NUM_CHILDREN == 4:
        total = T4
    elif NUM_CHILDREN == 5:
        total = T5
    elif NUM_CHILDREN == 6:
        total = T6
    elif NUM_CHILDREN == 7:
        total = T7
    else:
        total = T8

    acc = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    for t in range(0, total):
        base = p0
        C = C0
        S = S0
        ts = 0
        kb = 0
        if NUM_CHILDREN > 1:
            base, C, S, ts, kb = _child_select(t, T1, K1, base, C, S, ts, kb, p1, C1, S1)
        if NUM_CHILDREN > 2:
            base, C, S, ts, kb = _child_select(t, T2, K2, base, C, S, ts, kb, p2, C2, S2)
        if NUM_CHILDREN > 3:
            base, C, S, ts, kb = _child_select(t, T3, K3, base, C, S, ts, kb, p3, C3, S3)
        if NUM_CHILDREN > 4:
            base, C, S, ts, kb = _child_select(t, T4, K4, base, C, S, ts, kb, p4, C4, S4)
        if NUM_CHILDREN > 5:
            base, C, S, ts, kb = _child_select(t, T5, K5, base, C, S, ts, kb, p5, C5, S5)
        if NUM_CHILDREN > 6:
            base, C, S, ts, kb = _child_select(t, T6, K6, base, C, S, ts, kb, p6, C6, S6)
        if NUM_CHILDREN > 7:
            base, C, S, ts, kb = _child_select(t, T7, K7, base, C, S, ts, kb, p7, C7, S7)
        c = (t - ts) * BLOCK_K + kk
        c_ok = c < C
        a = tl.load(base + (rows * S)[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptr + w_row[None, :] + (kb + c)[:, None], mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma_into(a, b, acc, PREC, RND, SWAP)

    _stats_epilogue(acc, rows, row_ok, cols, col_ok, pid_m, z_ptr, psum_ptr, pm2_ptr, M, Cout, IDX64, BLOCK_M,
                    SWAP)


@triton.jit
def _row_tile(n_tiles_c, M, C, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_C] tile of an [M, C] pixel matrix (row tiles major): ``(pid_m, rows, cols,
    col_ok, mask)``, the rows 64-bit with IDX64 (the elementwise BN kernels and the statistics pass)."""
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_c
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        rows = rows.to(tl.int64)
    cols = (pid % n_tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    return pid_m, rows, cols, col_ok, (rows < M)[:, None] & col_ok[None, :]


@triton.jit
def _tensor_stats_kernel(
    z_ptr, psum_ptr, pm2_ptr, M, C, szm, n_tiles_c,
    IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The (sum, M2) partials of an existing [M, C] pixel matrix (row stride ``szm``), one [BLOCK_M, BLOCK_C]
    tile a program, into row ``pid_m`` of the workspaces: the statistics of a conv whose output another kernel
    wrote (the CUDA stem)."""
    pid_m, rows, cols, col_ok, mask = _row_tile(n_tiles_c, M, C, IDX64, BLOCK_M, BLOCK_C)
    zs = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _tile_stats(zs, mask, cols, col_ok, M, C, pid_m, psum_ptr, pm2_ptr, IDX64, BLOCK_M, False)


@triton.jit
def _chunk_of(pid, T, C, TC, n_cblocks, BLOCK_C: tl.constexpr):
    """A finalize program's share of a [T, C] workspace: (chunk, its channel block's columns and their mask,
    the chunk's first row and end row), programs ordered chunk-major over ``n_cblocks`` channel blocks."""
    chunk = pid // n_cblocks
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_lo = chunk * TC
    return chunk, cols, cols < C, t_lo, tl.minimum(T, t_lo + TC)


@triton.jit
def _stats_combine_kernel(
    psum_ptr, pm2_ptr, out_a_ptr, out_b_ptr, T, C, M, BM, TC, n_cblocks,
    gamma_ptr, rstd_ptr, scale_ptr, rmean_ptr, rvar_ptr, count_ptr, eps, factor, unbias,
    FINAL: tl.constexpr, BN: tl.constexpr, HAS_GAMMA: tl.constexpr, RUNNING: tl.constexpr,
    COUNTER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chan's combination of per-tile (sum, M2) rows of a [T, C] workspace, tile t holding min(BM, M - t * BM)
    values: M2 = sum_t M2_t + sum_t n_t (mean_t - mean)^2 over the TC rows of chunk ``pid // n_cblocks``.
    FINAL: the chunk is the whole workspace, and the channels' batch mean and biased variance are written;
    otherwise the chunk's (sum, M2) become row ``chunk`` of a [T / TC, C] workspace whose chunks hold TC * BM
    values each, which this kernel combines again with FINAL. Two stages, not one long loop a channel block: a
    224x224 layer has tens of thousands of tile rows, and one program walking them all took milliseconds. The
    rows are combined in a fixed order (no atomics): the result is the same on every run.

    BN (with FINAL): also the layer's BatchNorm coefficients, rstd = 1 / sqrt(var + eps) and scale = gamma * rstd,
    and its bookkeeping as nn.BatchNorm2d does it (RUNNING: running = running + factor (stat - running) with the
    unbiased variance, var * unbias; COUNTER: the batch counter + 1, by program 0): what would otherwise be a
    dozen small tensor ops a layer, each a launch the host issues."""
    chunk, cols, col_ok, t_lo, t_hi = _chunk_of(tl.program_id(0), T, C, TC, n_cblocks, BLOCK_C)
    n_all = tl.minimum(M - t_lo * BM, TC * BM).to(tl.float32)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < t_hi)[:, None] & col_ok[None, :]
        total += tl.sum(tl.load(psum_ptr + t[:, None] * C + cols[None, :], mask=ok, other=0.0), axis=0)
    mean = total / n_all
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_hi
        ok = t_ok[:, None] & col_ok[None, :]
        n = tl.where(t_ok, tl.minimum(M - t * BM, BM), 1).to(tl.float32)
        s = tl.load(psum_ptr + t[:, None] * C + cols[None, :], mask=ok, other=0.0)
        q = tl.load(pm2_ptr + t[:, None] * C + cols[None, :], mask=ok, other=0.0)
        d = s / n[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(ok, q + n[:, None] * d * d, 0.0), axis=0)
    if FINAL:
        var = m2 / n_all
        tl.store(out_a_ptr + cols, mean, mask=col_ok)
        tl.store(out_b_ptr + cols, var, mask=col_ok)
        if BN:
            rstd = 1.0 / tl.sqrt_rn(var + eps)
            tl.store(rstd_ptr + cols, rstd, mask=col_ok)
            if HAS_GAMMA:
                rstd = rstd * tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(scale_ptr + cols, rstd, mask=col_ok)
            if RUNNING:
                rm = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0)
                rv = tl.load(rvar_ptr + cols, mask=col_ok, other=0.0)
                tl.store(rmean_ptr + cols, rm + factor * (mean - rm), mask=col_ok)
                tl.store(rvar_ptr + cols, rv + factor * (var * unbias - rv), mask=col_ok)
            if COUNTER:
                if tl.program_id(0) == 0:
                    tl.store(count_ptr, tl.load(count_ptr) + 1)
    else:
        tl.store(out_a_ptr + chunk * C + cols, total, mask=col_ok)
        tl.store(out_b_ptr + chunk * C + cols, m2, mask=col_ok)


@triton.jit
def _sum_chunks_kernel(
    a_ptr, b_ptr, out_a_ptr, out_b_ptr, T, C, TC, n_cblocks,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Column sums of the TC-row chunk ``pid // n_cblocks`` of two [T, C] workspaces, into row ``chunk`` of two
    [T / TC, C] ones: the first stage of BN backward's finalize on layers with many tile rows (fixed order)."""
    chunk, cols, col_ok, t_lo, t_hi = _chunk_of(tl.program_id(0), T, C, TC, n_cblocks, BLOCK_C)
    sa = tl.zeros([BLOCK_C], dtype=tl.float32)
    sb = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        off = t[:, None] * C + cols[None, :]
        ok = (t < t_hi)[:, None] & col_ok[None, :]
        sa += tl.sum(tl.load(a_ptr + off, mask=ok, other=0.0), axis=0)
        sb += tl.sum(tl.load(b_ptr + off, mask=ok, other=0.0), axis=0)
    tl.store(out_a_ptr + chunk * C + cols, sa, mask=col_ok)
    tl.store(out_b_ptr + chunk * C + cols, sb, mask=col_ok)


@triton.jit
def _bn_bwd_finalize_kernel(
    ps_ptr, psx_ptr, rstd_ptr, gamma_ptr, dbeta_ptr, dgamma_ptr, k1_ptr, k2_ptr, k3_ptr, T, C, M,
    HAS_GAMMA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Between the two passes of BN(+ReLU) backward: the column sums of the per-tile rows, sum(g) = dbeta and
    sum(g * (z - mean)), then dgamma = rstd * sum(g (z - mean)) and the apply pass's k1 = gamma * rstd,
    k2 = k1 * mean(g), k3 = k1 * rstd^2 * mean(g (z - mean)). One launch for a dozen small tensor ops a layer."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        off = t[:, None] * C + cols[None, :]
        ok = (t < T)[:, None] & col_ok[None, :]
        sg += tl.sum(tl.load(ps_ptr + off, mask=ok, other=0.0), axis=0)
        sgx += tl.sum(tl.load(psx_ptr + off, mask=ok, other=0.0), axis=0)
    rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0)
    k1 = rstd
    if HAS_GAMMA:
        k1 = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0) * rstd
    tl.store(dbeta_ptr + cols, sg, mask=col_ok)
    tl.store(dgamma_ptr + cols, sgx * rstd, mask=col_ok)
    tl.store(k1_ptr + cols, k1, mask=col_ok)
    tl.store(k2_ptr + cols, k1 * (sg / M), mask=col_ok)
    tl.store(k3_ptr + cols, k1 * rstd * rstd * (sgx / M), mask=col_ok)


@triton.jit
def _bn_act_kernel(
    z_ptr, mu_ptr, sc_ptr, bi_ptr, r_ptr, y_ptr,
    M, HW, W, C,
    szm, srn, src, srh, srw,
    n_tiles_c,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = act((z - mean) * scale + bias + residual) over NHWC rows; z at ``m * szm + c`` (a channels_last
    tensor or a channel slice of one), the residual through its four strides, y channels_last-contiguous."""
    _, rows, cols, col_ok, mask = _row_tile(n_tiles_c, M, C, IDX64, BLOCK_M, BLOCK_C)
    mu = tl.load(mu_ptr + cols, mask=col_ok, other=0.0)
    sc = tl.load(sc_ptr + cols, mask=col_ok, other=0.0)
    bi = tl.load(bi_ptr + cols, mask=col_ok, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    v = (z - mu[None, :]) * sc[None, :] + bi[None, :]
    if HAS_RES:
        img = rows // HW
        pix = rows % HW
        oh = pix // W
        ow = pix % W
        r_off = (img * srn + oh * srh + ow * srw)[:, None] + (cols * src)[None, :]
        v = v + tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _strided_offsets(rows, cols, HW, W, sn, sc, sh, sw):
    """Offsets of the (pixel row, channel) tile in a tensor read through its four strides (any layout)."""
    img = rows // HW
    pix = rows % HW
    return (img * sn + (pix // W) * sh + (pix % W) * sw)[:, None] + (cols * sc)[None, :]


@triton.jit
def _masked_grad(g_ptr, y_ptr, rows, cols, mask, HW, W, sgn, sgc, sgh, sgw, sym, d, sc_ptr, bi_ptr, col_ok,
                 RELU: tl.constexpr):
    """The output gradient read through its four strides, zeroed where the ReLU's output is not > 0 (torch's
    threshold_backward: the gradient passes where the result is positive). RELU 1: the output ``y`` read back;
    2: the BN output recomputed from ``d`` = z - mean, ``d * scale + bias`` in fp32 (no residual: one read
    fewer)."""
    g_off = _strided_offsets(rows, cols, HW, W, sgn, sgc, sgh, sgw)
    g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if RELU == 1:
        y = tl.load(y_ptr + rows[:, None] * sym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.where(y > 0.0, g, 0.0)
    elif RELU == 2:
        sc = tl.load(sc_ptr + cols, mask=col_ok, other=0.0)
        bi = tl.load(bi_ptr + cols, mask=col_ok, other=0.0)
        g = tl.where(d * sc[None, :] + bi[None, :] > 0.0, g, 0.0)
    return g


@triton.jit
def _bn_bwd_reduce_kernel(
    g_ptr, y_ptr, z_ptr, mu_ptr, sc_ptr, bi_ptr, ps_ptr, psx_ptr,
    M, HW, W, C,
    sgn, sgc, sgh, sgw, sym, szm,
    n_tiles_c,
    RELU: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr,
):
    """Pass 1 of BN(+ReLU) backward: per block of ROW_TILES * BLOCK_M rows and channel, sum(g) and
    sum(g * (z - mean)) (centred, so no cancellation against a large mean), with g the masked output gradient
    (see ``_masked_grad``). Row ``pid_m`` of the workspaces. The program adds its tiles elementwise and reduces
    across threads once: a cross-warp reduction per 2048 elements held the pass to half the memory bandwidth."""
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_c
    pid_c = pid % n_tiles_c
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mu = tl.load(mu_ptr + cols, mask=col_ok, other=0.0)
    acc_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_gd = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for i in range(ROW_TILES):
        tile = pid_m * ROW_TILES + i
        if IDX64:  # before the multiply: the last program's tiles may start past 2**31 rows
            tile = tile.to(tl.int64)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, z - mu[None, :], 0.0)
        g = _masked_grad(g_ptr, y_ptr, rows, cols, mask, HW, W, sgn, sgc, sgh, sgw, sym, d, sc_ptr, bi_ptr,
                         col_ok, RELU)
        acc_g += g
        acc_gd += g * d
    t_row = pid_m
    if IDX64:
        t_row = t_row.to(tl.int64)
    tl.store(ps_ptr + t_row * C + cols, tl.sum(acc_g, axis=0), mask=col_ok)
    tl.store(psx_ptr + t_row * C + cols, tl.sum(acc_gd, axis=0), mask=col_ok)


@triton.jit
def _bn_bwd_apply_kernel(
    g_ptr, y_ptr, z_ptr, mu_ptr, sc_ptr, bi_ptr, k1_ptr, k2_ptr, k3_ptr, dz_ptr, dr_ptr, e_ptr,
    M, HW, W, C,
    sgn, sgc, sgh, sgw, sym, szm, sen, sec, seh, sew,
    n_tiles_c,
    RELU: tl.constexpr, HAS_DRES: tl.constexpr, HAS_EXTRA: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 2 of BN(+ReLU) backward: dz = k1 * g - k2 - k3 * (z - mean) per channel (k1 = gamma * rstd,
    k2 = k1 * mean(g), k3 = k1 * rstd^2 * mean(g * (z - mean))), computed in fp32 and rounded once; dres = g,
    plus (HAS_EXTRA) the gradient of the residual's other readers, read through its four strides."""
    _, rows, cols, col_ok, mask = _row_tile(n_tiles_c, M, C, IDX64, BLOCK_M, BLOCK_C)
    mu = tl.load(mu_ptr + cols, mask=col_ok, other=0.0)
    k1 = tl.load(k1_ptr + cols, mask=col_ok, other=0.0)
    k2 = tl.load(k2_ptr + cols, mask=col_ok, other=0.0)
    k3 = tl.load(k3_ptr + cols, mask=col_ok, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    d = z - mu[None, :]
    g = _masked_grad(g_ptr, y_ptr, rows, cols, mask, HW, W, sgn, sgc, sgh, sgw, sym, d, sc_ptr, bi_ptr, col_ok,
                     RELU)
    dz = k1[None, :] * g - k2[None, :] - k3[None, :] * d
    off = rows[:, None] * C + cols[None, :]
    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if HAS_DRES:
        r = g
        if HAS_EXTRA:
            e_off = _strided_offsets(rows, cols, HW, W, sen, sec, seh, sew)
            r = r + tl.load(e_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dr_ptr + off, r.to(dr_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers

@triton.jit
def _max_pool_bwd_kernel(
    x_ptr, g_ptr, dx_ptr, e_ptr,
    P, Ho, Wo, C,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdh, sdw, sen, sec, seh, sew,
    n_tiles_c,
    K: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The gradient of K x K max pooling with stride K, no padding (the DLA trees' downsampling): each window's
    output gradient goes to the input that won it, zeros to the others, every covered input written once (the
    windows do not overlap). The winner is found again from x, as torch's max_pool2d picks it: the first
    maximum in scan order, the last NaN. No indices are stored by the forward. HAS_EXTRA: another gradient of
    x (its other readers') is added to every element as it is written."""
    _, c, mask, img, oh, ow = _pool_tile(n_tiles_c, P, Ho, Wo, C, BLOCK_P, BLOCK_C)
    xbase = img * sxn + (oh * K) * sxh + (ow * K) * sxw
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_P, BLOCK_C), tl.int32)
    for t in range(K * K):
        v = tl.load(x_ptr + (xbase + (t // K) * sxh + (t % K) * sxw)[:, None] + (c * sxc)[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)
        take = (v > best) | (v != v)
        best = tl.where(take, v, best)
        arg = tl.where(take, t, arg)
    g = tl.load(g_ptr + (img * sgn + oh * sgh + ow * sgw)[:, None] + (c * sgc)[None, :], mask=mask, other=0.0)
    zero = tl.zeros((BLOCK_P, BLOCK_C), g.dtype)
    dbase = img * sdn + (oh * K) * sdh + (ow * K) * sdw
    ebase = img * sen + (oh * K) * seh + (ow * K) * sew
    for t in range(K * K):
        d = tl.where(arg == t, g, zero)
        if HAS_EXTRA:
            e = tl.load(e_ptr + (ebase + (t // K) * seh + (t % K) * sew)[:, None] + (c * sec)[None, :], mask=mask,
                        other=0.0)
            d = d.to(tl.float32) + e.to(tl.float32)
        tl.store(dx_ptr + (dbase + (t // K) * sdh + (t % K) * sdw)[:, None] + c[None, :],
                 d.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_thin_kernel(
    x_ptr, dz_ptr, part_ptr,
    H, W, Ho, Wo, Cout, KH, sh, sw, ph, pw, sxn, sxh, sxw, sdz,
    n_rb, n_cb, n_cob, n_khb, n_chunks, chunks_per_prog,
    CIN: tl.constexpr, KWC: tl.constexpr, CONTIG: tl.constexpr, IDX64: tl.constexpr, PREC: tl.constexpr,
    RND: tl.constexpr, TILE_R: tl.constexpr, TILE_W: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_J: tl.constexpr,
    KHB: tl.constexpr,
):
    """One partial of the weight gradient of a thin conv (few input channels, many pixels): program (split s,
    output-channel block, block of KHB kernel rows) sums dz[p, co] * x[p shifted by (kh, kw), ci] over its share
    of the output pixels p, for every (kh, kw, ci) of its kernel rows at once; the reduction over pixels is the
    MMA's K, the rows' taps its N (entry n = row * BLOCK_J + j). With KHB = 1 each kernel row is a program of its
    own (dz read once a row); with all rows in one program dz is read once.
    The pixels come in chunks of TILE_R output rows x TILE_W columns of one image, so a pixel's place in its
    chunk is fixed (no per-pixel division) and the chunk's origin a few scalar operations. With CONTIG (x's
    pixels CIN elements apart) a kernel row's KW x CIN inputs of one pixel are one run of x: entry j of the run
    is x's element at the run's start + j; its tap kw = j // CIN is the same over CIN entries, and so is the
    mask, so the loads vectorise when CIN spans a vector.
    Each program writes its partial to its own slots of ``part`` [splits, KH, Cout, KW * CIN]; the launcher sums
    the splits (a fixed order: deterministic)."""
    pid = tl.program_id(0)
    khb = pid % n_khb
    rest = pid // n_khb
    cob = rest % n_cob
    split = rest // n_cob
    kh0 = khb * KHB
    co = cob * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < Cout
    n = tl.arange(0, KHB * BLOCK_J)
    dkh = n // BLOCK_J
    j = n - dkh * BLOCK_J
    if BLOCK_J % CIN == 0:  # written so that Triton sees kw constant over CIN entries (a remainder hides it)
        kw = n // CIN - dkh * (BLOCK_J // CIN)
    else:
        kw = j // CIN
    n_ok = (j < KWC) & (kh0 + dkh < KH)
    i = tl.arange(0, TILE_R * TILE_W)
    r = i // TILE_W
    w = i % TILE_W
    if CONTIG:
        xoff = (r * (sh * sxh) + w * (sw * CIN))[:, None] + (dkh * sxh + j)[None, :]
    else:
        xoff = (r * (sh * sxh) + w * (sw * sxw))[:, None] + (dkh * sxh + kw * sxw + (j - kw * CIN))[None, :]
    doff = ((r * Wo + w) * sdz)[:, None] + co[None, :]
    acc = tl.zeros((BLOCK_CO, KHB * BLOCK_J), dtype=tl.float32)
    c0 = split * chunks_per_prog
    c1 = tl.minimum(c0 + chunks_per_prog, n_chunks)
    for c in range(c0, c1):
        cb = c % n_cb
        t = c // n_cb
        rb = t % n_rb
        img = t // n_rb
        if IDX64:
            img = img.to(tl.int64)
        oh0 = rb * TILE_R
        ow0 = cb * TILE_W
        pok = (r < Ho - oh0) & (w < Wo - ow0)
        g = tl.load(dz_ptr + ((img * Ho + oh0) * Wo + ow0) * sdz + doff, mask=pok[:, None] & co_ok[None, :],
                    other=0.0)
        ih0 = oh0 * sh - ph + kh0
        iw0 = ow0 * sw - pw
        # input row and column of entry n: constant over each tap's CIN entries, so the mask is too (vector loads)
        row = (ih0 + r * sh)[:, None] + dkh[None, :]
        col = (iw0 + w * sw)[:, None] + kw[None, :]
        ok = pok[:, None] & n_ok[None, :] & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        if CONTIG:
            xb = img * sxn + ih0 * sxh + iw0 * CIN
        else:
            xb = img * sxn + ih0 * sxh + iw0 * sxw
        a = tl.load(x_ptr + xb + xoff, mask=ok, other=0.0)
        acc = _mma(tl.trans(g), a, acc, PREC, RND)
    slot = (split * KH + kh0 + dkh)[None, :] * Cout + co[:, None]
    tl.store(part_ptr + slot * KWC + j[None, :], acc, mask=co_ok[:, None] & n_ok[None, :])


def _idx64(*extents: int) -> bool:
    return max(extents) >= _IDX64_THRESHOLD


def train_conv_kind(cin_g: int, cout_g: int, groups: int) -> Optional[str]:
    """The K walk that runs a conv of this grouping, or None when none does (very wide groups against
    narrow ones: the inference path's CUDA-core direct kernel has no statistics epilogue)."""
    if groups > 1 and (cin_g < 16 or cout_g < 16):
        return "blockdiag" if max(cin_g, cout_g) <= 128 else None
    return "flat" if cin_g < 16 else "dense"


def train_conv_plan(M: int, cin_g: int, cout_g: int, groups: int, kh: int, kw: int, dtype: torch.dtype,
                    tf32: bool, force: Optional[str] = None, norm: bool = False) -> Dict:
    """Tiles of the statistics conv: the inference heuristic's (:func:`conv_plan`) without split-K (the
    statistics need whole output tiles; training batches fill the GPU anyway). With the BN prologue (``norm``)
    the input tile passes through registers to be normalised, so deep cp.async pipelines buy nothing and
    their buffers cost registers: STAGES_NORM stages."""
    kind = force or train_conv_kind(cin_g, cout_g, groups)
    if kind not in TRAIN_CONV_KINDS:
        raise ValueError(f"no statistics-conv kernel for groups={groups} with {cin_g} -> {cout_g} channels a "
                         f"group (kind {kind!r}); the training path falls back to eager for it")
    cfg = conv_plan(M, cin_g, cout_g, groups, kh, kw, dtype, tf32, interpreted(), kind, 0)
    cfg["SPLIT"] = 1
    if kind == "dense" and groups == 1 and not norm:
        train_class_tiles(cfg, tile_class((kh, kw)), M, cin_g, cout_g)
    cfg["SWAP"] = stats_swap(kind, cfg["BLOCK_N"], norm)
    if norm:
        cfg["num_stages"] = min(cfg["num_stages"], STAGES_NORM)
        if cfg.get("BLOCK_M", 0) * cfg.get("BLOCK_N", 0) >= 128 * 64:
            cfg["num_warps"] = max(cfg["num_warps"], WARPS_NORM)
    return cfg


TILE_CLASSES = ("1x1", "kxk", "agg")


def tile_class(kernel: Optional[Tuple[int, int]]) -> str:
    """The class of a dense ungrouped statistics conv (DLA_FAST_TRAIN_TILES, :func:`train_class_tiles`) by its
    kernel size; None: the aggregation node."""
    return "agg" if kernel is None else ("1x1" if tuple(kernel) == (1, 1) else "kxk")


def tile_fits(block_n: int, block_k: int, cin: int, cout: int) -> bool:
    """Whether a statistics-conv tile suits a layer: no N tile wider than the output channels' power of two, no K
    tile deeper than the largest power of two within the (narrowest) input's channels."""
    return block_n <= max(16, _pow2(cout)) and block_k <= max(16, 1 << (max(1, cin).bit_length() - 1))


def train_tile_overrides() -> Dict[str, Tuple[int, int, int, int, int]]:
    """DLA_FAST_TRAIN_TILES="1x1=BM,BN,BK,WARPS,STAGES;kxk=...;agg=..." (a tuning override, for A/Bs of a tile
    sweep; a class left out keeps the plan): the statistics convs' tiles per class of dense ungrouped conv without
    the BN prologue (1x1, larger kernels, the aggregation node)."""
    return dict(_parse_tiles(_env.get("DLA_FAST_TRAIN_TILES")))


@functools.lru_cache(maxsize=8)  # every launch asks; the value changes only with _env.reload()
def _parse_tiles(v: Optional[str]) -> Tuple[Tuple[str, Tuple[int, int, int, int, int]], ...]:
    out: Dict[str, Tuple[int, int, int, int, int]] = {}
    for part in (v or "").split(";"):
        if not part.strip():
            continue
        cls, _, vals = part.partition("=")
        cls = cls.strip().lower()
        if cls not in TILE_CLASSES or cls in out:
            raise ValueError(f"DLA_FAST_TRAIN_TILES: {part.strip()!r} names {'again ' if cls in out else ''}class "
                             f"{cls!r}; use each of {', '.join(TILE_CLASSES)} at most once, as CLASS=BM,BN,BK,WARPS,"
                             f"STAGES")
        fields = vals.split(",")
        bm, bn, bk, warps = _positive_ints("DLA_FAST_TRAIN_TILES", ",".join(fields[:4]), 4, f"{cls}'s BM,BN,BK,WARPS")
        stages = fields[4:]
        if len(stages) != 1 or not stages[0].strip().isdigit() or not 1 <= int(stages[0]) <= 8 or min(bm, bn) < 16:
            raise ValueError(f"DLA_FAST_TRAIN_TILES: {part.strip()!r} needs BM,BN,BK,WARPS,STAGES with tiles of at "
                             f"least 16 and 1 to 8 stages")
        out[cls] = (bm, bn, bk, warps, int(stages[0]))
    return tuple(out.items())


def train_agg_plan(M: int, chans: Sequence[int], Cout: int, dtype: torch.dtype, tf32: bool) -> Dict:
    """Tiles of the aggregation node's statistics conv: the inference ``aggregate_plan`` without split-K, then
    :func:`train_class_tiles` (class "agg"), transposed as :func:`stats_swap` says."""
    cfg = aggregate_plan(M, chans, Cout, dtype, interpreted(), tf32, 0)
    train_class_tiles(cfg, tile_class(None), M, min(chans), Cout, sum(chans))
    cfg["SWAP"] = stats_swap("dense", cfg["BLOCK_N"], False)
    return cfg


def train_class_tiles(cfg: Dict, cls: str, M: int, cin: int, cout: int, k_total: int = 0) -> None:
    """The statistics conv's tile by class of layer, into ``cfg``: the class's DLA_FAST_TRAIN_TILES entry where
    it suits the layer (:func:`tile_fits`), else, over the inference plan's 128x128x64 tile on 8 warps, TILE_1X1
    for 1x1 convs and TILE_WIDE for k x k convs and aggregation nodes of ``k_total`` >= WIDE_AGG_MIN_K input
    channels where it makes WIDE_MIN_PROGRAMS programs. The plan of a layer depends on its shape only, not on
    the GPU."""
    o = train_tile_overrides().get(cls)
    if o is None:
        if (cfg.get("BLOCK_M"), cfg.get("BLOCK_N"), cfg.get("BLOCK_K"), cfg.get("num_warps")) != (128, 128, 64, 8):
            return
        if cls == "1x1":
            o = TILE_1X1
        elif (_cdiv(M, TILE_WIDE[0]) * _cdiv(cout, TILE_WIDE[1]) >= WIDE_MIN_PROGRAMS
              and (cls == "kxk" or k_total >= WIDE_AGG_MIN_K)):
            o = TILE_WIDE
        else:
            return
    if tile_fits(o[1], o[2], cin, cout):
        cfg.update(BLOCK_M=o[0], BLOCK_N=o[1], BLOCK_K=o[2], num_warps=o[3], num_stages=o[4])


def stats_swap(kind: str, block_n: int, norm: bool) -> bool:
    """Whether a statistics conv computes its tile transposed (channels as the MMA's rows, so the statistics
    are reduced inside each warp; ``_stats_epilogue``): on the dense and aggregation K walks without the BN
    prologue, with tiles of at least 64 channels (the MMA's row count), unless DLA_FAST_TRAIN_STATS_TILE=pixels.
    The pixel-major tile reduces each channel across the warps that hold its pixels, in shared-memory rounds
    that cost the wide 1x1 convs nearly as much as their GEMM."""
    return (_env.choice("DLA_FAST_TRAIN_STATS_TILE") != "pixels" and kind == "dense" and not norm
            and block_n >= 64)


FINAL_BLOCK_T = 64  # workspace rows a finalize program reads per step
FINAL_CHUNK_ROWS = 64  # workspace rows a first-stage program combines (fewer rows: one stage)
FINAL_MAX_PROGRAMS = 1024  # first-stage programs at most (chunks x channel blocks)


def _finalize_tiles(C: int) -> Tuple[int, int]:
    """(channels a finalize program owns, channel blocks): at most 64 channels a program, so that wide layers
    spread over several SMs."""
    bc = min(64, max(16, _pow2(C)))
    return bc, _cdiv(C, bc)


def _chunks(T: int, n_cblocks: int) -> Tuple[int, int]:
    """(rows a chunk, chunks) of a [T, C] workspace's first combining stage; one chunk: no first stage. The
    split depends only on the shape (not on the GPU), so results are the same on every card."""
    if T <= FINAL_CHUNK_ROWS:
        return T, 1
    s = max(1, min(_cdiv(T, FINAL_CHUNK_ROWS), FINAL_MAX_PROGRAMS // n_cblocks))
    tc = _cdiv(T, s)
    return tc, _cdiv(T, tc)


def _unused_pointer(device: torch.device) -> torch.Tensor:
    """A pointer argument the kernel never dereferences (its constexpr flag is off), distinct from every real
    argument: a kernel argument must not alias another one that the kernel may write."""
    return torch.empty(1, device=device, dtype=torch.float32)


class BnFold(NamedTuple):
    """A layer's BatchNorm, for the statistics' final kernel to compute its coefficients and update its running
    statistics (see ``_stats_combine_kernel``): ``gamma`` (or None: affine=False), ``eps``; the running mean and
    variance (fp32, or both None) with ``factor`` (the momentum) and ``count`` (values a channel, for the unbiased
    variance); the batch counter (int64, or None)."""

    gamma: Optional[torch.Tensor]
    eps: float
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    factor: float
    count: int


_NO_FOLD = BnFold(None, 0.0, None, None, None, 0.0, 2)  # the final launch's BN arguments when it finishes no BN


def _stats_from_partials(psum: torch.Tensor, pm2: torch.Tensor, M: int, bm: int, raw: bool = False,
                         fold: Optional[BnFold] = None) -> Tuple[torch.Tensor, ...]:
    """(mean, biased variance) of every channel from the per-tile (sum, M2) rows: _stats_combine_kernel, in
    two stages where there are many rows. With ``fold``: (mean, var, rstd, scale), and its running statistics
    and counter updated in place, in the same final launch."""
    T, C = psum.shape
    dev = psum.device
    mean = torch.empty(C, device=dev, dtype=torch.float32)
    var = torch.empty_like(mean)
    bc, ncb = _finalize_tiles(C)
    tc, n_chunks = _chunks(T, ncb)
    unused = _unused_pointer(dev)
    if n_chunks > 1:
        csum = torch.empty((n_chunks, C), device=dev, dtype=torch.float32)
        cm2 = torch.empty_like(csum)
        _kernel(_stats_combine_kernel, raw)[lambda meta: (n_chunks * ncb,)](
            psum, pm2, csum, cm2, T, C, M, bm, tc, ncb, *([unused] * 6), 0.0, 0.0, 0.0,
            FINAL=False, BN=False, HAS_GAMMA=False, RUNNING=False, COUNTER=False, BLOCK_T=FINAL_BLOCK_T, BLOCK_C=bc,
            num_warps=WARPS_ELTWISE, num_stages=1)
        psum, pm2, T, bm = csum, cm2, n_chunks, tc * bm
    f = fold if fold is not None else _NO_FOLD
    rstd, scale = (torch.empty_like(mean), torch.empty_like(mean)) if fold is not None else (unused, unused)
    ptrs = [unused if t is None else t
            for t in (f.gamma, rstd, scale, f.running_mean, f.running_var, f.num_batches_tracked)]
    _kernel(_stats_combine_kernel, raw)[lambda meta: (ncb,)](
        psum, pm2, mean, var, T, C, M, bm, T, ncb, *ptrs, float(f.eps), float(f.factor), f.count / (f.count - 1),
        FINAL=True, BN=fold is not None, HAS_GAMMA=f.gamma is not None, RUNNING=f.running_mean is not None,
        COUNTER=f.num_batches_tracked is not None, BLOCK_T=FINAL_BLOCK_T, BLOCK_C=bc, num_warps=WARPS_ELTWISE,
        num_stages=1)
    return (mean, var) if fold is None else (mean, var, rstd, scale)


def conv_stats_launch(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                      groups: int, norm: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                      norm_relu: bool = False, tf32: bool = False, config: Optional[Dict] = None,
                      raw: bool = False, fold: Optional[BnFold] = None) -> Tuple[torch.Tensor, ...]:
    """(z, mean, var): z = conv2d(x', weight) channels_last in x's dtype, and the fp32 batch mean and biased
    variance of each of z's channels. x' is x, or with ``norm = (mean, scale, bias)`` (fp32, one value per
    input channel) ``act((x - mean) * scale + bias)`` computed as x is loaded. With ``fold``, the layer's BN:
    (z, mean, var, rstd, scale), its running statistics updated (:func:`_stats_from_partials`)."""
    x = _nhwc(x)
    N, Cin, H, W = x.shape
    Cout, Cin_g, kh, kw = weight.shape
    w = weight.permute(0, 2, 3, 1).contiguous()  # [Cout, kh, kw, Cin_g]: free for a channels_last weight
    sh_, sw_ = int(stride[0]), int(stride[1])
    ph, pw = int(padding[0]), int(padding[1])
    Ho = (H + 2 * ph - kh) // sh_ + 1
    Wo = (W + 2 * pw - kw) // sw_ + 1
    Cout_g = Cout // groups
    M = N * Ho * Wo
    z = _new_output(N, Cout, Ho, Wo, x.device, x.dtype)
    cfg = dict(config) if config is not None else train_conv_plan(M, Cin_g, Cout_g, groups, kh, kw, x.dtype,
                                                                    tf32, norm=norm is not None)
    bm, bn, bk, mode, gb = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["MODE"], cfg["GB"]
    swap = bool(cfg.get("SWAP", False))
    if swap and (norm is not None or mode != 0):
        raise ValueError("conv_stats: the transposed tile (SWAP) runs the dense K walk without the BN prologue; "
                         f"this call has MODE {mode} and {'a' if norm is not None else 'no'} prologue")
    T = _cdiv(M, bm)
    psum = torch.empty((T, Cout), device=x.device, dtype=torch.float32)
    pm2 = torch.empty((T, Cout), device=x.device, dtype=torch.float32)
    if M == 0 or Cout == 0:
        raise ValueError(f"conv_stats: empty output {(N, Cout, Ho, Wo)} has no statistics")
    if _skip_launch(z):
        return (z,) + tuple(psum.sum(0) for _ in range(2 if fold is None else 4))
    if M >= _I32_LIMIT:
        raise RuntimeError(f"conv_stats (triton): {M} output pixels exceed the kernel's 32-bit row index")
    tiles_per_group, n_tiles, full = _n_tiling(cfg, Cin_g, Cout_g, groups)
    if norm is not None:
        mu, sc, bi = (t.to(torch.float32).contiguous() for t in norm)
    elif raw:
        mu = sc = bi = psum  # never dereferenced (NORM is off)
    else:
        # Traced: unused pointers, each its own. torch.compile's functionalization clones every argument its
        # analysis of the kernel may write (through the shared tile helpers it counts these) and writes the clones
        # back, so a workspace passed twice came back as its stale copy.
        mu, sc, bi = (_unused_pointer(x.device) for _ in range(3))
    sxn, _, sxh, sxw = x.stride()
    interp = interpreted()
    _kernel(_conv_stats_kernel, raw)[lambda meta: (T * n_tiles,)](
        x, w, z, psum, pm2, mu, sc, bi,
        M, H, W, Ho, Wo, Cin, Cin_g, Cout_g, Cout,
        sxn, sxh, sxw, sh_, sw_, ph, pw, n_tiles, tiles_per_group,
        KH=kh, KW=kw, MODE=mode, GB=gb, FULL=full, PAD=ph > 0 or pw > 0,
        NORM=norm is not None, NORM_RELU=bool(norm_relu),
        PREC=_prec(x.dtype, tf32), RND=_round_tf32(x.dtype, tf32, interp),
        IDX64=_idx64(_max_offset(x), z.numel()),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SWAP=swap, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (z, *_stats_from_partials(psum, pm2, M, bm, raw, fold))


def tensor_stats_launch(z: torch.Tensor, raw: bool = False,
                        fold: Optional[BnFold] = None) -> Tuple[torch.Tensor, ...]:
    """(mean, biased variance) in fp32 of each channel of ``z`` [N, C, H, W], whose pixels must collapse to one
    row stride (channels_last, or a channel slice of it): what the statistics conv's epilogue computes, for a
    conv output written by another kernel. With ``fold``: (mean, var, rstd, scale), as conv_stats_launch."""
    s = _row_stride(z)
    if s is None:
        raise ValueError("tensor_stats: z's pixels do not collapse to one row stride (make it channels_last)")
    N, C, H, W = z.shape
    M = N * H * W
    if M == 0 or C == 0:
        raise ValueError(f"tensor_stats: empty input {tuple(z.shape)} has no statistics")
    bm, bc, warps = _eltwise_tiles(C)
    T = _cdiv(M, bm)
    n_tiles_c = _cdiv(C, bc)
    psum = torch.empty((T, C), device=z.device, dtype=torch.float32)
    pm2 = torch.empty((T, C), device=z.device, dtype=torch.float32)
    if _skip_launch(z):
        return tuple(psum.sum(0) for _ in range(2 if fold is None else 4))
    _kernel(_tensor_stats_kernel, raw)[lambda meta: (T * n_tiles_c,)](
        z, psum, pm2, M, C, int(s), n_tiles_c, IDX64=_idx64(_max_offset(z)), BLOCK_M=bm, BLOCK_C=bc,
        num_warps=warps, num_stages=1)
    return _stats_from_partials(psum, pm2, M, bm, raw, fold)


def max_pool_backward_launch(x: torch.Tensor, grad: torch.Tensor, k: int, raw: bool = False,
                             extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The input gradient of ``F.max_pool2d(x, k, stride=k)`` (no padding, floor mode) given the output's
    gradient ``grad``, channels_last, in ``grad``'s dtype. Inputs beyond the last whole window (floor mode) get
    zeros. ``extra``: another gradient of x (x's shape, any strides), added as the kernel writes (in fp32)."""
    N, C, H, W = x.shape
    Ho, Wo = H // k, W // k
    if tuple(grad.shape) != (N, C, Ho, Wo):
        raise ValueError(f"max_pool backward: grad {tuple(grad.shape)} is not the pooled shape {(N, C, Ho, Wo)}")
    if extra is not None and tuple(extra.shape) != (N, C, H, W):
        raise ValueError(f"max_pool backward: extra {tuple(extra.shape)} is not the input's shape {(N, C, H, W)}")
    dx = _new_output(N, C, H, W, x.device, grad.dtype)
    if H != Ho * k or W != Wo * k:  # the rows / columns floor mode leaves out get no pooled gradient
        if extra is None:
            dx[:, :, Ho * k:].zero_()
            dx[:, :, :, Wo * k:].zero_()
        else:
            dx[:, :, Ho * k:].copy_(extra[:, :, Ho * k:])
            dx[:, :, :, Wo * k:].copy_(extra[:, :, :, Wo * k:])
    P = N * Ho * Wo
    if P == 0 or C == 0 or _skip_launch(dx):
        return dx
    if max(_max_offset(x), _max_offset(grad), dx.numel(), 0 if extra is None else _max_offset(extra)) >= _I32_LIMIT:
        raise RuntimeError(f"max_pool backward (triton): a {tuple(x.shape)} input exceeds the kernel's 32-bit "
                           "offsets")
    bc = min(64, max(16, _pow2(C)))
    bp = 16 if interpreted() else max(16, POOL_BWD_TILE // bc)
    n_tiles_c = _cdiv(C, bc)
    sdn, _, sdh, sdw = dx.stride()
    e_strides = (0, 0, 0, 0) if extra is None else extra.stride()
    _kernel(_max_pool_bwd_kernel, raw)[lambda meta: (_cdiv(P, bp) * n_tiles_c,)](
        x, grad, dx, grad if extra is None else extra, P, Ho, Wo, C, *x.stride(), *grad.stride(), sdn, sdh, sdw,
        *e_strides, n_tiles_c, K=int(k), HAS_EXTRA=extra is not None, BLOCK_P=bp, BLOCK_C=bc,
        num_warps=WARPS_ELTWISE, num_stages=1)
    return dx


def wgrad_thin_ok(weight_shape: Sequence[int], groups: int) -> bool:
    """Whether :func:`wgrad_thin_launch` takes a conv of this weight: dense, at most WGRAD_MAX_CIN input
    channels, a kernel row's inputs (KW x Cin) and the output channels each within one 64-wide tile. In a DLA
    that is the front: the 7x7 stem on RGB and the two 3x3 convs on its 16 channels, where the pixels are many
    and the channels few."""
    cout, cin, _, kw = weight_shape
    return groups == 1 and cin <= WGRAD_MAX_CIN and kw * cin <= 64 and cout <= 64


def wgrad_thin_launch(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                      padding: Sequence[int], tf32: bool = False, raw: bool = False) -> torch.Tensor:
    """The weight gradient of ``conv2d(x, weight, stride=stride, padding=padding)`` given the output's gradient
    ``dz``, for the convs :func:`wgrad_thin_ok` takes: fp32 accumulation over splits of the output pixels, the
    splits summed in a fixed order; returned like ``weight`` (its dtype and memory format), as ATen's
    convolution_backward returns it. ``dz`` is cast to x's dtype (the MMA's operands share one)."""
    N, Cin, H, W = x.shape
    Cout, cin_w, KH, KW = weight.shape
    if not wgrad_thin_ok(weight.shape, 1) or cin_w != Cin:
        raise ValueError(f"wgrad_thin: weight {tuple(weight.shape)} on a {Cin}-channel input is not a conv it "
                         "takes (see wgrad_thin_ok)")
    (sh, sw), (ph, pw) = stride, padding
    Ho, Wo = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
    if tuple(dz.shape) != (N, Cout, Ho, Wo):
        raise ValueError(f"wgrad_thin: dz {tuple(dz.shape)} is not the conv's output shape {(N, Cout, Ho, Wo)}")
    if N * Ho * Wo == 0:  # no pixels: a zero gradient
        return torch.zeros_like(weight)
    cinp = _wgrad_cin(Cin, KW)
    if cinp != Cin:  # zero channels appended so that a pixel's inputs start on a vector boundary
        x = torch.nn.functional.pad(x.permute(0, 2, 3, 1), (0, cinp - Cin)).permute(0, 3, 1, 2)
    else:
        x = _nhwc(x)
    dz, sdz = _rows(dz.to(x.dtype))
    interp = interpreted()
    kwc = KW * cinp
    bj, bco = max(16, _pow2(kwc)), max(16, _pow2(Cout))
    n_cob = _cdiv(Cout, bco)
    khb = 1 if WGRAD_ROW_PROGRAMS else _pow2(KH)
    n_khb = _cdiv(KH, khb)
    # the x tile is [pixels, khb kernel rows x bj taps]: its pixels shrink as its rows grow (same tile bytes)
    tr, tw = _wgrad_tile(Ho, Wo, 16 if interp else max(16, WGRAD_BLOCK_P // khb))
    n_rb, n_cb = _cdiv(Ho, tr), _cdiv(Wo, tw)
    n_chunks = N * n_rb * n_cb
    per_split = n_khb * n_cob
    target = WGRAD_PROGRAMS_INTERPRETED if interp else WGRAD_PROGRAMS
    chunks = _cdiv(n_chunks, min(n_chunks, _cdiv(target, per_split)))
    splits = _cdiv(n_chunks, chunks)
    # Every slot is written by exactly one program (splits x kernel rows x channel blocks cover it): no memset.
    part = torch.empty((splits, KH, Cout, kwc), device=x.device, dtype=torch.float32)
    if _env.flag("DLA_FAST_TRITON_POISON"):
        part.fill_(float("nan"))
    if not _skip_launch(x):
        sxn, _, sxh, sxw = x.stride()
        _kernel(_wgrad_thin_kernel, raw)[lambda meta: (splits * per_split,)](
            x, dz, part, H, W, Ho, Wo, Cout, KH, sh, sw, ph, pw, sxn, sxh, sxw, sdz, n_rb, n_cb, n_cob, n_khb,
            n_chunks, chunks, CIN=cinp, KWC=kwc, CONTIG=sxw == cinp, IDX64=_idx64(_max_offset(x), _max_offset(dz)),
            PREC=_prec(x.dtype, tf32), RND=_round_tf32(x.dtype, tf32, interp), TILE_R=tr, TILE_W=tw, BLOCK_CO=bco,
            BLOCK_J=bj, KHB=khb, num_warps=WGRAD_WARPS, num_stages=WGRAD_STAGES)
    g = part.sum(0).view(KH, Cout, KW, cinp)[..., :Cin].permute(1, 3, 0, 2)
    return torch.empty_like(weight).copy_(g)


def _wgrad_cin(cin: int, kw: int) -> int:
    """The channels a pixel's inputs take in the thin weight gradient's runs: a few-channel input (RGB) padded to
    the next power of two when WGRAD_PAD_CIN, so that its runs load as vectors, if the padded kernel row still
    fits the 64-wide tile."""
    p = _pow2(cin)
    return p if WGRAD_PAD_CIN and p != cin and kw * p <= 64 else cin


def _wgrad_tile(ho: int, wo: int, block_p: int) -> Tuple[int, int]:
    """(rows, columns) of the thin weight gradient's pixel chunks, ``block_p`` pixels in all: the column count (a
    power of two from 8 up) that pads the output's rows and columns least, the wider on a tie."""
    best = None
    tw = 8
    while tw <= block_p:
        tr = block_p // tw
        waste = _cdiv(ho, tr) * tr * _cdiv(wo, tw) * tw
        if best is None or waste <= best[0]:
            best = (waste, tr, tw)
        tw *= 2
    return best[1], best[2]


def _rows(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``t`` and its pixel stride: as it is when (n, h, w) collapse to one row index with channels at unit
    stride (our own outputs, channel slices of them), else a channels_last copy."""
    s = _row_stride(t)
    if s is None:
        t = t.contiguous(memory_format=torch.channels_last)
        s = _row_stride(t)
    return t, int(s)


def _positive_ints(name: str, text: str, n: int, what: str) -> Tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != n or any(v < 1 or v & (v - 1) for v in vals):
        raise ValueError(f"{name}: {text!r} is not {what} ({n} comma-separated powers of two)")
    return vals


def eltwise_config() -> Tuple[int, int, int]:
    """(elements a program, warps, channels a tile at most) of the elementwise BN kernels: ELTWISE_TILE,
    WARPS_ELTWISE and ELTWISE_MAX_C, or DLA_FAST_TRAIN_ELTWISE="ELEMENTS,WARPS,CHANNELS" (a tuning override)."""
    v = _env.get("DLA_FAST_TRAIN_ELTWISE")
    if v is None:
        return ELTWISE_TILE, WARPS_ELTWISE, ELTWISE_MAX_C
    return _parse_eltwise(v)


@functools.lru_cache(maxsize=8)  # every launch asks; the value changes only with _env.reload()
def _parse_eltwise(v: str) -> Tuple[int, int, int]:
    tile, warps, maxc = _positive_ints("DLA_FAST_TRAIN_ELTWISE", v, 3, "ELEMENTS,WARPS,CHANNELS")
    if warps > 16 or maxc < 16 or tile < maxc:
        raise ValueError(f"DLA_FAST_TRAIN_ELTWISE: {v!r} needs at most 16 warps, at least 16 channels and at least "
                         f"as many elements as channels")
    return tile, warps, maxc


def _eltwise_tiles(C: int) -> Tuple[int, int, int]:
    """(rows, channels, warps) of an elementwise BN kernel's program on a C-channel tensor."""
    tile, warps, maxc = eltwise_config()
    bc = min(maxc, max(16, _pow2(C)))
    bm = 32 if interpreted() else max(16, tile // bc)
    return bm, bc, warps


def agg_stats_launch(children: Sequence[torch.Tensor], weight: torch.Tensor, tf32: bool = False,
                     config: Optional[Dict] = None, raw: bool = False,
                     fold: Optional[BnFold] = None) -> Tuple[torch.Tensor, ...]:
    """(z, mean, var): z = conv1x1(cat(children, 1), weight) channels_last in the children's dtype, without
    the concat, and the fp32 batch mean and biased variance of each of z's channels. ``weight``: [Cout, sum of
    the children's channels] or its 1x1 4-D form; up to MAX_CHILDREN children of one shape (N, *, H, W) and
    dtype, each read in place when its pixels collapse to one row stride (channels_last, channel slices of
    one), else through a channels_last copy. With ``fold``: (z, mean, var, rstd, scale), as conv_stats_launch."""
    children = list(children)
    if not 1 <= len(children) <= MAX_CHILDREN:
        raise ValueError(f"agg_stats (triton) takes 1 to {MAX_CHILDREN} children, got {len(children)}")
    ref = children[0]
    N, _, H, W = ref.shape
    w = weight.reshape(weight.shape[0], -1).contiguous()
    Cout, Ctot = w.shape
    kids, strides = [], []
    for c in children:
        c, s = _rows(c)
        kids.append(c)
        strides.append(s)
    chans = [int(c.shape[1]) for c in kids]
    if sum(chans) != Ctot:
        raise ValueError(f"agg_stats: the children have {sum(chans)} channels but the weight takes {Ctot}")
    M = N * H * W
    if M == 0 or Cout == 0:
        raise ValueError(f"agg_stats: empty output {(N, Cout, H, W)} has no statistics")
    dtype = ref.dtype
    z = _new_output(N, Cout, H, W, ref.device, dtype)
    interp = interpreted()
    cfg = dict(config) if config is not None else train_agg_plan(M, chans, Cout, dtype, tf32)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    T = _cdiv(M, bm)
    psum = torch.empty((T, Cout), device=ref.device, dtype=torch.float32)
    pm2 = torch.empty((T, Cout), device=ref.device, dtype=torch.float32)
    if _skip_launch(z):
        return (z,) + tuple(psum.sum(0) for _ in range(2 if fold is None else 4))
    if M >= _I32_LIMIT:
        raise RuntimeError(f"agg_stats (triton): {M} pixels exceed the kernel's 32-bit row index")
    nc = len(kids)
    ptrs = kids + [kids[0]] * (MAX_CHILDREN - nc)
    cs = chans + [0] * (MAX_CHILDREN - nc)
    ss = strides + [0] * (MAX_CHILDREN - nc)
    n_tiles = _cdiv(Cout, bn)
    _kernel(_agg_stats_kernel, raw)[lambda meta: (T * n_tiles,)](
        *ptrs, *cs, *ss, w, z, psum, pm2, M, Cout, Ctot, n_tiles,
        NUM_CHILDREN=nc, PREC=_prec(dtype, tf32), RND=_round_tf32(dtype, tf32, interp),
        IDX64=_idx64(*[_max_offset(c) for c in kids], z.numel()),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SWAP=bool(cfg.get("SWAP", False)), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return (z, *_stats_from_partials(psum, pm2, M, bm, raw, fold))


def bn_act_launch(z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  residual: Optional[torch.Tensor], relu: bool, out_dtype: torch.dtype,
                  raw: bool = False) -> torch.Tensor:
    """``act((z - mean) * scale + bias + residual)`` (per-channel fp32 mean/scale/bias) into a channels_last
    tensor of ``out_dtype``."""
    z, szm = _rows(z)
    N, C, H, W = z.shape
    y = _new_output(N, C, H, W, z.device, out_dtype)
    M = N * H * W
    if M == 0 or C == 0 or _skip_launch(y):
        return y
    if M >= _I32_LIMIT:
        raise RuntimeError(f"bn_act (triton): {M} pixels exceed the kernel's 32-bit row index")
    bm, bc, warps = _eltwise_tiles(C)
    n_tiles_c = _cdiv(C, bc)
    srn, src, srh, srw = residual.stride() if residual is not None else (0, 0, 0, 0)
    _kernel(_bn_act_kernel, raw)[lambda meta: (_cdiv(M, bm) * n_tiles_c,)](
        z, mean.contiguous(), scale.contiguous(), bias.contiguous(), residual if residual is not None else z, y,
        M, H * W, W, C, szm, srn, src, srh, srw, n_tiles_c,
        HAS_RES=residual is not None, RELU=bool(relu),
        IDX64=_idx64(_max_offset(z), y.numel(), 0 if residual is None else _max_offset(residual)),
        BLOCK_M=bm, BLOCK_C=bc, num_warps=warps, num_stages=1)
    return y


def _reduce_row_tiles(n_row_tiles: int, n_tiles_c: int) -> int:
    """Row tiles a program of BN backward's reduce pass sums: a power of two. The shape alone decides it (not
    the GPU), so the sums come out the same on every card."""
    r = 1
    while r < REDUCE_MAX_ROW_TILES and _cdiv(n_row_tiles, 2 * r) * n_tiles_c >= REDUCE_PROGRAMS:
        r *= 2
    return r


def bn_backward_launch(grad: torch.Tensor, y: Optional[torch.Tensor], z: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, gamma: Optional[torch.Tensor], res_dtype: Optional[torch.dtype],
                       raw: bool = False, relu_coef: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                       row_tiles: Optional[int] = None, res_extra: Optional[torch.Tensor] = None,
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """BatchNorm(train) + optional ReLU backward, from the batch statistics BN normalised with.

    ``grad``: dL/dy in any layout; ``y``: the ReLU's output (only its mask is used), None without a ReLU;
    ``z``: BN's input; ``mean``/``rstd``: fp32 batch mean and 1/sqrt(var + eps); ``gamma``: BN's weight as
    fp32, or None (affine=False). ``relu_coef``: (scale, bias), fp32, of a ReLU with no residual before it,
    whose mask is then recomputed from ``z`` (``y`` must be None). ``row_tiles``: row tiles a reduce program
    sums (default: from the shape, _reduce_row_tiles; tests force it). Returns (dz in z's dtype, dgamma =
    sum(g * xhat), dbeta = sum(g), and the residual's gradient g in ``res_dtype``, or None when ``res_dtype`` is
    None), the sums fp32. ``res_extra``: another gradient of the residual (its other readers'; z's shape, any
    strides), added to the residual's as the last pass writes it (in fp32).
    """
    if relu_coef is not None and y is not None:
        raise ValueError("bn backward: give the ReLU's mask as y or as relu_coef, not both")
    if res_extra is not None and (res_dtype is None or tuple(res_extra.shape) != tuple(z.shape)):
        raise ValueError(f"bn backward: res_extra {tuple(res_extra.shape)} needs res_dtype and z's shape "
                         f"{tuple(z.shape)}")
    z, szm = _rows(z)
    N, C, H, W = z.shape
    M = N * H * W
    dz = _new_output(N, C, H, W, z.device, z.dtype)
    dres = None if res_dtype is None else _new_output(N, C, H, W, z.device, res_dtype)
    bm, bc, warps = _eltwise_tiles(C)
    n_tiles_c = _cdiv(C, bc)
    rt = _reduce_row_tiles(_cdiv(M, bm), n_tiles_c) if row_tiles is None else int(row_tiles)
    if rt < 1:
        raise ValueError(f"bn backward: row_tiles must be >= 1, got {row_tiles}")
    T = _cdiv(M, bm * rt)
    ps = torch.empty((T, C), device=z.device, dtype=torch.float32)
    psx = torch.empty((T, C), device=z.device, dtype=torch.float32)
    if M == 0 or C == 0:
        raise ValueError(f"bn backward: empty input {tuple(z.shape)}")
    if _skip_launch(dz):
        return dz, ps.sum(0), ps.sum(0), dres
    e_strides = (0, 0, 0, 0) if res_extra is None else res_extra.stride()
    if M >= _I32_LIMIT:
        raise RuntimeError(f"bn backward (triton): {M} pixels exceed the kernel's 32-bit row index")
    relu = 1 if y is not None else (2 if relu_coef is not None else 0)
    y, sym = _rows(y) if relu == 1 else (z, szm)
    sc, bi = (t.to(torch.float32).contiguous() for t in relu_coef) if relu == 2 else (mean, mean)
    sgn, sgc, sgh, sgw = grad.stride()
    # The reduce pass's last program runs past M by up to rt tiles: its row numbers must fit too.
    idx64 = _idx64(_max_offset(grad), _max_offset(z), _max_offset(y), dz.numel(), T * rt * bm,
                   0 if res_extra is None else _max_offset(res_extra))
    mean = mean.contiguous()
    _kernel(_bn_bwd_reduce_kernel, raw)[lambda meta: (T * n_tiles_c,)](
        grad, y, z, mean, sc, bi, ps, psx, M, H * W, W, C, sgn, sgc, sgh, sgw, sym, szm, n_tiles_c,
        RELU=relu, IDX64=idx64, BLOCK_M=bm, BLOCK_C=bc, ROW_TILES=rt, num_warps=warps, num_stages=1)
    dbeta, dgamma, k1, k2, k3 = (torch.empty(C, device=z.device, dtype=torch.float32) for _ in range(5))
    fc, fgrid = _finalize_tiles(C)
    tc, n_chunks = _chunks(T, fgrid)
    if n_chunks > 1:
        cs = torch.empty((n_chunks, C), device=z.device, dtype=torch.float32)
        csx = torch.empty_like(cs)
        _kernel(_sum_chunks_kernel, raw)[lambda meta: (n_chunks * fgrid,)](
            ps, psx, cs, csx, T, C, tc, fgrid, BLOCK_T=FINAL_BLOCK_T, BLOCK_C=fc, num_warps=WARPS_ELTWISE,
            num_stages=1)
        ps, psx, T = cs, csx, n_chunks
    rstd = rstd.contiguous()
    _kernel(_bn_bwd_finalize_kernel, raw)[lambda meta: (fgrid,)](
        ps, psx, rstd, gamma.contiguous() if gamma is not None else rstd, dbeta, dgamma, k1, k2, k3, T, C, M,
        HAS_GAMMA=gamma is not None, BLOCK_T=FINAL_BLOCK_T, BLOCK_C=fc, num_warps=WARPS_ELTWISE, num_stages=1)
    _kernel(_bn_bwd_apply_kernel, raw)[lambda meta: (_cdiv(M, bm) * n_tiles_c,)](
        grad, y, z, mean, sc, bi, k1, k2, k3, dz, dres if dres is not None else dz,
        res_extra if res_extra is not None else dz,
        M, H * W, W, C, sgn, sgc, sgh, sgw, sym, szm, *e_strides, n_tiles_c,
        RELU=relu, HAS_DRES=dres is not None, HAS_EXTRA=res_extra is not None, IDX64=idx64, BLOCK_M=bm,
        BLOCK_C=bc, num_warps=warps, num_stages=1)
    return dz, dgamma, dbeta, dres


# ------------------------------------------------------------------------------------------- custom ops
# Registered so that torch.compile sees the kernels (triton_op); under TRITON_INTERPRET as opaque custom ops
# whose fake implementation is the launcher itself (_launch.register_ops).

_SCHEMAS = {
    "conv_stats": ("(Tensor x, Tensor weight, SymInt[] stride, SymInt[] padding, SymInt groups, "
                   "Tensor? norm_mean, Tensor? norm_scale, Tensor? norm_bias, bool norm_relu, bool tf32) "
                   "-> (Tensor, Tensor, Tensor)"),
    "bn_act": ("(Tensor z, Tensor mean, Tensor scale, Tensor bias, Tensor? residual, bool relu, "
               "ScalarType out_dtype) -> Tensor"),
    "agg_stats": "(Tensor[] children, Tensor weight, bool tf32) -> (Tensor, Tensor, Tensor)",
    # The residual's gradient comes back as an empty tensor when res_dtype is None.
    "bn_backward": ("(Tensor grad, Tensor? y, Tensor z, Tensor mean, Tensor rstd, Tensor? gamma, "
                    "ScalarType? res_dtype) -> (Tensor, Tensor, Tensor, Tensor)"),
    "wgrad_thin": "(Tensor dz, Tensor x, Tensor weight, SymInt[] stride, SymInt[] padding, bool tf32) -> Tensor",
}


# Annotated: torch versions whose triton_op infers the schema from the signature (2.11) need the types; the
# inferred schema is the one in _SCHEMAS.
def _conv_stats_op(x: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int], groups: int,
                   norm_mean: Optional[torch.Tensor], norm_scale: Optional[torch.Tensor],
                   norm_bias: Optional[torch.Tensor], norm_relu: bool,
                   tf32: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    norm = None if norm_mean is None else (norm_mean, norm_scale, norm_bias)
    return conv_stats_launch(x, weight, stride, padding, groups, norm, norm_relu, tf32)


def _agg_stats_op(children: List[torch.Tensor], weight: torch.Tensor,
                  tf32: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return agg_stats_launch(children, weight, tf32)


def _bn_act_op(z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
               residual: Optional[torch.Tensor], relu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return bn_act_launch(z, mean, scale, bias, residual, relu, out_dtype)


def _bn_backward_op(grad: torch.Tensor, y: Optional[torch.Tensor], z: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, gamma: Optional[torch.Tensor],
                    res_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dz, dgamma, dbeta, dres = bn_backward_launch(grad, y, z, mean, rstd, gamma, res_dtype)
    return dz, dgamma, dbeta, dres if dres is not None else z.new_empty(0)


def _wgrad_thin_op(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int],
                   tf32: bool) -> torch.Tensor:
    return wgrad_thin_launch(dz, x, weight, stride, padding, tf32)


_IMPLS = {"conv_stats": _conv_stats_op, "agg_stats": _agg_stats_op, "bn_act": _bn_act_op,
          "bn_backward": _bn_backward_op, "wgrad_thin": _wgrad_thin_op}


def _register() -> None:
    register_ops(NAMESPACE, _IMPLS, _SCHEMAS)

_register()

__all__ = ["conv_stats_launch", "agg_stats_launch", "bn_act_launch", "bn_backward_launch", "max_pool_backward_launch",
           "BnFold", "train_conv_kind", "train_conv_plan", "TRAIN_CONV_KINDS", "NAMESPACE"]
