// The RGB stem (7x7, 3 -> 16 channels, stride 1, padding 3): a direct convolution on CUDA cores.
//
// Why not the implicit GEMM: with 3 input channels a K step gathers 2-byte elements one by one (no vector
// loads, no cp.async), which runs the stem at about half cuDNN's speed in both backends. Its arithmetic is small
// (60 GFLOP per 256 images, about 1 ms of fp32 FMA on an H100), so a CUDA-core kernel that stages each input
// tile in shared memory once and reuses every value K*K*COUT times can sit near that FMA bound.
//
// Block: a TH x TW tile of output pixels of one image, 256 threads, each thread PX consecutive pixels of one
// row (so a loaded input value serves PX pixels at different kernel columns). Shared memory holds the input
// patch (zero halo) as fp32 and the weights as [r][s][c][co] fp32 (read as broadcast float4). fp32
// accumulation for every dtype.
#include <c10/cuda/CUDAException.h>

#include "kernels/common.cuh"

namespace dla_fast {
namespace {

constexpr int ST_TH = 32, ST_TW = 32, ST_PX = 4;
constexpr int ST_NT = (ST_TW / ST_PX) * ST_TH;  // 256 threads

template <typename T, int K, int CIN, int COUT>
__global__ void __launch_bounds__(ST_NT, 2) stem_conv_kernel(const GemmParams p) {
  constexpr int PAD = K / 2;
  constexpr int PH = ST_TH + K - 1, PW = ST_TW + K - 1;
  // +1: consecutive thread rows then start in different banks (the rows of a warp read conflict-free).
  constexpr int PITCH = PW * CIN + 1;
  constexpr int KT = K * K * CIN;
  static_assert(COUT % 4 == 0, "float4 weight reads");
  __shared__ float patch[PH * PITCH];
  __shared__ __align__(16) float wsm[KT * COUT];
  __shared__ float bsm[COUT];

  const int tid = threadIdx.x;
  const int n = blockIdx.z;
  const int oh0 = blockIdx.y * ST_TH, ow0 = blockIdx.x * ST_TW;
  const T* __restrict__ x = static_cast<const T*>(p.src[0]);
  const T* __restrict__ w = static_cast<const T*>(p.w);  // [COUT][K][K][CIN]

  for (int i = tid; i < KT * COUT; i += ST_NT) {
    const int co = i % COUT, k = i / COUT;
    wsm[i] = Num<T>::to_f(w[co * KT + k]);
  }
  if (tid < COUT) bsm[tid] = p.bias != nullptr ? p.bias[tid] : 0.f;
  const long long xbase = (long long)n * p.sn[0];
  for (int i = tid; i < PH * PW * CIN; i += ST_NT) {
    const int pr = i / (PW * CIN), rem = i - pr * (PW * CIN);
    const int ih = oh0 - PAD + pr, iw = ow0 - PAD + rem / CIN, c = rem % CIN;
    float v = 0.f;
    if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) v = Num<T>::to_f(x[xbase + ih * p.sh[0] + iw * p.sw[0] + c]);
    patch[pr * PITCH + rem] = v;
  }
  __syncthreads();

  const int tx = tid % (ST_TW / ST_PX), ty = tid / (ST_TW / ST_PX);
  float acc[ST_PX][COUT];
#pragma unroll
  for (int j = 0; j < ST_PX; ++j)
#pragma unroll
    for (int co = 0; co < COUT; ++co) acc[j][co] = 0.f;

#pragma unroll 1
  for (int r = 0; r < K; ++r) {
    const float* prow = patch + (ty + r) * PITCH + tx * ST_PX * CIN;
#pragma unroll
    for (int c = 0; c < CIN; ++c) {
      float v[ST_PX + K - 1];
#pragma unroll
      for (int j = 0; j < ST_PX + K - 1; ++j) v[j] = prow[j * CIN + c];
#pragma unroll
      for (int s = 0; s < K; ++s) {
        const float4* wv = reinterpret_cast<const float4*>(wsm + ((r * K + s) * CIN + c) * COUT);
#pragma unroll
        for (int q = 0; q < COUT / 4; ++q) {
          const float4 w4 = wv[q];
#pragma unroll
          for (int j = 0; j < ST_PX; ++j) {
            acc[j][4 * q + 0] = fmaf(v[j + s], w4.x, acc[j][4 * q + 0]);
            acc[j][4 * q + 1] = fmaf(v[j + s], w4.y, acc[j][4 * q + 1]);
            acc[j][4 * q + 2] = fmaf(v[j + s], w4.z, acc[j][4 * q + 2]);
            acc[j][4 * q + 3] = fmaf(v[j + s], w4.w, acc[j][4 * q + 3]);
          }
        }
      }
    }
  }

  const int oh = oh0 + ty;
  if (oh >= p.Ho) return;
  T* __restrict__ y = static_cast<T*>(p.y);
  constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte store; COUT * sizeof(T) is a multiple of 16
  static_assert((COUT * sizeof(T)) % 16 == 0, "16-byte output stores");
#pragma unroll
  for (int j = 0; j < ST_PX; ++j) {
    const int ow = ow0 + tx * ST_PX + j;
    if (ow >= p.Wo) break;
    alignas(16) T out[COUT];
#pragma unroll
    for (int co = 0; co < COUT; ++co) {
      float v = acc[j][co] + bsm[co];
      if (p.relu) v = v < 0.f ? 0.f : v;
      out[co] = Num<T>::from_f(v);
    }
    const long long m = ((long long)n * p.Ho + oh) * p.Wo + ow;
    uint4* dst = reinterpret_cast<uint4*>(y + m * COUT);
#pragma unroll
    for (int q = 0; q < COUT / VEC; ++q) dst[q] = reinterpret_cast<const uint4*>(out)[q];
  }
}

template <typename T>
void run_stem(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid((p.Wo + ST_TW - 1) / ST_TW, (p.Ho + ST_TH - 1) / ST_TH, p.N);
  stem_conv_kernel<T, 7, 3, 16><<<grid, ST_NT, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

bool stem_supported(const GemmParams& p, bool has_residual) {
  return !has_residual && p.groups == 1 && p.Cin_g == 3 && p.Cout == 16 && p.kh == 7 && p.kw == 7 && p.sth == 1 &&
         p.stw == 1 && p.padh == 3 && p.padw == 3 && p.N <= 65535;
}

void launch_stem_conv(DType dt, const GemmParams& p, cudaStream_t stream) {
  switch (dt) {
    case DType::F16: run_stem<__half>(p, stream); break;
    case DType::BF16: run_stem<__nv_bfloat16>(p, stream); break;
    case DType::F32: run_stem<float>(p, stream); break;
  }
}

}  // namespace dla_fast
