// Tensor-core implicit GEMM for fp16/bf16 (mma.sync.m16n8k16, fp32 accumulation), used by both ops.
//
//   C[m][n] = sum_k A[m][k] * B[n][k]       m: output pixel (N*Ho*Wo), n: output channel, k: reduction
//
// A is gathered on the fly (KIND_CONV: kh x kw taps of one NHWC tensor; KIND_CAT: the children one after
// another), B is the weight in its channels_last order [Cout][K] -- both K-contiguous, which is exactly the
// "row.col" operand layout of mma.sync, so ldmatrix (non-transposed) feeds both.
//
// VW > 1: every thread copies VW-element vectors with cp.async, STAGES=3 deep; zero fill for the halo/tails.
// VW == 1: unaligned shapes (stem Cin=3, odd channel counts) load scalars into registers one tile ahead
// and store them to shared memory after the current tile's MMAs (2 buffers).
#pragma once

#include "kernels/common.cuh"

namespace dla_fast {

template <int BM_, int BN_, int WM_, int WN_>
struct TcCfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int NT = WARPS_M * WARPS_N * 32;
  static constexpr int MF = WM / 16, NF = WN / 8;
  static constexpr int BK = 32;
  static constexpr int LDS = BK + 8;  // +16 bytes per row: the 8 row addresses of an ldmatrix phase
                                      // then fall on 8 distinct 16-byte bank groups (80-byte stride).
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0, "bad tile");
};

template <int VW> struct TcStages { static constexpr int value = 3; };
template <> struct TcStages<1> { static constexpr int value = 2; };

// Tiles up to 64 channels wide finish through the staged epilogue (Epilogue::store_staged): an fp32 [BM][BN + 8]
// tile in the pipeline buffers. (At BN = 128 it would outgrow them and cost occupancy; that config runs only
// where wgmma does not.)
template <typename Cfg>
constexpr bool tc_staged() {
  return Cfg::BN <= 64;
}
template <typename Cfg, int VW>
constexpr int tc_smem_bytes() {
  constexpr int pipe = TcStages<VW>::value * (Cfg::BM + Cfg::BN) * Cfg::LDS * 2;
  constexpr int staged = tc_staged<Cfg>() ? Cfg::BM * (Cfg::BN + 8) * 4 : 0;
  return pipe > staged ? pipe : staged;
}

