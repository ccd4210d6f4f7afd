"""CPU emulation of the tensor-core kernel (csrc/kernels/igemm_tc.cuh + the host setup in csrc/ops/conv_bn_act.cpp
and csrc/ops/aggregate.cpp), thread by thread, in float64:

    python csrc/tools/emulate_tc.py          # ~1-3 minutes; prints one line per case, "fails 0" at the end

It transliterates the kernel's index arithmetic (row/child tables, k decoding, cp.async / register staging
into the padded shared tiles, ldmatrix addresses, epilogue) and implements ldmatrix.x4 and
mma.m16n8k16.row.col with the fragment layouts of the PTX ISA. It checks that every output is written exactly
once, that no fragment reads uninitialised shared memory, that no gather vector straddles a tap or a child,
and that the result equals the float64 reference. Keep it in step with the CUDA code when either changes.
It cannot find races or hardware-semantics mistakes: those are for the GPU tests and compute-sanitizer.
"""
import sys
import numpy as np
import torch

INT_MAX = 0x7fffffff


class Cfg:
    def __init__(self, BM, BN, WM, WN):
        self.BM, self.BN, self.WM, self.WN = BM, BN, WM, WN
        self.WARPS_M, self.WARPS_N = BM // WM, BN // WN
        self.NT = self.WARPS_M * self.WARPS_N * 32
        self.MF, self.NF = WM // 16, WN // 8
        self.BK = 32
        self.LDS = 40


CFGS = {16: Cfg(128, 16, 32, 16), 32: Cfg(128, 32, 32, 32), 64: Cfg(128, 64, 64, 32), 128: Cfg(128, 128, 64, 32)}


def storage_view(t):
    """flat float64 numpy of t's storage, and t's storage offset"""
    st = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes() // t.element_size(),), (1,))
    return st.double().numpy(), t.storage_offset()


def eff_stride(t, d):
    return 0 if t.size(d) == 1 else t.stride(d)


def as_nhwc(t):
    if t.size(1) == 1 or t.stride(1) == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def nhwc_vw(t, chan_mult):
    es = t.element_size()
    for vw in (8, 4):
        # data_ptr alignment emulated by storage offset (storage itself assumed 256B aligned)
        if chan_mult % vw == 0 and (t.storage_offset() * es) % (vw * es) == 0 and eff_stride(t, 0) % vw == 0 \
                and eff_stride(t, 2) % vw == 0 and eff_stride(t, 3) % vw == 0:
            return vw
    return 1


