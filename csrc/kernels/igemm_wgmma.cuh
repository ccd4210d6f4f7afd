// Hopper (sm_90a) implicit GEMM for fp16/bf16: the same gather (or TMA loads: the pipeline note) and epilogue as
// igemm_tc.cuh, but the MMAs are warpgroup-wide wgmma.mma_async reading both operands straight from shared
// memory, which is what reaches the H100's tensor-core rate (mma.sync tops out near half of it and needs every
// fragment moved through registers).
//
//   wide tiles (BN 64, 128): 256 threads = 2 warpgroups, BM = 128 output pixels, BK = 64; warpgroup w computes
//     rows [64w, 64w + 64) with m64nBNk16 (4 per k tile).
//   narrow tiles (BN 16, 32; convolutions only): 128 threads = 1 warpgroup that computes both 64-row halves,
//     BK = 32, 4 stages: ~40 KB a block, so 5 blocks share an SM. Small-N convs move few bytes per block and
//     have few k tiles (a 32->32 3x3 conv: 9), so a block's pipeline fill and epilogue are a large part of its
//     life; only many resident blocks hide them (on a 32->32 3x3 conv at 56x56 the wide config, 2 blocks an SM,
//     takes 1.6x as long as Triton's 128x32x32 wgmma tiles at 5 blocks an SM).
//   big tiles (BN 256; dense convolutions only): 384 threads = 3 warpgroups, BM = 192, BK = 64, 4 stages, one
//     block an SM. For the deep 3x3 layers with few output pixels (512->512 @7x7, batch 256: M = 12544) the
//     128x128 grid is 392 blocks = 1.48 waves of 2 blocks/SM, and each of its blocks re-reads its A and B tiles
//     from L2 (0.93 GB at K = 4608); 192x256 tiles are 132 blocks = one wave, with
//     0.59x the L2 reads (pick_bn() in host_utils.h says where the grid favours it). Both operands come by TMA
//     (A in im2col mode), so the threads only issue wgmmas: see the pipeline note below.
//
// Shared tiles are [rows][BK] 16-bit elements (RB = 2 BK bytes a row) in the swizzle the wgmma descriptors
// name (128-byte for BK 64, 64-byte for BK 32): the 16-byte chunk c of row r sits at chunk c ^ ((r RB / 128) %
// (RB / 16)), so the 8 rows of a core matrix hit 8 different bank groups. Every tile starts on a 1024-byte
// boundary (a whole number of swizzle atoms).
//
// Block-diagonal mode (BD, narrow BN 32 only): grouped convs with 4 or 8 channels a group run as dense 32x32
// super-groups (GemmParams::bd_log2, as in the mma.sync kernel); B reads each weight row in place and zero-fills
// the other groups' channels. A keeps its 16-byte gather; for 4-channel groups a 16-byte B chunk spans two real
// groups, so it is filled by two 8-byte copies, one of them zero.
//
// Pipeline: STAGES buffers, cp.async loads issued STAGES - 1 tiles ahead. Iteration kt: wait for tile kt,
// barrier, issue its wgmmas, retire tile kt - 1 (wait_group 1: tile kt stays in flight), barrier (every
// warpgroup has retired kt - 1), then load tile kt + STAGES - 1 into kt - 1's buffer while the tensor cores
// work on tile kt. TMA kernels (the 192x256 tile; the 64/128-wide ones for convs whose input suits an im2col
// map) have no block-wide barrier in the loop: thread 0 asks the TMA unit for tile
// kt + STAGES - 1 (A as an im2col box, B as a weight tile) once every warp has arrived at the stage's empty
// mbarrier (retired kt - 1), and the warps wait for a tile on its full mbarrier (all of its bytes landed).
#pragma once

#include <cuda.h>  // CUtensorMap (the type only; the host encodes it through the runtime's driver entry point)

#include "kernels/common.cuh"
#include "kernels/wgmma_ops.cuh"

