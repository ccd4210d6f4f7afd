// Interface between the host-side ops (ops/*.cpp, compiled by the host compiler with ATen) and the kernels
// (kernels/*.cu and the generated instantiations/*.cu, compiled by nvcc without ATen, which keeps nvcc's share of
// the build short). Only plain C++ types cross this boundary.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace dla_fast {

constexpr int kMaxChildren = 8;

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

// KIND_CONV: A[m][k] is the implicit-GEMM gather of one NHWC tensor over the kh x kw taps.
// KIND_CAT:  A[m][k] walks the children one after another along K (1x1 conv over a virtual concat).
constexpr int KIND_CONV = 0;
constexpr int KIND_CAT = 1;

// Everything is in elements, not bytes. Inputs are NHWC with channel stride 1 and arbitrary N/H/W strides
// (so channel slices from torch.split need no copy); the output is dense NHWC [M][Cout].
struct GemmParams {
  const void* src[kMaxChildren];
  long long sn[kMaxChildren], sh[kMaxChildren], sw[kMaxChildren];
  int koff[kMaxChildren + 1];  // KIND_CAT: child i owns k in [koff[i], koff[i+1])
  int nchild;

  int N, H, W;    // input batch/spatial
  int Ho, Wo;     // output spatial
  int kh, kw, sth, stw, padh, padw;
  int groups, Cin_g, Cout_g, Cout;
  int K;          // kh * kw * Cin_g (conv) or sum C_i (cat)
  int M;          // N * Ho * Wo

  const void* w;  // [Cout][K], K contiguous (the channels_last weight memory order)
  const float* bias;  // [Cout] or nullptr
  const void* res;    // residual, NHWC strided like the inputs, or nullptr
  long long rsn, rsh, rsw;
  void* y;        // [M][Cout]
  int relu;
  int ntiles_n;   // output-channel tiles per group (filled by the launcher)
  // Block-diagonal mode (tensor-core conv kernel only): > 0 when a grouped conv with 2^bd_log2 channels a
  // group runs as a dense GEMM over super-groups (groups/Cin_g/Cout_g/K above describe the super-groups); w is
  // then the real grouped weight [Cout][kh][kw][2^bd_log2] and B reads zeros off the diagonal blocks.
  int bd_log2;
};

// The far corner of an im2col tensor map's window box along one spatial dim (the near one is -pad): the window
// corner of the last output pixel, as an offset from the last input pixel (in - 1), so that stepping the box by
// the conv stride visits exactly the `out` output positions.
inline int im2col_upper(int out, int stride, int in, int pad) { return (out - 1) * stride + 1 - in - pad; }

// Whether the wgmma kernel can load a conv's A by TMA in im2col mode (igemm_wgmma.cuh; the 192x256 tile always
// does, the 64/128-wide tiles where the config or the rule asks for it). That needs a dense conv whose k tiles of 64
// never span two taps (Cin % 64 == 0), a 16-byte aligned input with strides of whole 16-byte units, and the
// window corners and steps the tensor map can hold (4-D maps: corners in [-128, 127], element strides up to 8).
// Size-1 dims carry stride 0 here and are never stepped.
inline bool im2col_ok(const GemmParams& p) {
  auto st_ok = [](long long s, int size) { return size == 1 || (s > 0 && s % 8 == 0); };
  auto corner_ok = [](int c) { return c >= -128 && c <= 127; };
  return p.groups == 1 && p.bd_log2 == 0 && p.Cin_g % 64 == 0 &&
         reinterpret_cast<uintptr_t>(p.src[0]) % 16 == 0 && reinterpret_cast<uintptr_t>(p.w) % 16 == 0 &&
         st_ok(p.sw[0], p.W) && st_ok(p.sh[0], p.H) && st_ok(p.sn[0], p.N) && p.stw <= 8 && p.sth <= 8 &&
         corner_ok(-p.padw) && corner_ok(-p.padh) && corner_ok(im2col_upper(p.Wo, p.stw, p.W, p.padw)) &&
         corner_ok(im2col_upper(p.Ho, p.sth, p.H, p.padh));
}

// Tensor-core (mma.sync m16n8k16) implicit GEMM for fp16/bf16 (kernels/igemm_tc.cuh, instantiated per dtype in
// instantiations/). `vw` is the gather vector width in elements
// (8, 4 or 1) that the caller verified alignment for; `bn` the preferred output-channel tile (16..128).
// Returns the tile actually used.
int launch_igemm_tc(DType dt, int kind, int vw, int bn, GemmParams p, cudaStream_t stream);

// Hopper (sm_90a) wgmma implicit GEMM for fp16/bf16 (kernels/igemm_wgmma.cuh, instantiations/), 16-byte gather
// only (every channel run a multiple of 8, 16-byte aligned); `bn` 16, 32, 64, 128 or 256 (the 192x256 tile, dense
// only) for convs (p.bd_log2 > 0: block-diagonal, 32), 64 or 128 for the aggregation. `tma` (convs with bn 64/128 where im2col_ok(); bn 256
// always): A and B by TMA instead of the cp.async gather. Returns the tile used. Only valid where
// wgmma_usable() (host_utils.h).
int launch_igemm_wgmma(DType dt, int kind, int bn, GemmParams p, cudaStream_t stream, bool tma = false);

// CUDA-core implicit GEMM (fp32 FMA accumulation) for any dtype: the fp32 path and the generic fallback
// (kernels/igemm_simt.cu).
void launch_igemm_simt(DType dt, int kind, GemmParams p, cudaStream_t stream);

// Direct convolution on CUDA cores for grouped convs with few channels per group (kernels/direct_conv.cu).
void launch_direct_conv(DType dt, GemmParams p, cudaStream_t stream);

// Grouped 3x3 convs with 8 channels in and out per group, vector loads of a group's channels
// (kernels/grouped_conv.cu).
// x_vw: the gather vector width (elements) that x's pointer and strides allow (host_utils.h nhwc_vw).
bool grouped_supported(const GemmParams& p, int x_vw, int elem_size);
void launch_grouped_conv(DType dt, const GemmParams& p, cudaStream_t stream);

// The RGB stem (7x7, 3 -> 16, stride 1, padding 3, no residual): a shared-memory direct convolution
// (kernels/rgb_stem_conv.cu).
bool stem_supported(const GemmParams& p, bool has_residual);
void launch_stem_conv(DType dt, const GemmParams& p, cudaStream_t stream);

// k x k max pooling, stride k, no padding, floor mode (kernels/max_pool.cu). `vw`: elements a thread loads at once, 16
// bytes' worth (8 for 16-bit types, 4 for fp32) where the channels, pointer and strides allow it, else 1.
struct MaxPoolParams {
  const void* x;
  long long sn, sh, sw;  // x's N/H/W strides in elements; channel stride 1
  void* y;               // dense NHWC [N][Ho][Wo][C]
  int N, C, Ho, Wo, k;
};
void launch_max_pool(DType dt, int vw, const MaxPoolParams& p, cudaStream_t stream);

}  // namespace dla_fast