def pick_bn(cout_g, m, groups, sms=132):
    bn = 16 if cout_g <= 16 else 32 if cout_g <= 32 else 64 if cout_g <= 64 else 128
    if bn == 128:
        blocks = ((m + 127) // 128) * groups * ((cout_g + 127) // 128)
        if blocks < 2 * sms:
            bn = 64
    return bn


def choose_cfg(kind, vw, bn):
    if kind == 0:
        if vw == 8:
            return 16 if bn <= 16 else 32 if bn <= 32 else 64 if bn <= 64 else 128
        if vw == 4:
            return 16 if bn <= 16 else 32 if bn <= 32 else 64
        return 16 if bn <= 16 else 32 if bn <= 32 else 64
    if vw == 8:
        return 32 if bn <= 32 else 64 if bn <= 64 else 128
    return 64


def conv_params(x_in, weight, bias, stride, padding, groups, residual, relu):
    N, C, H, W = x_in.shape
    Cout, Cin_g, kh, kw = weight.shape
    Ho = (H + 2 * padding[0] - kh) // stride[0] + 1
    Wo = (W + 2 * padding[1] - kw) // stride[1] + 1
    x = as_nhwc(x_in)
    w = weight.contiguous(memory_format=torch.channels_last)
    K = kh * kw * Cin_g
    p = dict(src=[x], sn=[eff_stride(x, 0)], sh=[eff_stride(x, 2)], sw=[eff_stride(x, 3)], koff=[0, K], nchild=1,
             N=N, H=H, W=W, Ho=Ho, Wo=Wo, kh=kh, kw=kw, sth=stride[0], stw=stride[1], padh=padding[0],
             padw=padding[1], groups=groups, Cin_g=Cin_g, Cout_g=Cout // groups, Cout=Cout, K=K, M=N * Ho * Wo,
             w=w, bias=None if bias is None else bias.float().contiguous(), relu=relu)
    if residual is not None:
        r = as_nhwc(residual)
        p.update(res=r, rsn=eff_stride(r, 0), rsh=eff_stride(r, 2), rsw=eff_stride(r, 3))
    else:
        p["res"] = None
    if groups == 1 and C < 8 and C % 4 != 0:
        Cp = 4 if C <= 4 else 8
        xt = torch.zeros(N, Cp, H, W, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        xt[:, :C] = x
        wt = torch.zeros(Cout, Cp, kh, kw, dtype=w.dtype).contiguous(memory_format=torch.channels_last)
        wt[:, :C] = w
        K = kh * kw * Cp
        x, w = xt, wt
        p.update(src=[x], sn=[eff_stride(x, 0)], sh=[eff_stride(x, 2)], sw=[eff_stride(x, 3)], Cin_g=Cp, K=K,
                 koff=[0, K], w=w)
        Cin_g = Cp
    G = Cin_g
    if groups > 1 and G in (4, 8) and Cout // groups == G and C % 32 == 0 and not (groups == 1 and C < 8):
        # conv_bn_act.cpp's block-diagonal mode: super-groups of 32 channels, the real weight read in place
        vw = min(nhwc_vw(x, 32), G)
        if vw >= 4:
            p.update(groups=C // 32, Cin_g=32, Cout_g=32, K=kh * kw * 32, koff=[0, kh * kw * 32],
                     bd_log2=2 if G == 4 else 3)
            return p, 0, vw, 32
    vw = nhwc_vw(x, Cin_g)
    wok = lambda v: K % v == 0
    if vw == 8 and not wok(8):
        vw = 4 if wok(4) else 1
    if vw == 4 and not wok(4):
        vw = 1
    bn = pick_bn(p["Cout_g"], p["M"], groups)
    return p, 0, vw, bn


def agg_params(children, weight, bias, residual, relu):
    kids = [as_nhwc(c) for c in children]
    N, _, H, W = kids[0].shape
    ctot = sum(c.shape[1] for c in kids)
    Cout = weight.shape[0]
    koff = [0]
    vw = 8
    for c in kids:
        koff.append(koff[-1] + c.shape[1])
        vw = min(vw, nhwc_vw(c, c.shape[1]))
    p = dict(src=kids, sn=[eff_stride(c, 0) for c in kids], sh=[eff_stride(c, 2) for c in kids],
             sw=[eff_stride(c, 3) for c in kids], koff=koff, nchild=len(kids), N=N, H=H, W=W, Ho=H, Wo=W, kh=1,
             kw=1, sth=1, stw=1, padh=0, padw=0, groups=1, Cin_g=ctot, Cout_g=Cout, Cout=Cout, K=ctot, M=N * H * W,
             w=weight.contiguous(), bias=None if bias is None else bias.float().contiguous(), relu=relu)
    if residual is not None:
        r = as_nhwc(residual)
        p.update(res=r, rsn=eff_stride(r, 0), rsh=eff_stride(r, 2), rsw=eff_stride(r, 3))
    else:
        p["res"] = None
    wok = lambda v: ctot % v == 0
    if vw == 8 and not wok(8):
        vw = 4 if wok(4) else 1
    if vw == 4 and not wok(4):
        vw = 1
    return p, 1, vw, pick_bn(Cout, p["M"], 1)


def run_tc(p, kind, vw, bn, force_bn=None):
    cfgbn = force_bn or choose_cfg(kind, vw, bn)
    cfg = CFGS[cfgbn]
    BM, BN, BK, LDS, NT, MF, NF = cfg.BM, cfg.BN, cfg.BK, cfg.LDS, cfg.NT, cfg.MF, cfg.NF
    STAGES = 3 if vw > 1 else 2
    ntiles_n = (p["Cout_g"] + BN - 1) // BN
    nt = p["groups"] * ntiles_n
    grid = ((p["M"] + BM - 1) // BM) * nt  # 1-D, N tiles fastest (tile_origin)
    srcs = [storage_view(t) for t in p["src"]]
    wst, woff = storage_view(p["w"])
    y = np.full(p["M"] * p["Cout"], np.nan)
    written = np.zeros(p["M"] * p["Cout"], dtype=np.int64)
    res = storage_view(p["res"]) if p["res"] is not None else None
    bias = p["bias"].double().numpy() if p["bias"] is not None else None
    koff_tab = [p["koff"][i] if i < p["nchild"] else INT_MAX for i in range(8)] + [INT_MAX]
    hw = p["Ho"] * p["Wo"]
    KT = (p["K"] + BK - 1) // BK
    # Epilogue::staged_ok (torch allocations are 16-byte aligned, so only offsets and strides matter)
    staged = BN <= 64 and p["Cout"] % 8 == 0 and p["Cout_g"] % 8 == 0 and (
        res is None or (p["rsn"] % 8 == 0 and p["rsh"] % 8 == 0 and p["rsw"] % 8 == 0 and res[1] % 8 == 0))

    def decompose(k, cbase):
        ok = k < p["K"]
        if kind == 0:
            tap = k // p["Cin_g"]
            c = k - tap * p["Cin_g"]
            r = tap // p["kw"]
            s = tap - r * p["kw"]
            return dict(child=0, chan=cbase + c, r=r, s=s, ok=ok)
        i = sum(1 for j in range(1, 8) if k >= koff_tab[j])
        return dict(child=i, chan=k - koff_tab[i], r=0, s=0, ok=ok)

    def a_offset(d, row):
        n, hi0, wi0, valid = row
        hi, wi = hi0 + d["r"], wi0 + d["s"]
        if not (d["ok"] and valid and 0 <= hi < p["H"] and 0 <= wi < p["W"]):
            return -1
        c = d["child"]
        return n * p["sn"][c] + hi * p["sh"][c] + wi * p["sw"][c] + d["chan"]

    for bid in range(grid):
        mt, jn = divmod(bid, nt)
        bm = mt * BM
        g = jn // ntiles_n
        n0 = (jn - g * ntiles_n) * BN
        cbase = g * p["Cin_g"]
        wg_off = g * p["Cout_g"] * p["K"]
        rows = []
        for i in range(BM):
            m = bm + i
            if m < p["M"]:
                n = m // hw
                rem = m - n * hw
                ho = rem // p["Wo"]
                wo = rem - ho * p["Wo"]
                rows.append((n, ho * p["sth"] - p["padh"], wo * p["stw"] - p["padw"], 1))
            else:
                rows.append((0, 0, 0, 0))
        As = np.full((STAGES, BM, LDS), np.nan)
        Bs = np.full((STAGES, BN, LDS), np.nan)
        acc = np.zeros((cfg.WARPS_M * cfg.WARPS_N, 32, MF, NF, 4))

        def compute(stage):
            for warp in range(NT // 32):
                wm, wn = warp % cfg.WARPS_M, warp // cfg.WARPS_M
                for ks in range(BK // 16):
                    af = np.zeros((32, MF, 4, 2))
                    bf = np.zeros((32, NF, 2, 2))
                    for mf in range(MF):
                        addrs = []
                        for lane in range(32):
                            r = wm * cfg.WM + mf * 16 + (lane & 15)
                            c = ks * 16 + (lane >> 4) * 8
                            addrs.append((r, c))
                        regs = ldmatrix_x4(As[stage], addrs)
                        af[:, mf] = regs
                    for nb in range(NF // 2):
                        addrs = []
                        for lane in range(32):
                            r = wn * cfg.WN + nb * 16 + (lane >> 4) * 8 + (lane & 7)
                            c = ks * 16 + ((lane >> 3) & 1) * 8
                            addrs.append((r, c))
                        t4 = ldmatrix_x4(Bs[stage], addrs)
                        bf[:, 2 * nb, 0] = t4[:, 0]
                        bf[:, 2 * nb, 1] = t4[:, 1]
                        bf[:, 2 * nb + 1, 0] = t4[:, 2]
                        bf[:, 2 * nb + 1, 1] = t4[:, 3]
                    for mf in range(MF):
                        for nf in range(NF):
                            acc[warp, :, mf, nf] = mma(acc[warp, :, mf, nf], af[:, mf], bf[:, nf])

        if vw > 1:
            CPR = BK // vw
            A_IT = (BM * CPR + NT - 1) // NT
            B_IT = (BN * CPR + NT - 1) // NT

            carry = {}  # conv: the (tap row, tap column, channel) each thread carries from tile to tile

            def load_stage(stage, kt):
                for tid in range(NT):
                    kc = tid % CPR
                    k = kt * BK + kc * vw
                    d = decompose(k, cbase)
                    st, so = srcs[d["child"]]
                    if kind == 0:
                        if tid not in carry:
                            assert kt == 0, "load_stage must start at tile 0"
                            tap = (kc * vw) // p["Cin_g"]
                            carry[tid] = [tap // p["kw"], tap % p["kw"], kc * vw - tap * p["Cin_g"], 0]
                        cr, cs, cc, kt_next = carry[tid]
                        assert kt_next == kt, "tiles must be loaded in order"
                        if d["ok"]:  # the carried position is the divided-out one
                            assert (cr, cs, cbase + cc) == (d["r"], d["s"], d["chan"]), (cr, cs, cc, d)
                    for i in range(A_IT):
                        e = tid + i * NT
                        if e < BM * CPR:
                            row = e // CPR
                            if kind == 0:
                                n, hi0, wi0, valid = rows[row]
                                ok = d["ok"] and valid and 0 <= hi0 + cr < p["H"] and 0 <= wi0 + cs < p["W"]
                                off = (n * p["sn"][0] + hi0 * p["sh"][0] + wi0 * p["sw"][0] + cbase
                                       + cr * p["sh"][0] + cs * p["sw"][0] + cc) if ok else -1
                                assert off == a_offset(d, rows[row])
                            else:
                                off = a_offset(d, rows[row])
                            if off >= 0:
                                # a vector never straddles a tap/child: check the claim
                                for j in range(vw):
                                    dj = decompose(k + j, cbase)
                                    assert dj["child"] == d["child"] and dj["r"] == d["r"] and dj["s"] == d["s"]
                                As[stage, row, kc * vw:(kc + 1) * vw] = st[so + off: so + off + vw]
                            else:
                                As[stage, row, kc * vw:(kc + 1) * vw] = 0
                    for i in range(B_IT):
                        e = tid + i * NT
                        if e < BN * CPR:
                            row = e // CPR
                            n = n0 + row
                            ok = d["ok"] and n < p["Cout_g"]
                            o = woff + wg_off + n * p["K"] + k
                            bd = p.get("bd_log2", 0)
                            if bd > 0:
                                cl = cc  # the carried position, as the kernel reads it
                                ok = ok and (cl >> bd) == (n >> bd)
                                o = woff + ((((g * p["Cout_g"] + n) * (p["kh"] * p["kw"]) + (cr * p["kw"] + cs)) << bd)
                                            + (cl & ((1 << bd) - 1)))
                                if ok:  # a vector never spans two real groups
                                    assert ((cl + vw - 1) >> bd) == (cl >> bd)
                            if ok:
                                Bs[stage, row, kc * vw:(kc + 1) * vw] = wst[o:o + vw]
                            else:
                                Bs[stage, row, kc * vw:(kc + 1) * vw] = 0
                    if kind == 0:  # advance to the next tile's k
                        cc += BK
                        while cc >= p["Cin_g"]:
                            cc -= p["Cin_g"]
                            cs += 1
                            if cs == p["kw"]:
                                cs, cr = 0, cr + 1
                        carry[tid] = [cr, cs, cc, kt + 1]

            for s in range(STAGES - 1):
                if s < KT:
                    load_stage(s, s)
            for kt in range(KT):
                nk = kt + STAGES - 1
                if nk < KT:
                    assert nk % STAGES != kt % STAGES
                    load_stage(nk % STAGES, nk)
                compute(kt % STAGES)
        else:
            A_IT = (BM * BK + NT - 1) // NT
            B_IT = (BN * BK + NT - 1) // NT
            regs = {}

            def load_regs(kt):
                for tid in range(NT):
                    kk = tid % BK
                    k = kt * BK + kk
                    d = decompose(k, cbase)
                    st, so = srcs[d["child"]]
                    ra, rb = [], []
                    for i in range(A_IT):
                        e = tid + i * NT
                        v = 0.0
                        if e < BM * BK:
                            off = a_offset(d, rows[e // BK])
                            if off >= 0:
                                v = st[so + off]
                        ra.append(v)
                    for i in range(B_IT):
                        e = tid + i * NT
                        v = 0.0
                        if e < BN * BK:
                            row = e // BK
                            if d["ok"] and (n0 + row) < p["Cout_g"]:
                                v = wst[woff + wg_off + (n0 + row) * p["K"] + k]
                        rb.append(v)
                    regs[tid] = (ra, rb)

            def store_regs(stage):
                for tid in range(NT):
                    kk = tid % BK
                    ra, rb = regs[tid]
                    for i in range(A_IT):
                        e = tid + i * NT
                        if e < BM * BK:
                            As[stage, e // BK, kk] = ra[i]
                    for i in range(B_IT):
                        e = tid + i * NT
                        if e < BN * BK:
                            Bs[stage, e // BK, kk] = rb[i]

            load_regs(0)
            store_regs(0)
            for kt in range(KT):
                more = kt + 1 < KT
                if more:
                    load_regs(kt + 1)
                compute(kt & 1)
                if more:
                    store_regs((kt + 1) & 1)

        # epilogue
        if staged:  # Epilogue::store_staged through the fp32 [BM][BN + 8] tile
            LDF = BN + 8
            tile = np.full((BM, LDF), np.nan)
            for warp in range(NT // 32):
                wm, wn = warp % cfg.WARPS_M, warp // cfg.WARPS_M
                for lane in range(32):
                    for mf in range(MF):
                        for h in range(2):
                            r = wm * cfg.WM + mf * 16 + (lane >> 2) + h * 8
                            for nf in range(NF):
                                c = wn * cfg.WN + nf * 8 + (lane & 3) * 2
                                assert np.isnan(tile[r, c:c + 2]).all(), "staged tile element written twice"
                                tile[r, c:c + 2] = acc[warp, lane, mf, nf, 2 * h:2 * h + 2]
            CH, RPP = BN // 8, NT // (BN // 8)
            for tid in range(NT):
                c8 = (tid % CH) * 8
                col = n0 + c8
                if col >= p["Cout_g"]:
                    continue
                assert col + 8 <= p["Cout_g"]
                co = g * p["Cout_g"] + col
                for i in range(BM // RPP):
                    r = tid // CH + i * RPP
                    m = bm + r
                    if m >= p["M"]:
                        break
                    v = tile[r, c8:c8 + 8].copy()
                    assert not np.isnan(v).any(), "staged tile element never written"
                    if bias is not None:
                        v += bias[co:co + 8]
                    if res is not None:
                        rs, ro = res
                        n = m // hw
                        rem = m - n * hw
                        roff = n * p["rsn"] + (rem // p["Wo"]) * p["rsh"] + (rem % p["Wo"]) * p["rsw"]
                        assert (ro + roff + co) % 8 == 0
                        v += rs[ro + roff + co: ro + roff + co + 8]
                    if p["relu"]:
                        v = np.where(v < 0, 0.0, v)
                    yo = m * p["Cout"] + co
                    y[yo:yo + 8] = v
                    written[yo:yo + 8] += 1
            continue
        pair_ok = p["Cout"] % 2 == 0 and p["Cout_g"] % 2 == 0
        for warp in range(NT // 32):
            wm, wn = warp % cfg.WARPS_M, warp // cfg.WARPS_M
            for lane in range(32):
                for mf in range(MF):
                    for h in range(2):
                        m = bm + wm * cfg.WM + mf * 16 + (lane >> 2) + h * 8
                        if m >= p["M"]:
                            continue
                        yoff = m * p["Cout"]
                        if res is not None:
                            n = m // hw
                            rem = m - n * hw
                            ho = rem // p["Wo"]
                            wo = rem - ho * p["Wo"]
                            roff = n * p["rsn"] + ho * p["rsh"] + wo * p["rsw"]
                        for nf in range(NF):
                            col = n0 + wn * cfg.WN + nf * 8 + (lane & 3) * 2
                            if col >= p["Cout_g"]:
                                continue
                            co = g * p["Cout_g"] + col
                            has1 = col + 1 < p["Cout_g"]
                            v = [acc[warp, lane, mf, nf, 2 * h], acc[warp, lane, mf, nf, 2 * h + 1]]
                            if bias is not None:
                                v[0] += bias[co]
                                if has1:
                                    v[1] += bias[co + 1]
                            if res is not None:
                                rs, ro = res
                                v[0] += rs[ro + roff + co]
                                if has1:
                                    v[1] += rs[ro + roff + co + 1]
                            if p["relu"]:
                                v = [0.0 if a < 0 else a for a in v]
                            if pair_ok and has1:
                                assert (yoff + co) % 2 == 0
                            y[yoff + co] = v[0]
                            written[yoff + co] += 1
                            if has1:
                                y[yoff + co + 1] = v[1]
                                written[yoff + co + 1] += 1
    assert (written == 1).all(), f"elements written {np.unique(written, return_counts=True)}"
    out = torch.from_numpy(y.reshape(p["N"], p["Ho"], p["Wo"], p["Cout"])).permute(0, 3, 1, 2)
    return out, cfgbn


def ldmatrix_x4(sm, addrs):
    """sm: [rows][LDS] (16-bit elements as float). addrs[lane] = (row, col) start of 8 elements.
    returns regs[lane][j][2]"""
    out = np.zeros((32, 4, 2))
    for j in range(4):
        mat = np.array([sm[addrs[j * 8 + r][0], addrs[j * 8 + r][1]:addrs[j * 8 + r][1] + 8] for r in range(8)])
        assert addrs[j * 8][1] % 8 == 0
        for t in range(32):
            out[t, j, 0] = mat[t // 4, 2 * (t % 4)]
            out[t, j, 1] = mat[t // 4, 2 * (t % 4) + 1]
    return out


def mma(c, a, b):
    """c: [32][4], a: [32][4][2], b: [32][2][2] -> d [32][4]  (PTX m16n8k16 .row.col fragment layouts)"""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    C = np.full((16, 8), np.nan)
    for t in range(32):
        g, q = t >> 2, t % 4
        for e in range(2):
            A[g, 2 * q + e] = a[t, 0, e]
            A[g + 8, 2 * q + e] = a[t, 1, e]
            A[g, 2 * q + 8 + e] = a[t, 2, e]
            A[g + 8, 2 * q + 8 + e] = a[t, 3, e]
            B[2 * q + e, g] = b[t, 0, e]
            B[2 * q + 8 + e, g] = b[t, 1, e]
            C[g, 2 * q + e] = c[t, e]
            C[g + 8, 2 * q + e] = c[t, 2 + e]
    assert not np.isnan(A).any() and not np.isnan(B).any(), "fragment reads uninitialised smem"
    D = A @ B + C
    d = np.zeros((32, 4))
    for t in range(32):
        g, q = t >> 2, t % 4
        for e in range(2):
            d[t, e] = D[g, 2 * q + e]
            d[t, 2 + e] = D[g + 8, 2 * q + e]
    return d


# ----------------------------------------------------------------------------------------------- driver
import os
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dla_fast.ops.reference import aggregate_ref, conv_bn_act_ref  # noqa: E402

def half(t): return t.half().double()

def check_conv(case, lay='cl', res=True, relu=True, force_bn=None, force_vw=None):
    n, c, h, w, co, k, s, pd, g = case
    x = half(torch.randn(n, c, h, w))
    wt = half(torch.randn(co, c // g, k, k) / ((c//g)*k*k) ** .5)
    b = torch.randn(co) * .1
    ho, wo = (h + 2*pd - k)//s + 1, (w + 2*pd - k)//s + 1
    r = half(torch.randn(n, co, ho, wo)) if res else None
    ref = conv_bn_act_ref(x, wt, b.double(), (s,s), (pd,pd), g, r, relu)
    if lay == 'cl': xl = x.contiguous(memory_format=torch.channels_last)
    elif lay == 'slice':
        big = torch.zeros(n, c+12, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last); big[:, 4:4+c] = x; xl = big[:, 4:4+c]
    else: xl = x
    p, kind, vw, bn = conv_params(xl, wt, b, (s,s), (pd,pd), g, r, relu)
    if force_vw: vw = force_vw
    y, used = run_tc(p, kind, vw, bn, force_bn)
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    return err, vw, used

def check_agg(chans, co, h, w, res_kind='tensor', relu=True, lay='cl', force_bn=None, force_vw=None):
    n = 2
    kids = [half(torch.randn(n, c, h, w)) for c in chans]
    wt = half(torch.randn(co, sum(chans)) / sum(chans)**.5)
    b = torch.randn(co)*.1
    r = kids[0] if res_kind == 'child0' else half(torch.randn(n, co, h, w)) if res_kind == 'tensor' else None
    ref = aggregate_ref(kids, wt, b.double(), r, relu)
    kl = []
    for i, kd in enumerate(kids):
        if lay == 'slice' and i % 2 == 0:
            big = torch.zeros(n, kd.shape[1]+12, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last); big[:, 4:4+kd.shape[1]] = kd; kl.append(big[:, 4:4+kd.shape[1]])
        elif lay == 'nchw': kl.append(kd)
        else: kl.append(kd.contiguous(memory_format=torch.channels_last))
    p, kind, vw, bn = agg_params(kl, wt, b, r, relu)
    if force_vw: vw = force_vw
    y, used = run_tc(p, kind, vw, bn, force_bn)
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    return err, vw, used

def main():
    torch.manual_seed(0)
    CONV = [
        (2, 16, 9, 11, 32, 3, 1, 1, 1), (1, 3, 15, 17, 16, 7, 1, 3, 1), (1, 3, 12, 11, 32, 7, 2, 3, 1),
        (1, 20, 7, 9, 24, 3, 2, 1, 1), (2, 12, 6, 6, 20, 1, 1, 0, 1), (2, 13, 5, 7, 19, 3, 1, 1, 1),
        (1, 64, 5, 6, 128, 1, 1, 0, 1), (1, 64, 7, 7, 64, 3, 2, 1, 1), (1, 200, 3, 5, 300, 1, 1, 0, 1),
        (1, 256, 5, 5, 256, 3, 1, 1, 8), (2, 64, 6, 6, 64, 3, 1, 1, 4), (1, 48, 1, 1, 40, 3, 1, 1, 1),
        (2, 32, 5, 5, 32, 3, 1, 1, 8), (2, 5, 6, 7, 24, 3, 1, 1, 1), (1, 1, 9, 9, 16, 3, 2, 1, 1),
        # block-diagonal mode (4 / 8 channels a group, super-groups of 32)
        (2, 64, 7, 6, 64, 3, 1, 1, 16), (1, 128, 9, 7, 128, 3, 2, 1, 16), (2, 64, 6, 5, 64, 3, 1, 1, 8),
    ]
    t0 = time.time()
    fails = 0
    for case in CONV:
        for lay in ('cl', 'slice', 'nchw'):
            err, vw, used = check_conv(case, lay)
            ok = err < 1e-9
            fails += not ok
            print(f"{'ok ' if ok else 'BAD'} conv {case} {lay:5s} vw{vw} bn{used} err {err:.2e}", flush=True)
    # every config x vw on a couple of shapes
    for case in [(2, 16, 9, 11, 40, 3, 2, 1, 1), (1, 24, 6, 7, 140, 1, 1, 0, 1)]:
        for vw in (8, 4, 1):
            for bnf in (16, 32, 64, 128):
                if vw == 4 and bnf in (16, 128): continue
                if vw == 1 and bnf == 128: continue
                err, _, used = check_conv(case, 'cl', True, False, force_bn=bnf, force_vw=vw)
                ok = err < 1e-9; fails += not ok
                print(f"{'ok ' if ok else 'BAD'} conv {case} forced vw{vw} bn{used} err {err:.2e}", flush=True)
    AGG = [((64,), 64, 7, 9), ((64, 64), 64, 9, 7), ((128, 128, 64, 128), 128, 3, 5), ((28, 28, 28, 28), 128, 6, 7),
           ((13, 7, 20), 24, 5, 3), ((8,)*8, 16, 4, 4), ((16, 48, 8), 300, 3, 5)]
    for chans, co, h, w in AGG:
        for lay in ('cl', 'slice', 'nchw'):
            for rk in ('tensor', 'child0', 'none'):
                if rk == 'child0' and chans[0] != co: continue
                err, vw, used = check_agg(chans, co, h, w, rk, rk != 'none', lay)
                ok = err < 1e-9; fails += not ok
                print(f"{'ok ' if ok else 'BAD'} agg {chans}->{co} {lay} {rk} vw{vw} bn{used} err {err:.2e}", flush=True)
    for vw, bnf in [(8, 32), (8, 64), (8, 128), (4, 64), (1, 64)]:
        err, _, used = check_agg((16, 32, 24), 72, 5, 5, 'tensor', True, 'cl', force_bn=bnf, force_vw=vw)
        ok = err < 1e-9; fails += not ok
        print(f"{'ok ' if ok else 'BAD'} agg forced vw{vw} bn{used} err {err:.2e}", flush=True)
    print("fails", fails, "time", time.time()-t0)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