// BD: block-diagonal mode (GemmParams::bd_log2; KIND_CONV, VW 4/8): a separate instantiation, so that the dense
// kernels keep their registers.
template <typename T, typename Cfg, int KIND, int VW, bool BD = false>
__global__ void __launch_bounds__(Cfg::NT) igemm_tc_kernel(const GemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LDS = Cfg::LDS, NT = Cfg::NT;
  constexpr int MF = Cfg::MF, NF = Cfg::NF;
  constexpr int STAGES = TcStages<VW>::value;

  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* As = smem;                       // [STAGES][BM][LDS]
  uint16_t* Bs = smem + STAGES * BM * LDS;   // [STAGES][BN][LDS]
  __shared__ int4 rows[BM];
  __shared__ ChildTab tab;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % Cfg::WARPS_M;
  const int wn = warp / Cfg::WARPS_M;

  const TileOrigin to = tile_origin(p, BM, BN);
  const int bm = to.bm, g = to.g;
  const int n0 = to.n0;  // first output channel of the tile, within group g
  const int cbase = g * p.Cin_g;
  const uint16_t* wg = static_cast<const uint16_t*>(p.w) + (long long)g * p.Cout_g * p.K;

  build_tables(p, rows, tab, bm, BM, tid, NT);
  __syncthreads();

  const int KT = (p.K + BK - 1) / BK;

  float acc[MF][NF][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  auto compute_stage = [&](int stage) {
    const uint16_t* As_s = As + stage * BM * LDS;
    const uint16_t* Bs_s = Bs + stage * BN * LDS;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[MF][4];
      uint32_t bf[NF][2];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) {
        // x4: matrices (rows 0-7,k 0-7) (rows 8-15,k 0-7) (rows 0-7,k 8-15) (rows 8-15,k 8-15) = a0..a3.
        const int r = wm * Cfg::WM + mf * 16 + (lane & 15);
        const int c = ks * 16 + (lane >> 4) * 8;
        ldmatrix_x4(af[mf], smem_u32(As_s + r * LDS + c));
      }
#pragma unroll
      for (int nb = 0; nb < NF / 2; ++nb) {
        // x4 over B stored [n][k]: (n 0-7,k 0-7)=b0 (n 0-7,k 8-15)=b1 of fragment 2nb, then n 8-15 for 2nb+1.
        uint32_t t4[4];
        const int r = wn * Cfg::WN + nb * 16 + (lane >> 4) * 8 + (lane & 7);
        const int c = ks * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(t4, smem_u32(Bs_s + r * LDS + c));
        bf[2 * nb][0] = t4[0];
        bf[2 * nb][1] = t4[1];
        bf[2 * nb + 1][0] = t4[2];
        bf[2 * nb + 1][1] = t4[3];
      }
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int nf = 0; nf < NF; ++nf) mma_16816<T>(acc[mf][nf], af[mf], bf[nf][0], bf[nf][1]);
    }
  };

  if constexpr (VW > 1) {
    constexpr int CPR = BK / VW;  // vectors per tile row
    static_assert(NT % CPR == 0, "each thread must keep one k column");
    constexpr int A_IT = (BM * CPR + NT - 1) / NT;
    constexpr int B_IT = (BN * CPR + NT - 1) / NT;
    const int kc = tid % CPR;
    constexpr int RSTEP = NT / CPR;  // a thread copies vector kc of rows r0, r0 + RSTEP, ... in every tile
    const int r0 = tid / CPR;

    // Convolutions gather incrementally (as the wgmma kernel does): each row's window corner is one 64-bit
    // element offset computed once, a tile adds the tap offset r*sh + s*sw + c shared by all rows, and
    // (r, s, c) advance with the tiles instead of being divided out of k. At N = 16-32 a tile has few MMAs, and
    // the per-vector divisions, table reads and 64-bit products of the general path (decompose_k + a_offset)
    // were what the SM spent its issue slots on (they left it 2x behind Triton on 32->32 3x3 convs).
    // load_stage runs for kt = 0, 1, 2, ... in order, which the carried TapCursor relies on.
    const uint16_t* xg = static_cast<const uint16_t*>(p.src[0]);
    long long rbase[KIND == KIND_CONV ? A_IT : 1];  // the bounds test reads rows[] (registers: occupancy)
    TapCursor at;  // tap row, tap column, channel (within the group) of this thread's k
    if constexpr (KIND == KIND_CONV) {
#pragma unroll
      for (int i = 0; i < A_IT; ++i) {
        const int row = r0 + i * RSTEP;
        const int4 rr = rows[row < BM ? row : 0];
        rbase[i] = (long long)rr.x * p.sn[0] + (long long)rr.y * p.sh[0] + (long long)rr.z * p.sw[0] + cbase;
      }
      at.start(kc * VW, p);
    }

    auto load_stage = [&](int stage, int kt) {
      const int k = kt * BK + kc * VW;
      uint16_t* As_s = As + stage * BM * LDS;
      uint16_t* Bs_s = Bs + stage * BN * LDS;
      if constexpr (KIND == KIND_CONV) {
        const bool kok = k < p.K;
        const long long toff = (long long)at.r * p.sh[0] + (long long)at.s * p.sw[0] + at.c;
#pragma unroll
        for (int i = 0; i < A_IT; ++i) {
          const int row = r0 + i * RSTEP;
          if ((BM * CPR) % NT == 0 || row < BM) {
            const int4 rr = rows[row];
            const bool v = kok && rr.w && (unsigned)(rr.y + at.r) < (unsigned)p.H &&
                           (unsigned)(rr.z + at.s) < (unsigned)p.W;
            cp_async<VW * 2>(smem_u32(As_s + row * LDS + kc * VW), v ? xg + rbase[i] + toff : xg, v);
          }
        }
#pragma unroll
        for (int i = 0; i < B_IT; ++i) {
          const int row = r0 + i * RSTEP;
          if ((BN * CPR) % NT == 0 || row < BN) {
            const int n = n0 + row;
            bool ok = kok && n < p.Cout_g;
            const uint16_t* src = wg + (long long)n * p.K + k;
            if constexpr (BD) {
              // super-group channel at.c belongs to real group at.c >> bd_log2; output n to n >> bd_log2
              ok = ok && (at.c >> p.bd_log2) == (n >> p.bd_log2);
              src = bd_weight_tap(p, g, n, at) + (at.c & ((1 << p.bd_log2) - 1));
            }
            cp_async<VW * 2>(smem_u32(Bs_s + row * LDS + kc * VW), ok ? src : wg, ok);
          }
        }
        at.advance(BK, p);  // the next tile's k
      } else {
        static_assert(!BD, "block-diagonal mode is for convolutions");
        const KSrc d = decompose_k<KIND>(k, p, tab, cbase);
        const char* base = tab.ptr[d.child];
#pragma unroll
        for (int i = 0; i < A_IT; ++i) {
          const int row = r0 + i * RSTEP;
          if ((BM * CPR) % NT == 0 || row < BM) {
            const long long off = a_offset(d, rows[row], p, tab);
            const void* src = off >= 0 ? static_cast<const void*>(base + off * 2) : static_cast<const void*>(base);
            cp_async<VW * 2>(smem_u32(As_s + row * LDS + kc * VW), src, off >= 0);
          }
        }
#pragma unroll
        for (int i = 0; i < B_IT; ++i) {
          const int row = r0 + i * RSTEP;
          if ((BN * CPR) % NT == 0 || row < BN) {
            const int n = n0 + row;
            const bool ok = d.ok && n < p.Cout_g;
            const uint16_t* src = ok ? wg + (long long)n * p.K + k : wg;
            cp_async<VW * 2>(smem_u32(Bs_s + row * LDS + kc * VW), src, ok);
          }
        }
      }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < KT) load_stage(s, s);
      cp_async_commit();  // commit even when empty so the group count stays in step with kt
    }
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread) ...
      __syncthreads();              // ... for all threads; and everyone is done reading tile kt-1
      const int nk = kt + STAGES - 1;
      if (nk < KT) load_stage(nk % STAGES, nk);  // overwrites the buffer of tile kt-1
      cp_async_commit();
      compute_stage(kt % STAGES);
    }
    cp_async_wait<0>();
  } else {
    // Scalar gather: thread owns k column (tid % BK) and rows tid/BK + i*NT/BK.
    static_assert(NT % BK == 0, "");
    constexpr int A_IT = (BM * BK + NT - 1) / NT;
    constexpr int B_IT = (BN * BK + NT - 1) / NT;
    const int kk = tid % BK;
    uint16_t ra[A_IT], rb[B_IT];

    auto load_regs = [&](int kt) {
      const int k = kt * BK + kk;
      const KSrc d = decompose_k<KIND>(k, p, tab, cbase);
      const uint16_t* base = reinterpret_cast<const uint16_t*>(tab.ptr[d.child]);
#pragma unroll
      for (int i = 0; i < A_IT; ++i) {
        const int e = tid + i * NT;
        uint16_t v = 0;
        if ((BM * BK) % NT == 0 || e < BM * BK) {
          const long long off = a_offset(d, rows[e / BK], p, tab);
          if (off >= 0) v = base[off];
        }
        ra[i] = v;
      }
#pragma unroll
      for (int i = 0; i < B_IT; ++i) {
        const int e = tid + i * NT;
        uint16_t v = 0;
        if ((BN * BK) % NT == 0 || e < BN * BK) {
          const int row = e / BK;
          if (d.ok && (n0 + row) < p.Cout_g) v = wg[(long long)(n0 + row) * p.K + k];
        }
        rb[i] = v;
      }
    };
    auto store_regs = [&](int stage) {
      uint16_t* As_s = As + stage * BM * LDS;
      uint16_t* Bs_s = Bs + stage * BN * LDS;
#pragma unroll
      for (int i = 0; i < A_IT; ++i) {
        const int e = tid + i * NT;
        if ((BM * BK) % NT == 0 || e < BM * BK) As_s[(e / BK) * LDS + kk] = ra[i];
      }
#pragma unroll
      for (int i = 0; i < B_IT; ++i) {
        const int e = tid + i * NT;
        if ((BN * BK) % NT == 0 || e < BN * BK) Bs_s[(e / BK) * LDS + kk] = rb[i];
      }
    };

    load_regs(0);
    store_regs(0);
    __syncthreads();
    for (int kt = 0; kt < KT; ++kt) {
      const bool more = kt + 1 < KT;
      if (more) load_regs(kt + 1);  // in flight while the MMAs below run
      compute_stage(kt & 1);
      // Buffer (kt+1)&1 was last read in iteration kt-1, which every thread finished before the barrier
      // that ended it.
      if (more) store_regs((kt + 1) & 1);
      __syncthreads();
    }
  }

  // ------------------------------------------------------------------------------------------------------
  // Accumulator fragments: c0,c1 = (row lane/4, cols 2*(lane%4)+{0,1}); c2,c3 = row + 8.
  const Epilogue<T> epi(p);
  if constexpr (tc_staged<Cfg>()) {
    if (Epilogue<T>::staged_ok(p)) {
      constexpr int LDF = BN + 8;  // the 8 rows of a fragment store land 8 (BN 16: 24) banks apart
      float* tile = reinterpret_cast<float*>(smem);
      __syncthreads();  // every warp is done reading the pipeline buffers
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm * Cfg::WM + mf * 16 + (lane >> 2) + h * 8;
#pragma unroll
          for (int nf = 0; nf < NF; ++nf)
            *reinterpret_cast<float2*>(tile + r * LDF + wn * Cfg::WN + nf * 8 + (lane & 3) * 2) =
                make_float2(acc[mf][nf][2 * h], acc[mf][nf][2 * h + 1]);
        }
      __syncthreads();
      epi.template store_staged<BM, BN, LDF, NT>(p, tile, bm, g, n0, tid);
      return;
    }
  }
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = bm + wm * Cfg::WM + mf * 16 + (lane >> 2) + h * 8;
      if (m >= p.M) continue;
      const auto row = epi.row(p, m);
#pragma unroll
      for (int nf = 0; nf < NF; ++nf) {
        epi.pair(p, row, g, n0 + wn * Cfg::WN + nf * 8 + (lane & 3) * 2, acc[mf][nf][2 * h], acc[mf][nf][2 * h + 1]);
      }
    }
  }
#else
  __trap();  // built for an arch without mma.sync/cp.async; the host never launches this
#endif
}

}  // namespace dla_fast