namespace dla_fast {

template <int BN>
struct WgCfg {
  static constexpr bool NARROW = BN <= 32;
  static constexpr bool BIG = BN == 256;
  static constexpr int BM = BIG ? 192 : 128;
  static constexpr int BK = NARROW ? 32 : 64;
  static constexpr int RB = BK * 2;  // bytes per shared-memory row = the swizzle span
  static constexpr int NT = NARROW ? 128 : BIG ? 384 : 256;
  static constexpr int NWG = NT / 128;
  static constexpr int MH = BM / 64 / NWG;  // 64-row slices per warpgroup
  // Ring depth: narrow 4 (see above). Wide: 3 tiles for BN 128, 4 for BN 64 (96 KB either way), so that two
  // blocks share an SM: one block's barrier and gather arithmetic hide behind the other's MMAs. (One block per
  // SM with 4-5 stages reaches little more than half the rate of two blocks an SM with 3 stages on 512->512 3x3
  // at 7x7 on the H100.) Big: 4 stages of 56 KB (224 KB), one block an SM: a lone block has no
  // neighbour to cover an L2 miss, so its loads are issued 3 tiles ahead.
  static constexpr int STAGES = BN == 128 ? 3 : 4;
  static constexpr int MIN_BLOCKS = NARROW ? 4 : BIG ? 1 : 2;
  // Big tiles also have their own pipeline (the note above): gathering A with cp.async, their 384 threads would
  // spend ~70 instructions a wgmma on its addresses and bounds and leave the tensor pipe idle much of the time;
  // with A by TMA im2col the loop is the wgmmas and the barriers.
  static constexpr int A_BYTES = BM * RB, B_BYTES = BN * RB;
  // The staged epilogue's fp32 tile [BM][BN + 8] reuses the pipeline buffers; with few k tiles it is the larger.
  static constexpr int STAGED_BYTES = BM * (BN + 8) * 4;
  static_assert(B_BYTES % 1024 == 0 && A_BYTES % 1024 == 0, "tiles must keep the 1024-byte alignment");
  static_assert(MH * NWG * 64 == BM, "warpgroups must split the tile rows");
};

// A problem with fewer k tiles gets only as many buffers as it uses.
template <int BN>
inline int wgmma_stages_used(int K) {
  using C = WgCfg<BN>;
  const int kt = (K + C::BK - 1) / C::BK;
  return kt < C::STAGES ? kt : C::STAGES;
}
template <int BN>
constexpr int wgmma_smem_bytes(int nst) {
  using C = WgCfg<BN>;
  const int pipe = nst * (C::A_BYTES + C::B_BYTES);
  return (pipe > C::STAGED_BYTES ? pipe : C::STAGED_BYTES) + 1024;  // + slack: 1024-byte alignment
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor: K-major operand, RB-byte swizzle (RB = 128: layout type 1, RB = 64: type 2),
// 8-row core-matrix groups 8 RB bytes apart. The leading-dimension offset is unused for swizzled K-major
// operands (one k16 step never leaves a row).
template <int RB>
__device__ __forceinline__ uint64_t sw_desc(uint32_t saddr) {
  static_assert(RB == 128 || RB == 64, "");
  uint64_t d = (uint64_t)((saddr & 0x3FFFFu) >> 4);
  d |= (uint64_t)1 << 16;  // leading-dimension offset: "not used, assumed 1" for swizzled K-major
  d |= (uint64_t)((8 * RB) >> 4) << 32;
  d |= (uint64_t)(RB == 128 ? 1 : 2) << 62;
  return d;
}
__device__ __forceinline__ void wgmma_arrive() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// 2-D tile (c0 = the inner, contiguous coordinate) into shared memory; completion counted on bar in bytes.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
// A tile in im2col mode: pixelsPerColumn output pixels from the one at (w, h, n) of the map's window box, each
// with the channels c.. of tap (s, r) (the im2col offsets); taps outside the image land as zeros.
__device__ __forceinline__ void tma_load_im2col(uint32_t dst, const CUtensorMap* map, int c, int w, int h, int n,
                                                uint16_t s, uint16_t r, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.im2col.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], {%7, %8};\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(w), "r"(h), "r"(n), "r"(bar), "h"(s), "h"(r)
      : "memory");
}
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Keeps the compiler from moving accumulator registers across the asynchronous MMAs that own them.
template <int R> __device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif

