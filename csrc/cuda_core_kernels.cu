// CUDA-core kernels: the fp32 implicit GEMM (IEEE fp32 FMA; also the any-dtype fallback) and the direct
// convolution for grouped convs with few channels per group, plus the top-level tensor-core dispatcher.
#include <c10/cuda/CUDAException.h>

#include "common.cuh"

namespace dla_fast {

// Per-dtype tensor-core entry points (tc_*.cu): each lives in its own file so ninja builds them in parallel.
int launch_tc_conv_f16(int vw, int bn, const GemmParams& p, cudaStream_t s);
int launch_tc_conv_bf16(int vw, int bn, const GemmParams& p, cudaStream_t s);
int launch_tc_cat_f16(int vw, int bn, const GemmParams& p, cudaStream_t s);
int launch_tc_cat_bf16(int vw, int bn, const GemmParams& p, cudaStream_t s);
int launch_wgmma_f16(int kind, int bn, const GemmParams& p, cudaStream_t s, bool tma);
int launch_wgmma_bf16(int kind, int bn, const GemmParams& p, cudaStream_t s, bool tma);

int launch_igemm_tc(DType dt, int kind, int vw, int bn, GemmParams p, cudaStream_t stream) {
  if (dt == DType::F16)
    return kind == KIND_CONV ? launch_tc_conv_f16(vw, bn, p, stream) : launch_tc_cat_f16(vw, bn, p, stream);
  return kind == KIND_CONV ? launch_tc_conv_bf16(vw, bn, p, stream) : launch_tc_cat_bf16(vw, bn, p, stream);
}

int launch_igemm_wgmma(DType dt, int kind, int bn, GemmParams p, cudaStream_t stream, bool tma) {
  return dt == DType::F16 ? launch_wgmma_f16(kind, bn, p, stream, tma) : launch_wgmma_bf16(kind, bn, p, stream, tma);
}

// ---------------------------------------------------------------------------------------------------------
// SIMT implicit GEMM: 64x64 tile, BK=16, 256 threads with a 4x4 micro-tile each. Operands are converted to
// fp32 when they are staged in shared memory (k-major, so the inner loop reads float4 of A and of B).
namespace {
constexpr int S_BM = 64, S_BN = 64, S_BK = 16, S_NT = 256;

template <typename T, int KIND>
__global__ void __launch_bounds__(S_NT) igemm_simt_kernel(const GemmParams p) {
  __shared__ __align__(16) float As[2][S_BK][S_BM + 4];
  __shared__ __align__(16) float Bs[2][S_BK][S_BN + 4];
  __shared__ int4 rows[S_BM];
  __shared__ ChildTab tab;

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const TileOrigin to = tile_origin(p, S_BM, S_BN);
  const int bm = to.bm, g = to.g;
  const int n0 = to.n0;  // first output channel of the tile, within group g
  const int cbase = g * p.Cin_g;
  const T* wg = static_cast<const T*>(p.w) + (long long)g * p.Cout_g * p.K;

  build_tables(p, rows, tab, bm, S_BM, tid, S_NT);
  __syncthreads();

  const int KT = (p.K + S_BK - 1) / S_BK;
  const int kk = tid % S_BK;
  const int r0 = tid / S_BK;  // 0..15; rows r0 + 16 i
  float ra[4], rb[4];
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  auto load_regs = [&](int kt) {
    const int k = kt * S_BK + kk;
    const KSrc d = decompose_k<KIND>(k, p, tab, cbase);
    const T* base = reinterpret_cast<const T*>(tab.ptr[d.child]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const long long off = a_offset(d, rows[r0 + 16 * i], p, tab);
      ra[i] = off >= 0 ? load_f(base, off) : 0.f;
      const int n = n0 + r0 + 16 * i;
      rb[i] = (d.ok && n < p.Cout_g) ? load_f(wg, (long long)n * p.K + k) : 0.f;
    }
  };
  auto store_regs = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      As[buf][kk][r0 + 16 * i] = ra[i];
      Bs[buf][kk][r0 + 16 * i] = rb[i];
    }
  };

