"""Triton kernels for the fused inference ops (see NOTES_triton.md for the design).

All activations are NHWC in memory (channel stride 1); the output is channels_last-contiguous, so output
element (m, co) with m = (n * Ho + oh) * Wo + ow lives at ``m * Cout + co``. Accumulation is fp32, and the
epilogue (bias, residual, ReLU, cast) runs on the accumulator so the output is written exactly once.
"""
import triton
import triton.language as tl


@triton.jit
def tf32_round(x):
    """fp32 -> the nearest TF32 value (ties away from zero, as cvt.rna.tf32.f32), kept in fp32.

    Fed raw fp32, the tensor cores' TF32 mode drops the low 13 mantissa bits: truncation, biased towards
    zero. Over the 30-150 convolutions of a DLA that bias compounds, and the network's fp32 output came out
    2.2-6.5x further from float64 than cuDNN's (which rounds) on the H100. Rounding first
    makes the hardware's truncation exact. Integer ops rather than inline PTX so the interpreter runs it too.
    """
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x1000) & 0xFFFFE000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, RND: tl.constexpr):
    if RND:
        a = tf32_round(a)
        b = tf32_round(b)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """The fp32 accumulator of a [BLOCK_M pixels, BLOCK_N channels] tile, [BLOCK_N, BLOCK_M] with SWAP
    (:func:`_mma_into`)."""
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def _mma_into(a, b, acc, PREC: tl.constexpr, RND: tl.constexpr, SWAP: tl.constexpr):
    """acc += a @ b, or with SWAP the transposed product acc += b^T @ a^T (acc is then [BLOCK_N, BLOCK_M])."""
    if SWAP:
        out = _mma(tl.trans(b), tl.trans(a), acc, PREC, RND)
    else:  # (one return after the branches: Triton type-checks a return that follows a constexpr if's return)
        out = _mma(a, b, acc, PREC, RND)
    return out


