// Device-side helpers shared by the kernels: number conversions, PTX wrappers, and the implicit-GEMM gather
// (row table + child table in shared memory).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "ops/launch.h"

namespace dla_fast {

// ---------------------------------------------------------------------------------------------------------
// Number conversions. 16-bit types travel through the gather as raw uint16_t bits: the gather never does
// arithmetic on them, and the bit pattern 0 is +0 for both fp16 and bf16, which makes zero padding free.
template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float bits_to_f(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ uint16_t f_to_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float bits_to_f(uint16_t b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ uint16_t f_to_bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// Load element i of a T array as float (any T).
template <typename T> __device__ __forceinline__ float load_f(const T* p, long long i) {
  return Num<T>::to_f(p[i]);
}

// ---------------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+). The callers only reach them from kernels compiled for sm_80+.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Asynchronous global->shared copy of BYTES bytes; when !pred nothing is read and the destination is zero
// filled (src-size 0), which is how the padding halo and the M/N/K tails become zeros.
template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? BYTES : 0;
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size));
  } else {
    // .cg only exists for 16 bytes; .ca (L1-allocating) is the form for 4 and 8.
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(BYTES),
                 "r"(src_size));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------------------
// Block -> tile. The grid is 1-D and the output-channel tiles (of every group) vary fastest, so the blocks resident
// at one time span few output pixels and all of their channels: an input pixel is fetched from DRAM once for every
// group and N tile that reads it, which M-fastest order did once per N tile (or super-group) whenever the input
// outgrew L2 (a strided grouped conv then reads 1.2x Triton's DRAM bytes).
struct TileOrigin {
  int bm, g, n0;  // first output pixel, group, first output channel within the group
};
__device__ __forceinline__ TileOrigin tile_origin(const GemmParams& p, int BM, int BN) {
  const int nt = p.groups * p.ntiles_n;
  const int mt = blockIdx.x / nt;
  const int j = blockIdx.x - mt * nt;
  const int g = j / p.ntiles_n;
  return {mt * BM, g, (j - g * p.ntiles_n) * BN};
}
// The matching grid (p.ntiles_n set); the host checks the block count against the 1-D limit (gemm_grid_fits()).
inline dim3 tile_grid(const GemmParams& p, int BM) {
  return dim3(static_cast<unsigned>(((long long)(p.M + BM - 1) / BM) * p.groups * p.ntiles_n));
}

// ---------------------------------------------------------------------------------------------------------
// The gather. A block owns BM consecutive output pixels (GEMM rows); their (n, hi0, wi0, valid) live in a
// shared row table built once, so the K loop never divides by Ho*Wo. The children's pointers and strides
// are copied to shared memory too: indexing a kernel-parameter array with a run-time child index would
// make the compiler spill the whole parameter struct to local memory.
struct ChildTab {
  const char* ptr[kMaxChildren];
  long long sn[kMaxChildren], sh[kMaxChildren], sw[kMaxChildren];
  int koff[kMaxChildren + 1];
};

__device__ __forceinline__ void build_tables(const GemmParams& p, int4* rows, ChildTab& tab, int bm, int BM,
                                             int tid, int nthreads) {
  const int hw = p.Ho * p.Wo;
  for (int i = tid; i < BM; i += nthreads) {
    const int m = bm + i;
    int4 r = make_int4(0, 0, 0, 0);
    if (m < p.M) {
      const int n = m / hw;
      const int rem = m - n * hw;
      const int ho = rem / p.Wo;
      const int wo = rem - ho * p.Wo;
      r = make_int4(n, ho * p.sth - p.padh, wo * p.stw - p.padw, 1);
    }
    rows[i] = r;
  }
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < kMaxChildren; ++i) {
      tab.ptr[i] = static_cast<const char*>(p.src[i]);
      tab.sn[i] = p.sn[i];
      tab.sh[i] = p.sh[i];
      tab.sw[i] = p.sw[i];
      // Unused slots get INT_MAX so that the child search below never selects them.
      tab.koff[i] = i < p.nchild ? p.koff[i] : 0x7fffffff;
    }
    tab.koff[kMaxChildren] = 0x7fffffff;
  }
}

