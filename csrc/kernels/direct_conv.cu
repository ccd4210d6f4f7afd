// Direct convolution on CUDA cores for grouped convs with few channels per group (4 in DLA-X / Res2NeXt),
// where a GEMM tile would be mostly padding. Any dtype, fp32 accumulation.
#include <c10/cuda/CUDAException.h>

#include "kernels/common.cuh"

namespace dla_fast {

namespace {
// Block = 32 output channels x 128 output pixels; a thread computes 4 adjacent
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

void launch_direct_conv(DType dt, GemmParams p, cudaStream_t stream) {
  switch (dt) {
    case DType::F16: return run_direct<__half>(p, stream);
    case DType::BF16: return run_direct<__nv_bfloat16>(p, stream);
    case DType::F32: return run_direct<float>(p, stream);
  }
}

}  // namespace dla_fast
