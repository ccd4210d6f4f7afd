// Host-side launch of the Hopper wgmma kernel (igemm_wgmma.cuh). Only called when the extension was built
// for sm_90a and the device is compute capability 9.x (wgmma_usable() in host_utils.h).
#pragma once

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled, PFN_cuTensorMapEncodeIm2col

#include "kernels/igemm_tc_launch.cuh"
#include "kernels/igemm_wgmma.cuh"

namespace dla_fast {

// A driver function through the runtime (no -lcuda), looked up once per function.
template <typename F>
F driver_fn(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  const cudaError_t e = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &q);
  TORCH_CHECK(e == cudaSuccess && q == cudaDriverEntryPointSuccess && fn != nullptr,
              "dla_fast: the CUDA driver has no ", name, " (", cudaGetErrorString(e),
              "); the TMA wgmma kernels need it: update the driver, or keep to the gathering kernels (a config with ",
              "bn <= 128 and a_load 1, or DLA_FAST_CUDA_IM2COL=0 and DLA_FAST_CUDA_WIDE_BN=128)");
  return reinterpret_cast<F>(fn);
}

// The weight [rows][K] (16-bit, K contiguous) as a TMA tensor map with box_rows x 64 boxes in the 128-byte
// swizzle that the wgmma descriptors name.
inline CUtensorMap weight_tensor_map(const void* w, long long rows, long long K, int box_rows) {
  static const auto encode = driver_fn<PFN_cuTensorMapEncodeTiled_v12000>("cuTensorMapEncodeTiled");
  CUtensorMap map;
  const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)K * 2};  // bytes between rows; K % 8 == 0 on the 16-byte path
  const cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(w), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "dla_fast: cuTensorMapEncodeTiled failed (CUresult ", (int)r, ") for a weight of ",
              rows, " x ", K, " at ", w);
  return map;
}

// The NHWC input as an im2col tensor map for the TMA kernels (im2col_ok() in launch.h holds): dims {C, W,
// H, N}, a window box whose corners are the first and last tap-(0, 0) corner of the output grid, stepped by the
// conv stride, so that pixel after pixel of the box is output pixel after output pixel (rows and images wrap),
// and each box row carries 64 channels of one tap. Size-1 dims have stride 0 in GemmParams (eff_stride); the
// map needs a real one, and any multiple of 16 bytes serves for a dim that is never stepped.
inline CUtensorMap input_im2col_map(const GemmParams& p, int pixels) {
  static const auto encode = driver_fn<PFN_cuTensorMapEncodeIm2col_v12000>("cuTensorMapEncodeIm2col");
  auto stride = [](long long s) { return (cuuint64_t)(s > 0 ? s * 2 : 16); };
  CUtensorMap map;
  const cuuint64_t dims[4] = {(cuuint64_t)p.Cin_g, (cuuint64_t)p.W, (cuuint64_t)p.H, (cuuint64_t)p.N};
  const cuuint64_t strides[3] = {stride(p.sw[0]), stride(p.sh[0]), stride(p.sn[0])};
  const int lower[2] = {-p.padw, -p.padh};
  const int upper[2] = {im2col_upper(p.Wo, p.stw, p.W, p.padw), im2col_upper(p.Ho, p.sth, p.H, p.padh)};
  const cuuint32_t step[4] = {1, (cuuint32_t)p.stw, (cuuint32_t)p.sth, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(p.src[0]), dims, strides, lower,
                            upper, 64, (cuuint32_t)pixels, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "dla_fast: cuTensorMapEncodeIm2col failed (CUresult ", (int)r, ") for an input of ",
              p.N, "x", p.H, "x", p.W, "x", p.Cin_g, " (strides ", p.sn[0], ", ", p.sh[0], ", ", p.sw[0],
              "), kernel ", p.kh, "x", p.kw, ", stride ", p.sth, ", padding ", p.padh,
              "; keep to the gathering kernels with a config of bn <= 128 and a_load 1 (or DLA_FAST_CUDA_IM2COL=0 and ",
              "DLA_FAST_CUDA_WIDE_BN=128)");
  return map;
}

template <typename T, int BN, int KIND, bool BD = false, bool TMA = false>
int run_wgmma(GemmParams p, cudaStream_t stream) {
  using C = WgCfg<BN>;
  auto kern = igemm_wgmma_kernel<T, BN, KIND, BD, TMA>;
  static std::atomic<unsigned long long> done{0};
  opt_in_smem(kern, wgmma_smem_bytes<BN>(C::STAGES), done);  // the most any launch asks for
  const int smem = wgmma_smem_bytes<BN>(wgmma_stages_used<BN>(p.K));
  p.ntiles_n = (p.Cout_g + BN - 1) / BN;
  CUtensorMap amap{}, bmap{};  // TMA kernels only
  if constexpr (TMA) {
    TORCH_CHECK(im2col_ok(p), "dla_fast internal: the TMA wgmma kernel was picked for a conv it cannot run");
    amap = input_im2col_map(p, C::BM);
    bmap = weight_tensor_map(p.w, p.Cout_g, p.K, BN);
  }
  kern<<<tile_grid(p, C::BM), C::NT, smem, stream>>>(p, amap, bmap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return BN;
}

// Convolutions get the narrow tiles for 32 or fewer output channels a group (and the block-diagonal mode, whose
// super-groups are 32 wide); the aggregation node only the wide ones (its outputs are 64+ channels in DLA).
// tma: dense convs on the 64/128-wide tiles with A and B by TMA (the 192x256 tile always has them).
template <typename T>
int dispatch_wgmma(int kind, int bn, const GemmParams& p, cudaStream_t s, bool tma) {
  if (kind == KIND_CONV) {
    if (p.bd_log2 > 0) return run_wgmma<T, 32, KIND_CONV, true>(p, s);
    if (bn <= 16) return run_wgmma<T, 16, KIND_CONV>(p, s);
    if (bn <= 32) return run_wgmma<T, 32, KIND_CONV>(p, s);
    if (bn >= 256) return run_wgmma<T, 256, KIND_CONV, false, true>(p, s);
    if (tma) {
      return bn <= 64 ? run_wgmma<T, 64, KIND_CONV, false, true>(p, s)
                      : run_wgmma<T, 128, KIND_CONV, false, true>(p, s);
    }
    return bn <= 64 ? run_wgmma<T, 64, KIND_CONV>(p, s) : run_wgmma<T, 128, KIND_CONV>(p, s);
  }
  return bn <= 64 ? run_wgmma<T, 64, KIND_CAT>(p, s) : run_wgmma<T, 128, KIND_CAT>(p, s);
}

}  // namespace dla_fast