// Where reduction index k (the first of a vector of VW that never straddles a tap or a child) comes from.
struct KSrc {
  int child, chan, r, s;
  bool ok;  // k < K
};

template <int KIND>
__device__ __forceinline__ KSrc decompose_k(int k, const GemmParams& p, const ChildTab& tab, int cbase) {
  KSrc d;
  d.ok = k < p.K;
  if constexpr (KIND == KIND_CONV) {
    // k = (r * kw + s) * Cin_g + c: the channels_last weight order, so B rows are contiguous in k.
    const int tap = k / p.Cin_g;
    const int c = k - tap * p.Cin_g;
    d.r = tap / p.kw;
    d.s = tap - d.r * p.kw;
    d.child = 0;
    d.chan = cbase + c;
  } else {
    int i = 0;
#pragma unroll
    for (int j = 1; j < kMaxChildren; ++j) i += (k >= tab.koff[j]) ? 1 : 0;
    d.child = i;
    d.chan = k - tab.koff[i];
    d.r = 0;
    d.s = 0;
  }
  return d;
}

// Where a thread's k vector sits in a convolution's (tap row r, tap column s, channel c) order, carried from k
// tile to k tile rather than divided out of k for every tile: the incremental gather of the tensor-core kernels.
// advance() must see the tiles in order.
struct TapCursor {
  int r = 0, s = 0, c = 0;
  __device__ __forceinline__ void start(int k, const GemmParams& p) {
    const int tap = k / p.Cin_g;
    c = k - tap * p.Cin_g;
    r = tap / p.kw;
    s = tap - r * p.kw;
  }
  __device__ __forceinline__ void advance(int dk, const GemmParams& p) {  // k += dk
    c += dk;
    while (c >= p.Cin_g) {
      c -= p.Cin_g;
      if (++s == p.kw) {
        s = 0;
        ++r;
      }
    }
  }
};

// Block-diagonal mode (GemmParams::bd_log2): the weight of output channel n of super-group g at tap (at.r, at.s),
// i.e. the G = 1 << bd_log2 channels of its real group, read in place from the grouped weight [Cout][kh][kw][G].
__device__ __forceinline__ const uint16_t* bd_weight_tap(const GemmParams& p, int g, int n, const TapCursor& at) {
  return static_cast<const uint16_t*>(p.w) +
         (((long long)(g * p.Cout_g + n) * (p.kh * p.kw) + (at.r * p.kw + at.s)) << p.bd_log2);
}

// Element offset (in T) of A[row][k] inside child d.child, or -1 when it is padding / out of range.
__device__ __forceinline__ long long a_offset(const KSrc& d, const int4& row, const GemmParams& p,
                                              const ChildTab& tab) {
  const int hi = row.y + d.r;
  const int wi = row.z + d.s;
  const bool ok = d.ok && row.w && (unsigned)hi < (unsigned)p.H && (unsigned)wi < (unsigned)p.W;
  if (!ok) return -1;
  return (long long)row.x * tab.sn[d.child] + (long long)hi * tab.sh[d.child] + (long long)wi * tab.sw[d.child] +
         d.chan;
}

// Output-row helpers for the epilogue.
__device__ __forceinline__ long long res_offset(const GemmParams& p, int m) {
  const int hw = p.Ho * p.Wo;
  const int n = m / hw;
  const int rem = m - n * hw;
  const int ho = rem / p.Wo;
  const int wo = rem - ho * p.Wo;
  return (long long)n * p.rsn + (long long)ho * p.rsh + (long long)wo * p.rsw;
}

// The fused epilogue of the tensor-core kernels: fp32 bias + residual + ReLU, one rounding, one store. pair():
// one accumulator pair (two adjacent output channels of one pixel; 4 bytes when both exist and align);
// store_staged(): 8 channels from a tile staged in shared memory.
template <typename T>
struct Epilogue {
  struct Row {
    long long yoff, roff;
  };
  bool pair_ok, res_pair_ok;
  const uint16_t* res;
  uint16_t* y;

