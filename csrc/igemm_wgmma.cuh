// Hopper (sm_90a) implicit GEMM for fp16/bf16: the same gather and epilogue as igemm_tc.cuh, but the MMAs are
// warpgroup-wide wgmma.mma_async reading both operands straight from shared memory, which is what reaches the
// H100's tensor-core rate (mma.sync tops out near half of it and needs every fragment moved through registers).
//
//   block: 256 threads = 2 warpgroups; tile BM = 128 output pixels x BN (64 or 128) channels; BK = 64.
//   warpgroup w computes rows [64w, 64w + 64) of the tile with m64nBNk16 (4 per k tile).
//
// Shared tiles are [rows][64] 16-bit elements, 128 bytes a row, in the 128-byte swizzle that the wgmma
// descriptors describe: the 16-byte chunk c of row r sits at chunk c ^ (r % 8), so the 8 rows of a core
// matrix hit 8 different bank groups. Every tile starts on a 1024-byte boundary (one swizzle atom).
//
// Pipeline: STAGES buffers, cp.async loads issued STAGES - 1 tiles ahead. Iteration kt: wait for tile kt,
// barrier, issue its wgmmas, retire tile kt - 1 (wait_group 1: tile kt stays in flight), barrier (every
// warpgroup has retired kt - 1), then load tile kt + STAGES - 1 into kt - 1's buffer while the tensor cores
// work on tile kt.
#pragma once

#include "common.cuh"
#include "wgmma_ops.cuh"