// TMA: both operands by TMA (dense convs whose input im2col_ok() admits; the 192x256 tile has nothing else).
template <typename T, int BN, int KIND, bool BD = false, bool TMA = false>
__global__ void __launch_bounds__(WgCfg<BN>::NT, WgCfg<BN>::MIN_BLOCKS) igemm_wgmma_kernel(const GemmParams p,
                                                                                    const __grid_constant__ CUtensorMap amap,
                                                                                    const __grid_constant__ CUtensorMap bmap) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgCfg<BN>;
  constexpr int BM = C::BM, BK = C::BK, RB = C::RB, NT = C::NT, MH = C::MH, STAGES = C::STAGES;
  constexpr int PD = STAGES - 1;  // tiles loaded ahead
  constexpr int A_BYTES = C::A_BYTES, B_BYTES = C::B_BYTES;
  constexpr int CPR = BK / 8;                        // 16-byte chunks per row
  constexpr int A_IT = BM * CPR / NT;                // chunks per thread per tile
  constexpr int B_IT = (BN * CPR + NT - 1) / NT;     // (BN 16: half the threads copy one B chunk)
  constexpr int RSTEP = NT / CPR;                     // rows between a thread's chunks
  static_assert(A_IT * NT == BM * CPR, "A tile must split over the threads");  // B: the last pass may be partial
  static_assert(!BD || (BN == 32 && KIND == KIND_CONV), "block-diagonal mode: 32-channel super-groups, convs");

  extern __shared__ uint8_t wg_smem_raw[];
  __shared__ ChildTab tab;
  __shared__ alignas(8) uint64_t full_bar[STAGES];   // TMA: tile kt has landed (phase kt / STAGES)
  __shared__ alignas(8) uint64_t empty_bar[STAGES];  // TMA: every warp has retired the stage's tile
  __shared__ int4 rows[TMA ? 1 : BM];                 // TMA kernels gather nothing themselves
  const uint32_t base = (smem_u32(wg_smem_raw) + 1023u) & ~1023u;
  const int KT = (p.K + BK - 1) / BK;
  const int nst = KT < STAGES ? KT : STAGES;     // buffers in use (kt % STAGES < nst for every kt < KT)
  const uint32_t As = base;                      // [nst][BM][BK] swizzled
  const uint32_t Bs = base + nst * A_BYTES;      // [nst][BN][BK] swizzled

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wgi = warp >> 2;  // warpgroup: tile rows [64 MH wgi, 64 MH (wgi + 1))

  const TileOrigin to = tile_origin(p, BM, BN);
  const int bm = to.bm, g = to.g;
  const int n0 = to.n0;  // first output channel of the tile, within group g
  const int cbase = g * p.Cin_g;
  const uint16_t* wg = static_cast<const uint16_t*>(p.w) + (long long)g * p.Cout_g * p.K;

  static_assert(!C::BIG || TMA, "the 192x256 tile loads by TMA only");
  static_assert(!TMA || (!C::NARROW && MH == 1 && KIND == KIND_CONV && !BD), "TMA: 64-row slices, dense convs");
  float acc[MH][BN / 2];