  __device__ __forceinline__ explicit Epilogue(const GemmParams& p)
      : pair_ok((p.Cout % 2 == 0) && (p.Cout_g % 2 == 0)),  // co even => 4-byte aligned pair
        res_pair_ok(pair_ok && p.res != nullptr && (p.rsn % 2 == 0) && (p.rsh % 2 == 0) && (p.rsw % 2 == 0) &&
                    ((reinterpret_cast<uintptr_t>(p.res) & 3) == 0)),
        res(static_cast<const uint16_t*>(p.res)),
        y(static_cast<uint16_t*>(p.y)) {}

  // After bias and residual: ReLU (written so that NaN stays NaN, like torch.relu) and the one rounding.
  __device__ __forceinline__ static uint16_t finish(float v, int relu) {
    return Num<T>::f_to_bits(relu && v < 0.f ? 0.f : v);
  }

  __device__ __forceinline__ Row row(const GemmParams& p, int m) const {
    return Row{(long long)m * p.Cout, res != nullptr ? res_offset(p, m) : 0};
  }

  // col: channel within group g (even); v0, v1: accumulators of channels col, col + 1.
  __device__ __forceinline__ void pair(const GemmParams& p, const Row& r, int g, int col, float v0, float v1) const {
    if (col >= p.Cout_g) return;
    const int co = g * p.Cout_g + col;
    const bool has1 = col + 1 < p.Cout_g;
    if (p.bias != nullptr) {
      v0 += p.bias[co];
      if (has1) v1 += p.bias[co + 1];
    }
    if (res != nullptr) {
      if (res_pair_ok && has1) {
        const uint32_t rr = *reinterpret_cast<const uint32_t*>(res + r.roff + co);
        v0 += Num<T>::bits_to_f(static_cast<uint16_t>(rr & 0xffffu));
        v1 += Num<T>::bits_to_f(static_cast<uint16_t>(rr >> 16));
      } else {
        v0 += Num<T>::bits_to_f(res[r.roff + co]);
        if (has1) v1 += Num<T>::bits_to_f(res[r.roff + co + 1]);
      }
    }
    const uint16_t b0 = finish(v0, p.relu);
    const uint16_t b1 = finish(v1, p.relu);
    if (pair_ok && has1) {
      *reinterpret_cast<uint32_t*>(y + r.yoff + co) = static_cast<uint32_t>(b0) | (static_cast<uint32_t>(b1) << 16);
    } else {
      y[r.yoff + co] = b0;
      if (has1) y[r.yoff + co + 1] = b1;
    }
  }

  // The staged epilogue: the kernel parks its fp32 accumulators in shared memory and each thread then finishes
  // 8 consecutive channels of one pixel with 16-byte loads and one 16-byte store. Stored straight from the MMA
  // fragments, a warp's store instruction covers 8 pixels x 16 bytes, i.e. 8 partial lines: at short K (1x1
  // convs, aggregates) the LSU time of those stores rivalled the main loop. Same fp32 operations in the same
  // order as pair() (finish() for both), so the results are bit-identical. Needs every 8-channel run aligned:
  // checked here, the same for the whole grid.
  __device__ __forceinline__ static bool staged_ok(const GemmParams& p) {
    const auto al16 = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
    return p.Cout % 8 == 0 && p.Cout_g % 8 == 0 && al16(p.y) && (p.bias == nullptr || al16(p.bias)) &&
           (p.res == nullptr || (p.rsn % 8 == 0 && p.rsh % 8 == 0 && p.rsw % 8 == 0 && al16(p.res)));
  }

  // Residual rows of a tile, brought into L2 some k tiles before the epilogue reads them (the same chunks as
  // store_staged's, so the call sites need only the tile origin).
  template <int BM, int BN, int NT>
  __device__ __forceinline__ void prefetch_res(const GemmParams& p, int bm, int g, int n0, int tid) const {
    constexpr int CH = BN / 8, RPP = NT / CH;
    const int col = n0 + (tid % CH) * 8;
    if (res == nullptr || col >= p.Cout_g) return;
#pragma unroll
    for (int i = 0; i < BM / RPP; ++i) {
      const int m = bm + tid / CH + i * RPP;
      if (m < p.M) asm volatile("prefetch.global.L2 [%0];" ::"l"(res + res_offset(p, m) + g * p.Cout_g + col));
    }
  }