namespace dla_fast {

constexpr int WG_BM = 128, WG_BK = 64, WG_NT = 256;

// Ring depth: 3 tiles for BN 128, 4 for BN 64 (96 KB either way), so that two blocks share an SM: one
// block's barrier and gather arithmetic hide behind the other's MMAs. (One block per SM with 4-5 stages
// ran 512->512 3x3 @7x7 at 265 TFLOP/s on the H100; Triton's 128x128x64 tiles with 3 stages, two blocks
// per SM, at 470.) A problem with fewer k tiles gets only as many buffers as it uses.
template <int BN>
constexpr int wg_stages() {
  return BN >= 128 ? 3 : 4;
}
template <int BN>
inline int wgmma_stages_used(int K) {
  const int kt = (K + WG_BK - 1) / WG_BK;
  return kt < wg_stages<BN>() ? kt : wg_stages<BN>();
}
// The staged epilogue's fp32 tile [BM][BN + 8] reuses the pipeline buffers; with few k tiles it is the larger.
template <int BN>
constexpr int wg_staged_bytes() {
  return WG_BM * (BN + 8) * 4;
}
template <int BN>
inline int wgmma_smem_bytes(int nst) {
  const int pipe = nst * (WG_BM + BN) * WG_BK * 2;
  return (pipe > wg_staged_bytes<BN>() ? pipe : wg_staged_bytes<BN>()) + 1024;  // + slack: 1024-byte alignment
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor: K-major operand, 128-byte swizzle, 8-row groups 1024 bytes apart. The
// leading-dimension offset is unused for swizzled K-major operands (one k16 step never leaves a 128-byte row).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t saddr) {
  uint64_t d = (uint64_t)((saddr & 0x3FFFFu) >> 4);
  d |= (uint64_t)1 << 16;  // leading-dimension offset: "not used, assumed 1" for swizzled K-major
  d |= (uint64_t)(1024 >> 4) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}
__device__ __forceinline__ void wgmma_arrive() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator registers across the asynchronous MMAs that own them.
template <int R> __device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif

template <typename T, int BN, int KIND>
__global__ void __launch_bounds__(WG_NT, 2) igemm_wgmma_kernel(const GemmParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = WG_BM, BK = WG_BK, NT = WG_NT, STAGES = wg_stages<BN>(), PD = STAGES - 1;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  constexpr int CPR = BK / 8;                 // 16-byte chunks per row
  constexpr int A_IT = BM * CPR / NT;         // chunks per thread per tile
  constexpr int B_IT = BN * CPR / NT;
  constexpr int RSTEP = NT / CPR;             // rows between a thread's chunks
  static_assert(A_IT * NT == BM * CPR && B_IT * NT == BN * CPR, "tile must split evenly over the threads");

  extern __shared__ uint8_t wg_smem_raw[];
  __shared__ int4 rows[BM];
  __shared__ ChildTab tab;
  const uint32_t base = (smem_u32(wg_smem_raw) + 1023u) & ~1023u;
  const int KT = (p.K + BK - 1) / BK;
  const int nst = KT < STAGES ? KT : STAGES;     // buffers in use (kt % STAGES < nst for every kt < KT)
  const uint32_t As = base;                      // [nst][BM][64] swizzled
  const uint32_t Bs = base + nst * A_BYTES;      // [nst][BN][64] swizzled

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wgi = warp >> 2;  // warpgroup: tile rows [64 wgi, 64 wgi + 64)

  const int bm = blockIdx.x * BM;
  const int g = blockIdx.y / p.ntiles_n;
  const int n0 = (blockIdx.y - g * p.ntiles_n) * BN;
  const int cbase = g * p.Cin_g;
  const uint16_t* wg = static_cast<const uint16_t*>(p.w) + (long long)g * p.Cout_g * p.K;

  build_tables(p, rows, tab, bm, BM, tid, NT);
  __syncthreads();

  // This thread always copies chunk kc of rows r0 + i * RSTEP: their table entries and swizzled smem offsets
  // are fixed for the whole K loop.
  const int kc = tid % CPR;
  const int r0 = tid / CPR;
  int4 arow[A_IT];
#pragma unroll
  for (int i = 0; i < A_IT; ++i) arow[i] = rows[r0 + i * RSTEP];
  // (r0 + i * RSTEP) % 8 == r0 % 8 since RSTEP is a multiple of 8: one swizzled column for all of them.
  static_assert(RSTEP % 8 == 0, "");
  const uint32_t sw_off = (uint32_t)r0 * 128u + (uint32_t)((kc ^ (r0 & 7)) << 4);

  // Convolutions: each row's window corner as one 64-bit element offset, computed once; per k tile only the
  // tap's offset r*sh + s*sw + c is new (shared by the rows), and (r, s, c) advance with the tiles instead of
  // being divided out of k. This halves the integer work of a tile's loads, which competes with the wgmma
  // issue for the same schedulers. (load_stage runs for kt = 0, 1, 2, ... in order.)
  const uint16_t* xg = static_cast<const uint16_t*>(p.src[0]);
  long long rbase[A_IT];
  TapCursor at;  // tap row, tap column, channel (within the group) of this thread's k
  if constexpr (KIND == KIND_CONV) {
#pragma unroll
    for (int i = 0; i < A_IT; ++i)
      rbase[i] = (long long)arow[i].x * p.sn[0] + (long long)arow[i].y * p.sh[0] + (long long)arow[i].z * p.sw[0] +
                 cbase;
    at.start(kc * 8, p);
  }

  auto load_stage = [&](int stage, int kt) {
    const int k = kt * BK + kc * 8;
    const bool kok = k < p.K;
    const uint32_t a_dst = As + stage * A_BYTES + sw_off;
    if constexpr (KIND == KIND_CONV) {
      const long long toff = (long long)at.r * p.sh[0] + (long long)at.s * p.sw[0] + at.c;
#pragma unroll
      for (int i = 0; i < A_IT; ++i) {
        const bool v = kok && arow[i].w && (unsigned)(arow[i].y + at.r) < (unsigned)p.H &&
                       (unsigned)(arow[i].z + at.s) < (unsigned)p.W;
        cp_async<16>(a_dst + i * RSTEP * 128, v ? xg + rbase[i] + toff : xg, v);
      }
      at.advance(BK, p);  // the next tile's k
    } else {
      const KSrc d = decompose_k<KIND>(k, p, tab, cbase);
      const char* src_base = tab.ptr[d.child];
#pragma unroll
      for (int i = 0; i < A_IT; ++i) {
        const long long off = a_offset(d, arow[i], p, tab);
        const void* src = off >= 0 ? static_cast<const void*>(src_base + off * 2) : static_cast<const void*>(src_base);
        cp_async<16>(a_dst + i * RSTEP * 128, src, off >= 0);
      }
    }
    const uint32_t b_dst = Bs + stage * B_BYTES + sw_off;
#pragma unroll
    for (int i = 0; i < B_IT; ++i) {
      const int n = n0 + r0 + i * RSTEP;
      const bool ok = kok && n < p.Cout_g;
      const uint16_t* src = ok ? wg + (long long)n * p.K + k : wg;
      cp_async<16>(b_dst + i * RSTEP * 128, src, ok);
    }
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < PD; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();  // committed even when empty: the group count stays in step with kt
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<PD - 1>();  // this thread's copies of tile kt have landed
    fence_proxy_async();      // ... and are visible to the async proxy that wgmma reads through
    __syncthreads();          // everyone's copies of tile kt

    // The MMAs first, then the gather arithmetic of the next loads, which the tensor cores then hide.
    const int st = kt % STAGES;
    const uint32_t a_tile = As + st * A_BYTES + wgi * 64 * 128;
    const uint32_t b_tile = Bs + st * B_BYTES;
    fence_regs(acc);
    wgmma_arrive();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // k16 step ks = bytes [32 ks, 32 ks + 32) of each 128-byte row: advance the start address; the
      // hardware applies the swizzle to the final address bits.
      wgmma_ss<T, BN>(acc, sw128_desc(a_tile + ks * 32), sw128_desc(b_tile + ks * 32));
    }
    wgmma_commit();
    wgmma_wait<1>();  // this warpgroup's tile kt - 1 is retired (tile kt stays in flight) ...
    fence_regs(acc);
    __syncthreads();  // ... and every warpgroup's: its buffer takes tile kt + STAGES - 1

    const int nk = kt + PD;
    if (nk < KT) load_stage(nk % STAGES, nk);
    cp_async_commit();
  }
  wgmma_wait<0>();
  fence_regs(acc);
  cp_async_wait<0>();