@triton.jit
def _epilogue(acc, rows, cols, row_ok, col_ok, img, oh, ow,
              b_ptr, r_ptr, y_ptr, Cout, srn, src, srh, srw,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
        acc = acc + bias[None, :]
    if HAS_RES:
        # Residuals come in any layout, so they are addressed through all four strides; for the usual
        # channels_last residual src == 1 (Triton specialises it) and the load is as coalesced as the store.
        r_off = (img * srn + oh * srh + ow * srw)[:, None] + (cols * src)[None, :]
        res = tl.load(r_ptr + r_off, mask=mask, other=0.0)
        acc = acc + res.to(tl.float32)
    if RELU:
        # where(acc < 0) rather than maximum() so that a NaN propagates the way torch.relu does.
        acc = tl.where(acc < 0.0, 0.0, acc)
    y_off = rows[:, None] * Cout + cols[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_in(a, ch, ch_ok, ok, mu_ptr, sc_ptr, bi_ptr, RELU: tl.constexpr):
    """The previous layer's BN (+ReLU) applied to a loaded input tile ``a`` whose columns are channels ``ch``
    (the training conv's prologue, see ``_conv_tile``); elements outside ``ok`` (the conv's zero padding,
    channel tails) stay exactly zero, as they are zeros of the normalised tensor, not of the raw one."""
    mu = tl.load(mu_ptr + ch, mask=ch_ok, other=0.0)
    sc = tl.load(sc_ptr + ch, mask=ch_ok, other=0.0)
    bi = tl.load(bi_ptr + ch, mask=ch_ok, other=0.0)
    v = (a.to(tl.float32) - mu[None, :]) * sc[None, :] + bi[None, :]
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)
    return tl.where(ok, v, 0.0).to(a.dtype)


@triton.jit
def _tile_coords(pid_m, pid_n, M, Ho, Wo, Cout_g, Cout, tiles_per_group,
                 MODE: tl.constexpr, GB: tl.constexpr, FULL: tl.constexpr, IDX64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Output tile (pid_m, pid_n) of a conv: ``(rows, row_ok, img, oh, ow, cols, col_ok)``, the output pixels
    (rows of the [M, Cout] matrix, and their image / output row / column) and channels it covers, for the K walk
    of ``MODE`` (see ``_conv_gemm_kernel``).

    Computed from integers only, outside ``_conv_tile`` (which takes the pixels from it): the kernels address
    their stores with it. torch's analysis of which kernel arguments a launch writes (what torch.compile clones
    around a traced launch) follows a store's address back through a call's results to every argument of the
    call: addresses coming out of the tile body would count the input and the weights as written."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        rows = rows.to(tl.int64)
    row_ok = rows < M
    hw = Ho * Wo
    img = rows // hw
    pix = rows % hw
    oh = pix // Wo
    ow = pix % Wo
    jj = tl.arange(0, BLOCK_N)
    if MODE == 2:
        if FULL:
            cols = pid_n * BLOCK_N + jj
            col_ok = jj < BLOCK_N
        else:
            cols = pid_n * (GB * Cout_g) + jj
            col_ok = (jj < GB * Cout_g) & (cols < Cout)
    else:
        jn = (pid_n % tiles_per_group) * BLOCK_N + jj
        col_ok = jn < Cout_g
        cols = (pid_n // tiles_per_group) * Cout_g + jn
    return rows, row_ok, img, oh, ow, cols, col_ok


@triton.jit
def _conv_tile(
    x_ptr, w_ptr, mu_ptr, sc_ptr, bi_ptr, pid_n, row_ok, img, oh, ow, cols, col_ok,
    H, W, Cin, Cin_g, Cout_g,
    sxn, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w,
    tiles_per_group,
    KH: tl.constexpr, KW: tl.constexpr,
    MODE: tl.constexpr, GB: tl.constexpr, FULL: tl.constexpr, PAD: tl.constexpr,
    NORM: tl.constexpr, NORM_RELU: tl.constexpr,
    PREC: tl.constexpr, RND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    SWAP: tl.constexpr,
):
    """The implicit-GEMM body of a convolution tile, shared by the inference ``_conv_gemm_kernel`` and the
    training ``_conv_stats_kernel``: the fp32 accumulator of the output tile whose pixels (``row_ok``, ``img``,
    ``oh``, ``ow``) and channels (``cols``, ``col_ok``) the kernel took from ``_tile_coords`` for column tile
    ``pid_n``: [BLOCK_M pixels, BLOCK_N channels], or with SWAP its transpose, the channels as the MMA's rows
    (a reduction over the pixels then stays inside each warp: the statistics conv's epilogue).

    The K walks (MODE 0, 1, 2) and split-K (SPLIT) are described at ``_conv_gemm_kernel``. NORM applies
    ``_norm_in`` (BN with the statistics at mu/sc/bi_ptr, ReLU with NORM_RELU) to each A tile as it is loaded;
    without it mu/sc/bi_ptr are never read and the code is that of a plain conv.
    """
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # May point before the image for padded rows; such lanes are masked and never dereferenced.
    x_row = img * sxn + ih0 * sxh + iw0 * sxw

    jj = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    KTOT = KH * KW * Cin_g  # one weight row: [kh, kw, Cin_g] contiguous

    acc = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    if MODE == 2:
        gi = kk // Cin_g
        ci = kk % Cin_g
        gj = jj // Cout_g
        if FULL:
            # Tiles hold exactly GB groups and GB divides groups: no tails, and writing the channel
            # offsets as multiples of the block sizes tells the compiler they are aligned (16-byte
            # vector loads, cp.async).
            cin0 = pid_n * BLOCK_K
            k_ok = kk < BLOCK_K
            b_mask = gi[:, None] == gj[None, :]
        else:
            cin0 = (pid_n * (GB * Cout_g) // Cout_g) * Cin_g
            k_ok = (kk < GB * Cin_g) & (cin0 + kk < Cin)
            b_mask = (gi[:, None] == gj[None, :]) & k_ok[:, None] & col_ok[None, :]
        b_off = cols[None, :] * KTOT + ci[:, None]
        for tap in range(KH * KW):
            r = tap // KW
            s = tap % KW
            a_ok = row_ok
            if PAD:
                ih = ih0 + r
                iw = iw0 + s
                a_ok = a_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_ptr + (x_row + r * sxh + s * sxw)[:, None] + (cin0 + kk)[None, :]
            if FULL:
                ok = a_ok[:, None]
            else:
                ok = a_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptrs, mask=ok, other=0.0)
            if NORM:
                a = _norm_in(a, cin0 + kk, k_ok, ok, mu_ptr, sc_ptr, bi_ptr, NORM_RELU)
            b = tl.load(w_ptr + b_off + tap * Cin_g, mask=b_mask, other=0.0)
            acc = _mma_into(a, b, acc, PREC, RND, SWAP)
    else:
        cin0 = (pid_n // tiles_per_group) * Cin_g
        w_row = cols * KTOT
        if MODE == 1:
            kwc = KW * Cin_g
            for k0 in range(0, KTOT, BLOCK_K):
                k = k0 + kk
                k_ok = k < KTOT
                r = k // kwc
                rem = k % kwc
                s = rem // Cin_g
                c = rem % Cin_g
                a_ok = row_ok[:, None] & k_ok[None, :]
                if PAD:
                    ih = ih0[:, None] + r[None, :]
                    iw = iw0[:, None] + s[None, :]
                    a_ok = a_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_ptrs = x_ptr + x_row[:, None] + (r * sxh + s * sxw + cin0 + c)[None, :]
                a = tl.load(a_ptrs, mask=a_ok, other=0.0)
                if NORM:
                    a = _norm_in(a, cin0 + c, k_ok, a_ok, mu_ptr, sc_ptr, bi_ptr, NORM_RELU)
                b = tl.load(w_ptr + w_row[None, :] + k[:, None],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = _mma_into(a, b, acc, PREC, RND, SWAP)
        else:
            # One flat loop over (tap, chunk) rather than nested loops so the software pipeliner
            # overlaps loads across taps too (with Cin_g <= BLOCK_K a tap is a single iteration).
            n_cb = tl.cdiv(Cin_g, BLOCK_K)
            if SPLIT == 1:
                it_lo = 0
                it_hi = KH * KW * n_cb
            else:
                per = tl.cdiv(KH * KW * n_cb, SPLIT)
                it_lo = tl.program_id(1) * per
                it_hi = tl.minimum(it_lo + per, KH * KW * n_cb)
            for it in range(it_lo, it_hi):
                tap = it // n_cb
                c = (it % n_cb) * BLOCK_K + kk
                r = tap // KW
                s = tap % KW
                a_ok = row_ok
                if PAD:
                    ih = ih0 + r
                    iw = iw0 + s
                    a_ok = a_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                c_ok = c < Cin_g
                a_ptrs = x_ptr + (x_row + r * sxh + s * sxw)[:, None] + (cin0 + c)[None, :]
                ok = a_ok[:, None] & c_ok[None, :]
                a = tl.load(a_ptrs, mask=ok, other=0.0)
                if NORM:
                    a = _norm_in(a, cin0 + c, c_ok, ok, mu_ptr, sc_ptr, bi_ptr, NORM_RELU)
                b = tl.load(w_ptr + w_row[None, :] + (tap * Cin_g + c)[:, None],
                            mask=c_ok[:, None] & col_ok[None, :], other=0.0)
                acc = _mma_into(a, b, acc, PREC, RND, SWAP)
    return acc


@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, H, W, Ho, Wo, Cin, Cin_g, Cout_g, Cout,
    sxn, sxh, sxw, srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w,
    n_tiles_n, tiles_per_group,
    KH: tl.constexpr, KW: tl.constexpr,
    MODE: tl.constexpr, GB: tl.constexpr, FULL: tl.constexpr, PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    PREC: tl.constexpr, RND: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    REDUCE: tl.constexpr,
):
    """Implicit-GEMM convolution on tensor cores: rows = output pixels, columns = output channels.

    MODE 0 (tap-major): the K loop walks (tap, channel chunk); each A tile is BLOCK_M pixels x BLOCK_K
        contiguous input channels of one tap, so the only masks are per-row borders and the channel tail.
    MODE 1 (flat K): K = (r, s, c) flattened, for few input channels per group (the 3-channel stem): a tap
        holds too few channels to fill BLOCK_K, but (s, c) is contiguous in NHWC, so flattening wastes
        almost nothing.
    MODE 2 (block-diagonal): grouped conv with few channels per group. A tile covers GB whole groups; its
        B tile is the block-diagonal [GB*Cin_g, GB*Cout_g] weight with zeros off the diagonal blocks. That
        multiplies zeros, but tensor cores at GB-fold waste still beat CUDA cores and the A loads stay plain
        contiguous channel runs.
    Modes 0 and 1 handle groups through the N-tile index (tiles never straddle a group).

    SPLIT > 1 (mode 0 only): split-K. Program (tile, program_id(1)) sums its share of the K iterations and
    stores the fp32 partial to ``ws_ptr`` (SPLIT slices of [M, Cout]); ``_splitk_epilogue_kernel`` adds
    them up and applies the epilogue, or with REDUCE the tile's last program to finish does (see ``_finish``).
    For grids that cannot fill the GPU (batch 1, 7x7 and 14x14 maps) where a few programs would otherwise walk
    K = 9 x 512 alone.
    """
    pid = tl.program_id(0)
    # Output-channel tiles vary fastest so that the few programs sharing one A (activation) tile run
    # together and hit L2 for it.
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    # mu/sc/bi_ptr are x_ptr: never read without NORM.
    rows, row_ok, img, oh, ow, cols, col_ok = _tile_coords(pid_m, pid_n, M, Ho, Wo, Cout_g, Cout, tiles_per_group,
                                                           MODE, GB, FULL, IDX64, BLOCK_M, BLOCK_N)
    acc = _conv_tile(
        x_ptr, w_ptr, x_ptr, x_ptr, x_ptr, pid_n, row_ok, img, oh, ow, cols, col_ok,
        H, W, Cin, Cin_g, Cout_g, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
        tiles_per_group, KH, KW, MODE, GB, FULL, PAD, False, False, PREC, RND,
        BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, False)
    _finish(acc, rows, cols, row_ok, col_ok, img, oh, ow, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, Cout,
            srn, src, srh, srw, HAS_BIAS, HAS_RES, RELU, SPLIT, REDUCE)


@triton.jit
def _finish(acc, rows, cols, row_ok, col_ok, img, oh, ow, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, Cout,
            srn, src, srh, srw, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
            SPLIT: tl.constexpr, REDUCE: tl.constexpr):
    """The epilogue, or under split-K this program's fp32 partial sum into slice program_id(1) of the
    workspace (only used for grids too small to fill the GPU, so M * Cout * SPLIT is far below 2^31).

    REDUCE: the tile's last program to finish sums the SPLIT partials and runs the epilogue itself, so no
    second kernel is launched. ``cnt_ptr`` holds one zeroed int32 per tile (program_id(0)); each program
    counts itself in after its partial is stored (the barrier makes every thread's stores precede the
    count; the atomic is acquire-release at GPU scope, so the program that reads SPLIT - 1 sees all the
    partials), and that last program sets the count back to zero for the next launch. No program waits for
    another, so the grid needs no co-residency. The partials are summed in slice order, as the epilogue kernel
    sums them: both give the same bits whichever program comes last."""
    if SPLIT == 1:
        _epilogue(acc, rows, cols, row_ok, col_ok, img, oh, ow, b_ptr, r_ptr, y_ptr, Cout,
                  srn, src, srh, srw, HAS_BIAS, HAS_RES, RELU)
    else:
        off = rows[:, None] * Cout + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(ws_ptr + tl.program_id(1) * M * Cout + off, acc, mask=mask)
        if REDUCE:
            tl.debug_barrier()
            tile = tl.program_id(0)
            done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT - 1:
                # .cg: the partials come from L2, never from lines this SM's L1 may hold
                total = tl.load(ws_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
                for s in range(1, SPLIT):
                    total += tl.load(ws_ptr + s * M * Cout + off, mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
                _epilogue(total, rows, cols, row_ok, col_ok, img, oh, ow, b_ptr, r_ptr, y_ptr, Cout,
                          srn, src, srh, srw, HAS_BIAS, HAS_RES, RELU)


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, b_ptr, r_ptr, y_ptr,
    M, HW, W, Cout,
    srn, src, srh, srw,
    n_tiles_n,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Second half of a split-K launch: the sum of the SPLIT fp32 partials, then the usual epilogue."""
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < Cout
    mask = row_ok[:, None] & col_ok[None, :]
    off = rows[:, None] * Cout + cols[None, :]
    acc = tl.load(ws_ptr + off, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(ws_ptr + s * M * Cout + off, mask=mask, other=0.0)
    img = rows // HW
    pix = rows % HW
    oh = pix // W
    ow = pix % W
    _epilogue(acc, rows, cols, row_ok, col_ok, img, oh, ow, b_ptr, r_ptr, y_ptr, Cout,
              srn, src, srh, srw, HAS_BIAS, HAS_RES, RELU)


@triton.jit
def _conv_direct_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, H, W, Ho, Wo, Cin_g, Cout_g, Cout, groups,
    sxn, sxh, sxw, srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w,
    n_tiles_n, co_tiles,
    KH: tl.constexpr, KW: tl.constexpr, PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, GB: tl.constexpr, COG: tl.constexpr,
):
    """Direct grouped convolution on CUDA cores (fp32 FMA), for grouped convs where tensor cores do not
    apply (IEEE fp32) or do not pay. A program owns BLOCK_M pixels x GB groups x COG channels of each
    group. The accumulator is 3-D so that one loaded input value x[m, g, ci] is reused for all COG output
    channels of its group from registers instead of being gathered once per output channel.
    """
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    gt = pid_n // co_tiles
    ct = pid_n % co_tiles

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        rows = rows.to(tl.int64)
    row_ok = rows < M
    hw = Ho * Wo
    img = rows // hw
    pix = rows % hw
    oh = pix // Wo
    ow = pix % Wo
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = img * sxn + ih0 * sxh + iw0 * sxw

    g = gt * GB + tl.arange(0, GB)
    co = ct * COG + tl.arange(0, COG)
    g_ok = g < groups
    cols2 = g[:, None] * Cout_g + co[None, :]                 # [GB, COG]
    col_ok2 = g_ok[:, None] & (co < Cout_g)[None, :]
    KTOT = KH * KW * Cin_g
    w_base = cols2 * KTOT
    x_ch = g * Cin_g

    acc = tl.zeros((BLOCK_M, GB, COG), dtype=tl.float32)
    for tap in range(KH * KW):
        r = tap // KW
        s = tap % KW
        a_ok = row_ok
        if PAD:
            ih = ih0 + r
            iw = iw0 + s
            a_ok = a_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xr = x_row + r * sxh + s * sxw
        x_ptrs = x_ptr + xr[:, None] + x_ch[None, :]           # [BLOCK_M, GB]
        x_mask = a_ok[:, None] & g_ok[None, :]
        w_ptrs = w_ptr + w_base + tap * Cin_g
        for ci in range(Cin_g):
            xv = tl.load(x_ptrs + ci, mask=x_mask, other=0.0).to(tl.float32)
            wv = tl.load(w_ptrs + ci, mask=col_ok2, other=0.0).to(tl.float32)
            acc += xv[:, :, None] * wv[None, :, :]

    acc2 = tl.reshape(acc, (BLOCK_M, GB * COG))
    cols = tl.reshape(cols2, (GB * COG,))
    col_ok = tl.reshape(col_ok2, (GB * COG,))
    _epilogue(acc2, rows, cols, row_ok, col_ok, img, oh, ow, b_ptr, r_ptr, y_ptr, Cout,
              srn, src, srh, srw, HAS_BIAS, HAS_RES, RELU)


@triton.jit
def _child_select(t, T, K, base, C, S, ts, kb, p_i, C_i, S_i):
    """Walks one child boundary: returns the running (T, K) totals past child i and, if iteration t has
    reached child i, its (pointer, channels, row stride, first iteration, first weight column)."""
    sel = t >= T
    base = tl.where(sel, p_i, base)
    C = tl.where(sel, C_i, C)
    S = tl.where(sel, S_i, S)
    ts = tl.where(sel, T, ts)
    kb = tl.where(sel, K, kb)
    return base, C, S, ts, kb


@triton.jit
def _aggregate_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7,
    C0, C1, C2, C3, C4, C5, C6, C7,
    S0, S1, S2, S3, S4, S5, S6, S7,
    w_ptr, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, HW, W, Cout, Ctot,
    srn, src, srh, srw,
    n_tiles_n,
    NUM_CHILDREN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    PREC: tl.constexpr, RND: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    REDUCE: tl.constexpr,
):
    """relu(cat(children) @ W^T + b + residual) without the concat: one flat K loop over all children's
    channel chunks; each iteration picks its child's pointer with scalar selects. A flat loop (rather than
    one loop per child) keeps the software pipeline full across child boundaries; roots have 2-7 children
    of 64-1024 channels, i.e. only a few chunks each.

    Child i is read at ``p_i + m * S_i + c`` (S_i = its pixel stride, which is C_i for a contiguous
    channels_last tensor and larger for a channel slice of a wider one). SPLIT > 1: split-K (and REDUCE), as
    in ``_conv_gemm_kernel``.
    """
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        rows = rows.to(tl.int64)
    row_ok = rows < M
    img = rows // HW
    pix = rows % HW
    oh = pix // W
    ow = pix % W
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

    if SPLIT == 1:
        t_lo = 0
        t_hi = total
    else:
        per = tl.cdiv(total, SPLIT)
        t_lo = tl.program_id(1) * per
        t_hi = tl.minimum(t_lo + per, total)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_lo, t_hi):
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
        acc = _mma(a, b, acc, PREC, RND)

    _finish(acc, rows, cols, row_ok, col_ok, img, oh, ow, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, Cout,
            srn, src, srh, srw, HAS_BIAS, HAS_RES, RELU, SPLIT, REDUCE)


@triton.jit
def _pool_tile(n_tiles_c, P, Ho, Wo, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a pooled output, BLOCK_P output pixels (tiles major) x BLOCK_C channels: ``(p, c,
    mask, img, oh, ow)``, the pixels' flat index, the channels, what is in bounds, and each pixel's image, output
    row and column (the max pool's forward and backward kernels)."""
    pid = tl.program_id(0)
    pid_p = pid // n_tiles_c
    pid_c = pid % n_tiles_c
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < P)[:, None] & (c < C)[None, :]
    hw = Ho * Wo
    img = p // hw
    pix = p % hw
    return p, c, mask, img, pix // Wo, pix % Wo


@triton.jit
def _max_pool_kernel(
    x_ptr, y_ptr,
    P, H, W, Ho, Wo, C,
    sxn, sxc, sxh, sxw,
    n_tiles_c,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """K x K max pooling with stride K and no padding (the DLA trees' downsampling) of an NHWC-addressable
    input into a channels_last output: BLOCK_P output pixels x BLOCK_C channels per program. NaN wins, as in
    torch's max_pool2d."""
    p, c, mask, img, oh, ow = _pool_tile(n_tiles_c, P, Ho, Wo, C, BLOCK_P, BLOCK_C)
    base = img * sxn + (oh * K) * sxh + (ow * K) * sxw
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    for t in range(K * K):
        r = t // K
        s = t % K
        v = tl.load(x_ptr + (base + r * sxh + s * sxw)[:, None] + (c * sxc)[None, :], mask=mask,
                    other=float("-inf"))
        best = tl.maximum(best, v.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + p[:, None] * C + c[None, :], best.to(y_ptr.dtype.element_ty), mask=mask)