#pragma unroll
  for (int h = 0; h < MH; ++h)
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[h][i] = 0.f;
  if constexpr (TMA) {
    // Both operands by TMA, asked for by thread 0: A as an im2col box of the BM output pixels from bm on, one tap
    // and 64 channels a k tile (so Cin % 64 == 0: a k tile never spans two taps; im2col_ok() on the host), B as
    // a BNx64 tile of the weight. The hardware walks the pixels across rows and images and zero-fills the taps
    // that fall in the padding, which is the address and bounds arithmetic that would take the big tile's issue
    // slots (~70 instructions a wgmma, a quarter of them IMAD).
    const uint32_t bar0 = smem_u32(full_bar), ebar0 = smem_u32(empty_bar);
    const int tpt = p.Cin_g / BK;  // k tiles a tap
    const int hw = p.Ho * p.Wo;
    const int img = bm / hw, rem = bm - img * hw, oh = rem / p.Wo, ow = rem - oh * p.Wo;
    const int wi0 = ow * p.stw - p.padw, hi0 = oh * p.sth - p.padh;  // the window corner of pixel bm
    int lc = 0, ls = 0, lr = 0;  // channel tile, tap column, tap row of the next tile to load (thread 0)
    if (tid == 0) {
      for (int s = 0; s < STAGES; ++s) {
        mbar_init(bar0 + 8 * s, 1);
        mbar_init(ebar0 + 8 * s, NT / 32);
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the TMA unit
      prefetch_tensormap(&amap);
      prefetch_tensormap(&bmap);
    }
    __syncthreads();
    // Tile kt into stage kt % STAGES, once every warp has retired the tile that was there (kt - STAGES).
    auto load = [&](int kt) {
      const int st = kt % STAGES;
      const uint32_t bar = bar0 + 8 * st;
      if (kt >= STAGES) mbar_wait(ebar0 + 8 * st, ((kt / STAGES) - 1) & 1);
      mbar_arrive_tx(bar, A_BYTES + B_BYTES);
      tma_load_im2col(As + st * A_BYTES, &amap, lc * BK, wi0, hi0, img, (uint16_t)ls, (uint16_t)lr, bar);
      tma_load_2d(Bs + st * B_BYTES, &bmap, kt * BK, n0, bar);
      if (++lc == tpt) {
        lc = 0;
        if (++ls == p.kw) {
          ls = 0;
          ++lr;
        }
      }
    };
    // Big tiles: the residual tile into L2 now, while the K loop runs (see store_staged). (Issued inside the loop,
    // between in-flight wgmmas, it made ptxas serialise every wgmma: C7515.)
    if constexpr (C::BIG) Epilogue<T>(p).template prefetch_res<BM, BN, NT>(p, bm, g, n0, tid);
    if (tid == 0)
      for (int kt = 0; kt < PD && kt < KT; ++kt) load(kt);
    for (int kt = 0; kt < KT; ++kt) {
      const int st = kt % STAGES;
      mbar_wait(bar0 + 8 * st, (kt / STAGES) & 1);
      const uint32_t a_tile = As + st * A_BYTES + wgi * 64 * RB;
      const uint32_t b_tile = Bs + st * B_BYTES;
#pragma unroll
      for (int h = 0; h < MH; ++h) fence_regs(acc[h]);
      wgmma_arrive();
#pragma unroll
      for (int ks = 0; ks < BK / 16; ++ks)
        wgmma_ss<T, BN>(acc[0], sw_desc<RB>(a_tile + ks * 32), sw_desc<RB>(b_tile + ks * 32));
      wgmma_commit();
      wgmma_wait<1>();  // tile kt - 1 retired; kt stays queued on the tensor cores
#pragma unroll
      for (int h = 0; h < MH; ++h) fence_regs(acc[h]);
      if (kt > 0 && lane == 0) mbar_arrive(ebar0 + 8 * ((kt - 1) % STAGES));
      // Into kt - 1's stage: thread 0's own warp has just released it, the other warps release it as their
      // wgmmas of kt - 1 finish, which the tensor cores do in order.
      if (tid == 0 && kt + PD < KT) load(kt + PD);
    }
  } else {
  build_tables(p, rows, tab, bm, BM, tid, NT);
  __syncthreads();

  // This thread always copies chunk kc of rows r0 + i * RSTEP: their table entries and swizzled smem offsets
  // are fixed for the whole K loop.
  const int kc = tid % CPR;
  const int r0 = tid / CPR;
  int4 arow[A_IT];
#pragma unroll
  for (int i = 0; i < A_IT; ++i) arow[i] = rows[r0 + i * RSTEP];
  // The swizzle of row r is (r RB / 128) % CPR, periodic in 8 rows; RSTEP is a multiple of 8, so all of this
  // thread's rows share one swizzled column.
  static_assert(RSTEP % 8 == 0, "");
  const uint32_t sw_off = (uint32_t)r0 * RB + (uint32_t)((kc ^ ((r0 * RB >> 7) & (CPR - 1))) << 4);

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
    const uint32_t b_dst = Bs + stage * B_BYTES + sw_off;
    if constexpr (KIND == KIND_CONV) {
      const long long toff = (long long)at.r * p.sh[0] + (long long)at.s * p.sw[0] + at.c;
#pragma unroll
      for (int i = 0; i < A_IT; ++i) {
        const bool v = kok && arow[i].w && (unsigned)(arow[i].y + at.r) < (unsigned)p.H &&
                       (unsigned)(arow[i].z + at.s) < (unsigned)p.W;
        cp_async<16>(a_dst + i * RSTEP * RB, v ? xg + rbase[i] + toff : xg, v);
      }
      if constexpr (BD) {
        // Weight row of output n: [kh][kw][G] with G = 1 << bd_log2; this chunk holds super-group channels
        // at.c .. at.c + 7 of tap (at.r, at.s), i.e. real groups at.c >> bd_log2 (and the next one when G = 4).
        const int n = n0 + r0;  // B_IT == 1, n < 32 = Cout_g
        const uint16_t* w = static_cast<const uint16_t*>(p.w);
        const uint16_t* wrow = bd_weight_tap(p, g, n, at);
        const int gn = n >> p.bd_log2, gc = at.c >> p.bd_log2;
        if (p.bd_log2 == 3) {
          const bool ok = kok && gc == gn;
          cp_async<16>(b_dst, ok ? wrow : w, ok);
        } else {
          const bool ok0 = kok && gc == gn, ok1 = kok && gc + 1 == gn;
          cp_async<8>(b_dst, ok0 ? wrow : w, ok0);
          cp_async<8>(b_dst + 8, ok1 ? wrow : w, ok1);
        }
      }
      at.advance(BK, p);  // the next tile's k
    } else {
      const KSrc d = decompose_k<KIND>(k, p, tab, cbase);
      const char* src_base = tab.ptr[d.child];
#pragma unroll
      for (int i = 0; i < A_IT; ++i) {
        const long long off = a_offset(d, arow[i], p, tab);
        const void* src = off >= 0 ? static_cast<const void*>(src_base + off * 2) : static_cast<const void*>(src_base);
        cp_async<16>(a_dst + i * RSTEP * RB, src, off >= 0);
      }
    }
    if constexpr (!BD) {
#pragma unroll
      for (int i = 0; i < B_IT; ++i) {
        const int row = r0 + i * RSTEP;
        if ((BN * CPR) % NT == 0 || row < BN) {
          const int n = n0 + row;
          const bool ok = kok && n < p.Cout_g;
          const uint16_t* src = ok ? wg + (long long)n * p.K + k : wg;
          cp_async<16>(b_dst + i * RSTEP * RB, src, ok);
        }
      }
    }
  };

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
    const uint32_t a_tile = As + st * A_BYTES + wgi * MH * 64 * RB;
    const uint32_t b_tile = Bs + st * B_BYTES;
#pragma unroll
    for (int h = 0; h < MH; ++h) fence_regs(acc[h]);
    wgmma_arrive();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // k16 step ks = bytes [32 ks, 32 ks + 32) of each row: advance the start address; the hardware applies
      // the swizzle to the final address bits.
#pragma unroll
      for (int h = 0; h < MH; ++h)
        wgmma_ss<T, BN>(acc[h], sw_desc<RB>(a_tile + h * 64 * RB + ks * 32), sw_desc<RB>(b_tile + ks * 32));
    }
    wgmma_commit();
    wgmma_wait<1>();  // this warpgroup's tile kt - 1 is retired (tile kt stays in flight) ...
