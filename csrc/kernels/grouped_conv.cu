// Grouped 3x3 convolution with 8 channels in and out per group (DLA-X and Res2NeXt layers), on CUDA cores. A
// GEMM tile would be mostly padding here, and the direct kernel (direct_conv.cu) reads its inputs one
// scalar at a time; this one is built around the two facts of these layers:
//   * a group's 8 input channels of one pixel are one 16-byte vector (two for fp32), so a tap is one load;
//   * all 32 lanes of a warp work on the same group (32 pixels each), so the weights come from shared
//     memory as broadcast float4s, and each is used for P = 2 pixels (8 FMAs per shared load).
// A block is 8 warps = 8 consecutive groups, so the 8 warps together read whole cache lines of a pixel.
// (Groups of 4 channels stay on the direct kernel, which is faster for them: see grouped_supported.)
#include <c10/cuda/CUDAException.h>

#include "kernels/common.cuh"

namespace dla_fast {
namespace {

constexpr int GC_WARPS = 8, GC_P = 2;

// The raw bits of G elements (held as 32-bit words) and their fp32 values: the kernel issues all of a
// pixel's tap loads first and converts afterwards, so that 9 loads per pixel are in flight at once.
template <typename T, int G>
struct Raw {
  static constexpr int WORDS = G * (int)sizeof(T) / 4;
  uint32_t w[WORDS];
};

template <typename T, int G>
__device__ __forceinline__ void load_raw(const T* p, Raw<T, G>& r) {
  static_assert(Raw<T, G>::WORDS % 4 == 0, "a group is loaded as whole 16-byte vectors");
#pragma unroll
  for (int i = 0; i < Raw<T, G>::WORDS; i += 4) {
    const uint4 q = *reinterpret_cast<const uint4*>(reinterpret_cast<const uint32_t*>(p) + i);
    r.w[i] = q.x, r.w[i + 1] = q.y, r.w[i + 2] = q.z, r.w[i + 3] = q.w;
  }
}

template <typename T, int G>
__device__ __forceinline__ void unpack(const Raw<T, G>& r, float (&v)[G]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < G; ++i) v[i] = __uint_as_float(r.w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < G / 2; ++i) {
      v[2 * i] = Num<T>::bits_to_f(static_cast<uint16_t>(r.w[i] & 0xffffu));
      v[2 * i + 1] = Num<T>::bits_to_f(static_cast<uint16_t>(r.w[i] >> 16));
    }
  }
}

