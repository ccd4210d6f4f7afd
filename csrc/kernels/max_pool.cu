// k x k max pooling with stride k, no padding, floor mode (the DLA trees' downsampling) of an NHWC input with
// channel stride 1 into a dense NHWC output. Like torch's max_pool2d, the first maximum of a window wins and NaN
// propagates; the result is exact in every dtype (a maximum is one of the inputs, and fp16/bf16 round-trip
// through fp32 exactly). Memory-bound: a thread owns VW channels of one output pixel, consecutive threads
// consecutive channels, so a warp reads whole lines of an input pixel.
#include <c10/cuda/CUDAException.h>

#include "kernels/common.cuh"

namespace dla_fast {

namespace {
constexpr int MP_NT = 256;

template <typename T, int VW>
__global__ void __launch_bounds__(MP_NT) max_pool_kernel(const MaxPoolParams p) {
  static_assert(VW == 1 || VW * sizeof(T) == 16, "a thread loads one element or one 16-byte vector");
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const long long cv = p.C / VW;  // vectors per pixel
  const long long total = (long long)p.N * p.Ho * p.Wo * cv;
  for (long long i = (long long)blockIdx.x * MP_NT + threadIdx.x; i < total; i += (long long)gridDim.x * MP_NT) {
    const long long pix = i / cv;
    const int c = static_cast<int>(i - pix * cv) * VW;
    const int wo = static_cast<int>(pix % p.Wo);
    const long long t = pix / p.Wo;
    const int ho = static_cast<int>(t % p.Ho);
    const long long n = t / p.Ho;
    const T* src = x + n * p.sn + (long long)ho * p.k * p.sh + (long long)wo * p.k * p.sw + c;
    float best[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) best[e] = __int_as_float(0xff800000);  // -inf
    for (int r = 0; r < p.k; ++r) {
      for (int s = 0; s < p.k; ++s) {
        alignas(16) T v[VW];
        const T* q = src + (long long)r * p.sh + (long long)s * p.sw;
        if constexpr (VW == 1) {
          v[0] = *q;
        } else {
          *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(q);
        }
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const float f = Num<T>::to_f(v[e]);
          if (f > best[e] || f != f) best[e] = f;  // torch's test: a larger value or a NaN replaces the maximum
        }
      }
    }
    alignas(16) T out[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) out[e] = Num<T>::from_f(best[e]);
    T* dst = y + pix * p.C + c;
    if constexpr (VW == 1) {
      *dst = out[0];
    } else {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(out);
    }
  }
}

template <typename T, int VW>
void run_max_pool(const MaxPoolParams& p, cudaStream_t stream) {
  const long long total = (long long)p.N * p.Ho * p.Wo * (p.C / VW);
  const long long need = (total + MP_NT - 1) / MP_NT;
  const long long blocks = need < (1LL << 20) ? need : (1LL << 20);  // a grid-stride loop covers the rest
  max_pool_kernel<T, VW><<<static_cast<unsigned>(blocks), MP_NT, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

void launch_max_pool(DType dt, int vw, const MaxPoolParams& p, cudaStream_t stream) {
  switch (dt) {
    case DType::F16: return vw > 1 ? run_max_pool<__half, 8>(p, stream) : run_max_pool<__half, 1>(p, stream);
    case DType::BF16:
      return vw > 1 ? run_max_pool<__nv_bfloat16, 8>(p, stream) : run_max_pool<__nv_bfloat16, 1>(p, stream);
    case DType::F32: return vw > 1 ? run_max_pool<float, 4>(p, stream) : run_max_pool<float, 1>(p, stream);
  }
}

}  // namespace dla_fast