#pragma unroll
    for (int h = 0; h < MH; ++h) fence_regs(acc[h]);
    __syncthreads();  // ... and every warpgroup's: its buffer takes tile kt + STAGES - 1

    const int nk = kt + PD;
    if (nk < KT) load_stage(nk % STAGES, nk);
    cp_async_commit();
  }
  }  // TMA / gathered
  wgmma_wait<0>();
#pragma unroll
  for (int h = 0; h < MH; ++h) fence_regs(acc[h]);
  cp_async_wait<0>();

  // Accumulator layout of m64nNk16 (per warp: 16 rows, like mma.m16n8 repeated along N): acc[h][4j + 2e2 + e] is
  // row 64 (MH wgi + h) + 16 (warp % 4) + lane / 4 + 8 e2, column 8j + 2 (lane % 4) + e.
  const Epilogue<T> epi(p);
  if (Epilogue<T>::staged_ok(p)) {
    // Row stride BN + 8 floats: the 8 rows of a fragment store land 8 banks apart (2 wavefronts per 256 bytes).
    constexpr int LDF = BN + 8;
    static_assert(BM * LDF * 4 <= C::STAGED_BYTES, "");
    float* tile = reinterpret_cast<float*>(wg_smem_raw + (base - smem_u32(wg_smem_raw)));
    __syncthreads();  // every warpgroup's MMAs are retired: the pipeline buffers become the staging tile
#pragma unroll
    for (int h = 0; h < MH; ++h)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int r = (wgi * MH + h) * 64 + (warp & 3) * 16 + (lane >> 2) + e2 * 8;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
          *reinterpret_cast<float2*>(tile + r * LDF + j * 8 + (lane & 3) * 2) =
              make_float2(acc[h][4 * j + 2 * e2], acc[h][4 * j + 2 * e2 + 1]);
      }
    __syncthreads();
    epi.template store_staged<BM, BN, LDF, NT, C::BIG>(p, tile, bm, g, n0, tid);
    return;
  }
#pragma unroll
  for (int h = 0; h < MH; ++h)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int m = bm + (wgi * MH + h) * 64 + (warp & 3) * 16 + (lane >> 2) + e2 * 8;
      if (m >= p.M) continue;
      const auto row = epi.row(p, m);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        epi.pair(p, row, g, n0 + j * 8 + (lane & 3) * 2, acc[h][4 * j + 2 * e2], acc[h][4 * j + 2 * e2 + 1]);
      }
    }
#else
  __trap();  // not built for sm_90a; the host only launches this where it was (wgmma_built())
#endif
}

}  // namespace dla_fast