  // Accumulator layout of m64nNk16 (per warp: 16 rows, like mma.m16n8 repeated along N): acc[4j + 2h + e] is
  // row 16 (warp % 4) + lane / 4 + 8h, column 8j + 2 (lane % 4) + e.
  const Epilogue<T> epi(p);
  if (Epilogue<T>::staged_ok(p)) {
    // Row stride BN + 8 floats: the 8 rows of a fragment store land 8 banks apart (2 wavefronts per 256 bytes).
    constexpr int LDF = BN + 8;
    static_assert(BM * LDF * 4 <= wg_staged_bytes<BN>(), "");
    float* tile = reinterpret_cast<float*>(wg_smem_raw + (base - smem_u32(wg_smem_raw)));
    __syncthreads();  // both warpgroups' MMAs are retired: the pipeline buffers become the staging tile
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wgi * 64 + (warp & 3) * 16 + (lane >> 2) + h * 8;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
        *reinterpret_cast<float2*>(tile + r * LDF + j * 8 + (lane & 3) * 2) =
            make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
    __syncthreads();
    epi.template store_staged<BM, BN, LDF, NT>(p, tile, bm, g, n0, tid);
    return;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = bm + wgi * 64 + (warp & 3) * 16 + (lane >> 2) + h * 8;
    if (m >= p.M) continue;
    const auto row = epi.row(p, m);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      epi.pair(p, row, g, n0 + j * 8 + (lane & 3) * 2, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
  }
#else
  __trap();  // not built for sm_90a; the host only launches this where it was (wgmma_built())
#endif
}

}  // namespace dla_fast