  load_regs(0);
  store_regs(0);
  __syncthreads();
  for (int kt = 0; kt < KT; ++kt) {
    const int buf = kt & 1;
    const bool more = kt + 1 < KT;
    if (more) load_regs(kt + 1);
#pragma unroll
    for (int k = 0; k < S_BK; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&As[buf][k][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[buf][k][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w};
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    if (more) store_regs(buf ^ 1);  // last read in iteration kt-1, closed by that iteration's barrier
    __syncthreads();
  }

  const T* res = static_cast<const T*>(p.res);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = bm + ty * 4 + i;
    if (m >= p.M) continue;
    const long long roff = res != nullptr ? res_offset(p, m) : 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = n0 + tx * 4 + j;
      if (col >= p.Cout_g) continue;
      const int co = g * p.Cout_g + col;
      float v = acc[i][j];
      if (p.bias != nullptr) v += p.bias[co];
      if (res != nullptr) v += load_f(res, roff + co);
      if (p.relu) v = v < 0.f ? 0.f : v;
      y[(long long)m * p.Cout + co] = Num<T>::from_f(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Direct conv for grouped convs with few channels per group (4 in DLA-X / Res2NeXt), where a GEMM tile
// would be mostly padding. Block = 32 output channels x 128 output pixels; a thread computes 4 adjacent
// output channels of one pixel at a time (8 channel quads x 32 pixels per pass, 4 passes). With WSMEM the
// block's weights are staged as fp32 [k][32 channels], so a warp reads them as broadcast float4s.
constexpr int D_NT = 256, D_CT = 32, D_PIX = 128;

template <typename T, bool WSMEM>
__global__ void __launch_bounds__(D_NT) direct_conv_kernel(const GemmParams p) {
  extern __shared__ __align__(16) float ws[];  // WSMEM: [K][D_CT]
  const int tid = threadIdx.x;
  const int q = tid & 7;
  const int pl = tid >> 3;
  const int ct = blockIdx.y * D_CT;
  const T* w = static_cast<const T*>(p.w);
  const T* x = static_cast<const T*>(p.src[0]);
  if constexpr (WSMEM) {
    for (int i = tid; i < p.K * D_CT; i += D_NT) {
      const int k = i / D_CT;
      const int co = ct + (i - k * D_CT);
      ws[i] = co < p.Cout ? load_f(w, (long long)co * p.K + k) : 0.f;
    }
    __syncthreads();
  }
  const int co0 = ct + q * 4;
  if (co0 >= p.Cout) return;  // no barrier below this point
  // Four adjacent channels share one group whenever Cout_g % 4 == 0 (co0 is a multiple of 4): then each
  // input value is loaded once for 4 FMAs.
  const bool same_group = (p.Cout_g % 4) == 0;
  const int hw = p.Ho * p.Wo;
  const long long sn = p.sn[0], sh = p.sh[0], sw = p.sw[0];
  const T* res = static_cast<const T*>(p.res);
  T* y = static_cast<T*>(p.y);

  for (int it = 0; it < D_PIX / 32; ++it) {
    const int m = blockIdx.x * D_PIX + it * 32 + pl;
    if (m >= p.M) break;
    const int n = m / hw;
    const int rem = m - n * hw;
    const int ho = rem / p.Wo;
    const int wo = rem - ho * p.Wo;
    const int hi0 = ho * p.sth - p.padh;
    const int wi0 = wo * p.stw - p.padw;
    const T* xn = x + (long long)n * sn;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (same_group) {
      const int cb = (co0 / p.Cout_g) * p.Cin_g;
      for (int r = 0; r < p.kh; ++r) {
        const int hi = hi0 + r;
        if ((unsigned)hi >= (unsigned)p.H) continue;
        for (int s = 0; s < p.kw; ++s) {
          const int wi = wi0 + s;
          if ((unsigned)wi >= (unsigned)p.W) continue;
          const T* xp = xn + (long long)hi * sh + (long long)wi * sw + cb;
          const int kb = (r * p.kw + s) * p.Cin_g;
          for (int c = 0; c < p.Cin_g; ++c) {
            const float xv = load_f(xp, c);
            if constexpr (WSMEM) {
              const float4 wv = *reinterpret_cast<const float4*>(&ws[(kb + c) * D_CT + q * 4]);
              acc[0] = fmaf(xv, wv.x, acc[0]);
              acc[1] = fmaf(xv, wv.y, acc[1]);
              acc[2] = fmaf(xv, wv.z, acc[2]);
              acc[3] = fmaf(xv, wv.w, acc[3]);
            } else {
#pragma unroll
              for (int j = 0; j < 4; ++j)
                acc[j] = fmaf(xv, load_f(w, (long long)(co0 + j) * p.K + kb + c), acc[j]);
            }
          }
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int co = co0 + j;
        if (co < p.Cout) {
          const int cb = (co / p.Cout_g) * p.Cin_g;
          for (int r = 0; r < p.kh; ++r) {
            const int hi = hi0 + r;
            if ((unsigned)hi >= (unsigned)p.H) continue;
            for (int s = 0; s < p.kw; ++s) {
              const int wi = wi0 + s;
              if ((unsigned)wi >= (unsigned)p.W) continue;
              const T* xp = xn + (long long)hi * sh + (long long)wi * sw + cb;
              const int kb = (r * p.kw + s) * p.Cin_g;
              for (int c = 0; c < p.Cin_g; ++c) {
                const float wv = WSMEM ? ws[(kb + c) * D_CT + q * 4 + j] : load_f(w, (long long)co * p.K + kb + c);
                acc[j] = fmaf(load_f(xp, c), wv, acc[j]);
              }
            }
          }
        }
      }
    }
    const long long roff = res != nullptr ? (long long)n * p.rsn + (long long)ho * p.rsh + (long long)wo * p.rsw : 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int co = co0 + j;
      if (co < p.Cout) {
        float v = acc[j];
        if (p.bias != nullptr) v += p.bias[co];
        if (res != nullptr) v += load_f(res, roff + co);
        if (p.relu) v = v < 0.f ? 0.f : v;
        y[(long long)m * p.Cout + co] = Num<T>::from_f(v);
      }
    }
  }
}

template <typename T, int KIND>
void run_simt(GemmParams p, cudaStream_t stream) {
  p.ntiles_n = (p.Cout_g + S_BN - 1) / S_BN;
  igemm_simt_kernel<T, KIND><<<tile_grid(p, S_BM), S_NT, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_direct(GemmParams p, cudaStream_t stream) {
  p.ntiles_n = 1;
  const dim3 grid((p.M + D_PIX - 1) / D_PIX, (p.Cout + D_CT - 1) / D_CT);
  const size_t wbytes = (size_t)p.K * D_CT * sizeof(float);
  if (wbytes <= 48 * 1024) {
    direct_conv_kernel<T, true><<<grid, D_NT, wbytes, stream>>>(p);
  } else {
    direct_conv_kernel<T, false><<<grid, D_NT, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

void launch_igemm_simt(DType dt, int kind, GemmParams p, cudaStream_t stream) {
  switch (dt) {
    case DType::F16:
      return kind == KIND_CONV ? run_simt<__half, KIND_CONV>(p, stream) : run_simt<__half, KIND_CAT>(p, stream);
    case DType::BF16:
      return kind == KIND_CONV ? run_simt<__nv_bfloat16, KIND_CONV>(p, stream)
                               : run_simt<__nv_bfloat16, KIND_CAT>(p, stream);
    case DType::F32:
      return kind == KIND_CONV ? run_simt<float, KIND_CONV>(p, stream) : run_simt<float, KIND_CAT>(p, stream);
  }
}

void launch_direct_conv(DType dt, GemmParams p, cudaStream_t stream) {
  switch (dt) {
    case DType::F16: return run_direct<__half>(p, stream);
    case DType::BF16: return run_direct<__nv_bfloat16>(p, stream);
    case DType::F32: return run_direct<float>(p, stream);
  }
}

}  // namespace dla_fast