template <typename T, int G>
__device__ __forceinline__ void store_group(T* p, const float (&v)[G]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < G; i += 4) *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  } else {
    static_assert(G == 8, "16-bit groups are stored as one 16-byte vector");
    uint32_t w[G / 2];
#pragma unroll
    for (int i = 0; i < G / 2; ++i)
      w[i] = static_cast<uint32_t>(Num<T>::f_to_bits(v[2 * i])) |
             (static_cast<uint32_t>(Num<T>::f_to_bits(v[2 * i + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// A KS x KS kernel known at compile time (DLA's grouped convs are all 3x3): the tap loops unroll, so that every
// tap's load is issued before the first FMA.
template <typename T, int G, int KS>
__global__ void __launch_bounds__(GC_WARPS * 32) grouped_conv_kernel(const GemmParams p) {
  extern __shared__ __align__(16) float ws[];  // [GC_WARPS][tap][ci][co] fp32
  const int taps = p.kh * p.kw;
  const int per_group = taps * G * G;
  // 1-D grid, the group blocks of one pixel tile adjacent: the blocks that share a pixel's cache lines run
  // at the same time (pixel tiles first made each input line come from DRAM once per group block).
  const int nblk_g = (p.groups + GC_WARPS - 1) / GC_WARPS;
  const int tile = blockIdx.x / nblk_g;
  const int g_first = (blockIdx.x - tile * nblk_g) * GC_WARPS;
  const T* w = static_cast<const T*>(p.w);  // [Cout][kh][kw][G]
  for (int i = threadIdx.x; i < GC_WARPS * per_group; i += blockDim.x) {
    const int gl = i / per_group;
    int rem = i - gl * per_group;
    const int t = rem / (G * G);
    rem -= t * G * G;
    const int ci = rem / G;
    const int o = rem - ci * G;
    const int g = g_first + gl;
    ws[i] = g < p.groups ? load_f(w, (long long)(g * G + o) * p.K + t * G + ci) : 0.f;
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = g_first + warp;
  if (g >= p.groups) return;  // no barrier below
  const float* wg = ws + warp * per_group;
  const T* x = static_cast<const T*>(p.src[0]);
  const long long sn = p.sn[0], sh = p.sh[0], sw = p.sw[0];
  const int hw = p.Ho * p.Wo;

  int m[GC_P], hi0[GC_P], wi0[GC_P], ho[GC_P], wo[GC_P], nn[GC_P];
  const T* xb[GC_P];
  float acc[GC_P][G];
#pragma unroll
  for (int j = 0; j < GC_P; ++j) {
    m[j] = tile * (32 * GC_P) + j * 32 + lane;
    const int mc = m[j] < p.M ? m[j] : p.M - 1;  // out-of-range pixels compute a valid one, never stored
    nn[j] = mc / hw;
    const int rem = mc - nn[j] * hw;
    ho[j] = rem / p.Wo;
    wo[j] = rem - ho[j] * p.Wo;
    hi0[j] = ho[j] * p.sth - p.padh;
    wi0[j] = wo[j] * p.stw - p.padw;
    xb[j] = x + (long long)nn[j] * sn + g * G;
#pragma unroll
    for (int o = 0; o < G; ++o) acc[j][o] = 0.f;
  }

  // One tap of both pixels: the group's G channels (zeros in the halo) times the tap's G x G weights.
  auto load_tap = [&](int r, int s, Raw<T, G> (&raw)[GC_P]) {
#pragma unroll
    for (int j = 0; j < GC_P; ++j) {
      const int hi = hi0[j] + r, wi = wi0[j] + s;
      if ((unsigned)hi < (unsigned)p.H && (unsigned)wi < (unsigned)p.W) {
        load_raw<T, G>(xb[j] + (long long)hi * sh + (long long)wi * sw, raw[j]);
      } else {
#pragma unroll
        for (int c = 0; c < Raw<T, G>::WORDS; ++c) raw[j].w[c] = 0u;
      }
    }
  };
  auto fma_tap = [&](int tap, const Raw<T, G> (&raw)[GC_P]) {
    float xv[GC_P][G];
#pragma unroll
    for (int j = 0; j < GC_P; ++j) unpack<T, G>(raw[j], xv[j]);
    const float* wt = wg + tap * G * G;
#pragma unroll
    for (int ci = 0; ci < G; ++ci) {
#pragma unroll
      for (int o4 = 0; o4 < G; o4 += 4) {
        const float4 wv = *reinterpret_cast<const float4*>(wt + ci * G + o4);
#pragma unroll
        for (int j = 0; j < GC_P; ++j) {
          acc[j][o4] = fmaf(xv[j][ci], wv.x, acc[j][o4]);
          acc[j][o4 + 1] = fmaf(xv[j][ci], wv.y, acc[j][o4 + 1]);
          acc[j][o4 + 2] = fmaf(xv[j][ci], wv.z, acc[j][o4 + 2]);
          acc[j][o4 + 3] = fmaf(xv[j][ci], wv.w, acc[j][o4 + 3]);
        }
      }
    }
  };
  Raw<T, G> raw[KS * KS][GC_P];
#pragma unroll
  for (int t = 0; t < KS * KS; ++t) load_tap(t / KS, t % KS, raw[t]);
#pragma unroll
  for (int t = 0; t < KS * KS; ++t) fma_tap(t, raw[t]);

  const T* res = static_cast<const T*>(p.res);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int j = 0; j < GC_P; ++j) {
    if (m[j] >= p.M) continue;
    const long long roff = (long long)nn[j] * p.rsn + (long long)ho[j] * p.rsh + (long long)wo[j] * p.rsw + g * G;
    float v[G];
#pragma unroll
    for (int o = 0; o < G; ++o) {
      float t = acc[j][o];
      if (p.bias != nullptr) t += p.bias[g * G + o];
      if (res != nullptr) t += load_f(res, roff + o);
      if (p.relu) t = t < 0.f ? 0.f : t;  // NaN stays NaN, like torch.relu
      v[o] = t;
    }
    store_group<T, G>(y + (long long)m[j] * p.Cout + g * G, v);
  }
}

template <typename T, int G>
void run_grouped(const GemmParams& p, cudaStream_t stream) {
  const long long blocks = (long long)((p.M + 32 * GC_P - 1) / (32 * GC_P)) * ((p.groups + GC_WARPS - 1) / GC_WARPS);
  TORCH_CHECK(blocks < (1LL << 31), "dla_fast::conv_bn_act: this grouped conv needs more thread blocks than one "
              "launch allows; run it on smaller batches (split the input along N)");
  const dim3 grid(static_cast<unsigned>(blocks));
  const size_t smem = (size_t)GC_WARPS * p.kh * p.kw * G * G * sizeof(float);
  grouped_conv_kernel<T, G, 3><<<grid, GC_WARPS * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_grouped_g(const GemmParams& p, cudaStream_t stream) {
  run_grouped<T, 8>(p, stream);
}

}  // namespace

bool grouped_supported(const GemmParams& p, int x_vw, int elem_size) {
  const int G = p.Cin_g;
  // 8 channels a group only: with 4 (DLA-X's 128-channel stages) the direct kernel is faster on nearly every such
  // shape on the H100, while this one is 1.2-1.8x faster than it on every 8-channel one.
  if (p.groups < 2 || G != p.Cout_g || G != 8 || p.kh != 3 || p.kw != 3) return false;
  // one group's channels are loaded in chunks of min(16, G * elem_size) bytes: x_vw (elements, from the
  // host's alignment check of data pointer and strides) must cover a chunk
  const int chunk_elems = (G * elem_size >= 16 ? 16 : G * elem_size) / elem_size;
  return x_vw >= chunk_elems;
}

void launch_grouped_conv(DType dt, const GemmParams& p, cudaStream_t stream) {
  switch (dt) {
    case DType::F16: return run_grouped_g<__half>(p, stream);
    case DType::BF16: return run_grouped_g<__nv_bfloat16>(p, stream);
    case DType::F32: return run_grouped_g<float>(p, stream);
  }
}

}  // namespace dla_fast