  // tile: [BM][LDF] fp32 accumulators of pixels bm... and channels n0... of group g (all NT threads call this).
  // RES_FIRST: every residual chunk is requested before the first is used. For the 192x256 tile, one block an SM
  // with nothing else to hide its epilogue, one load in flight per row pass leaves it latency-bound; the
  // 2-blocks-an-SM tiles keep the plain loop, which is faster for them (the residual aggregation nodes lose a few
  // percent with RES_FIRST).
  template <int BM, int BN, int LDF, int NT, bool RES_FIRST = false>
  __device__ __forceinline__ void store_staged(const GemmParams& p, const float* tile, int bm, int g, int n0,
                                               int tid) const {
    constexpr int CH = BN / 8, RPP = NT / CH, IT = BM / RPP;  // 8-channel chunks per row; rows per pass; passes
    static_assert(BN % 8 == 0 && NT % CH == 0 && BM % RPP == 0 && LDF % 4 == 0, "bad staged tile");
    const int c8 = (tid % CH) * 8;
    const int col = n0 + c8;
    if (col >= p.Cout_g) return;  // Cout_g % 8 == 0: a chunk is all in or all out
    const int co = g * p.Cout_g + col;
    float b[8];
    if (p.bias != nullptr) {
      const float4 b0 = *reinterpret_cast<const float4*>(p.bias + co);
      const float4 b1 = *reinterpret_cast<const float4*>(p.bias + co + 4);
      b[0] = b0.x, b[1] = b0.y, b[2] = b0.z, b[3] = b0.w, b[4] = b1.x, b[5] = b1.y, b[6] = b1.z, b[7] = b1.w;
    }
    const auto load_res = [&](int m) { return *reinterpret_cast<const uint4*>(res + res_offset(p, m) + co); };
    const auto emit = [&](int r, int m, const uint4& pre) {  // pre: the residual chunk when RES_FIRST
      const float4 a0 = *reinterpret_cast<const float4*>(tile + r * LDF + c8);
      const float4 a1 = *reinterpret_cast<const float4*>(tile + r * LDF + c8 + 4);
      float v[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      if (p.bias != nullptr) {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] += b[e];
      }
      if (res != nullptr) {
        const uint4 rr = RES_FIRST ? pre : load_res(m);
        const uint32_t w[4] = {rr.x, rr.y, rr.z, rr.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[2 * e] += Num<T>::bits_to_f(static_cast<uint16_t>(w[e] & 0xffffu));
          v[2 * e + 1] += Num<T>::bits_to_f(static_cast<uint16_t>(w[e] >> 16));
        }
      }
      uint32_t o[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        o[e] = static_cast<uint32_t>(finish(v[2 * e], p.relu)) |
               (static_cast<uint32_t>(finish(v[2 * e + 1], p.relu)) << 16);
      *reinterpret_cast<uint4*>(y + (long long)m * p.Cout + co) = make_uint4(o[0], o[1], o[2], o[3]);
    };
    if constexpr (RES_FIRST) {
      uint4 rr[IT];
#pragma unroll
      for (int i = 0; i < IT; ++i) {
        const int m = bm + tid / CH + i * RPP;
        rr[i] = res != nullptr && m < p.M ? load_res(m) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int i = 0; i < IT; ++i) {
        const int r = tid / CH + i * RPP;
        if (bm + r >= p.M) break;  // r grows with i
        emit(r, bm + r, rr[i]);
      }
    } else {
#pragma unroll 2
      for (int i = 0; i < IT; ++i) {
        const int r = tid / CH + i * RPP;
        const int m = bm + r;
        if (m >= p.M) break;  // r grows with i
        emit(r, m, make_uint4(0, 0, 0, 0));
      }
    }
  }
};

}  // namespace dla_fast
