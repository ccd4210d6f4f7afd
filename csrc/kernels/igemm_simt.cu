// SIMT implicit GEMM for both ops (KIND_CONV, KIND_CAT) on CUDA cores, fp32 FMA accumulation: the fp32 path
// (IEEE results, no TF32) and the fallback for any dtype or alignment the tensor-core kernels cannot take.
#include <c10/cuda/CUDAException.h>

#include "kernels/common.cuh"

namespace dla_fast {

// 64x64 tile, BK=16, 256 threads with a 4x4 micro-tile each. Operands are converted to
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

template <typename T, int KIND>
void run_simt(GemmParams p, cudaStream_t stream) {
  p.ntiles_n = (p.Cout_g + S_BN - 1) / S_BN;
  igemm_simt_kernel<T, KIND><<<tile_grid(p, S_BM), S_NT, 0, stream>>>(p);
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

}  // namespace dla_fast
