// Host-side launch of the Hopper wgmma kernel (igemm_wgmma.cuh). Only called when the extension was built
// for sm_90a and the device is compute capability 9.x (wgmma_usable() in host_utils.h).
#pragma once

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include "igemm_tc_launch.cuh"
#include "igemm_wgmma.cuh"

namespace dla_fast {

// The weight [rows][K] (16-bit, K contiguous) as a TMA tensor map with box_rows x 64 boxes in the 128-byte
// swizzle that the wgmma descriptors name. The driver function comes through the runtime (no -lcuda).
inline CUtensorMap weight_tensor_map(const void* w, long long rows, long long K, int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
    TORCH_CHECK(e == cudaSuccess && q == cudaDriverEntryPointSuccess && fn != nullptr,
                "dla_fast: the CUDA driver has no cuTensorMapEncodeTiled (", cudaGetErrorString(e),
                "); the 192x256 wgmma tile needs it: update the driver, or set DLA_FAST_CUDA_WIDE_BN=128");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)K * 2};  // bytes between rows; K % 8 == 0 on the 16-byte path
  const cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(w), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "dla_fast: cuTensorMapEncodeTiled failed (CUresult ", (int)r, ") for a weight of ",
              rows, " x ", K, " at ", w);
  return map;
}

template <typename T, int BN, int KIND, bool BD = false>
int run_wgmma(GemmParams p, cudaStream_t stream) {
  using C = WgCfg<BN>;
  auto kern = igemm_wgmma_kernel<T, BN, KIND, BD>;
  static std::atomic<unsigned long long> done{0};
  opt_in_smem(kern, wgmma_smem_bytes<BN>(C::STAGES), done);  // the most any launch asks for
  const int smem = wgmma_smem_bytes<BN>(wgmma_stages_used<BN>(p.K));
  p.ntiles_n = (p.Cout_g + BN - 1) / BN;
  CUtensorMap bmap{};  // big tiles only
  if constexpr (C::BIG) {
    TORCH_CHECK(p.groups == 1 && KIND == KIND_CONV, "dla_fast internal: the TMA weight tile is for dense convolutions");
    bmap = weight_tensor_map(p.w, p.Cout_g, p.K, BN);
  }
  kern<<<tile_grid(p, C::BM), C::NT, smem, stream>>>(p, bmap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return BN;
}

// Convolutions get the narrow tiles for 32 or fewer output channels a group (and the block-diagonal mode, whose
// super-groups are 32 wide); the aggregation node only the wide ones (its outputs are 64+ channels in DLA).
template <typename T>
int dispatch_wgmma(int kind, int bn, const GemmParams& p, cudaStream_t s) {
  if (kind == KIND_CONV) {
    if (p.bd_log2 > 0) return run_wgmma<T, 32, KIND_CONV, true>(p, s);
    if (bn <= 16) return run_wgmma<T, 16, KIND_CONV>(p, s);
    if (bn <= 32) return run_wgmma<T, 32, KIND_CONV>(p, s);
    if (bn >= 256) return run_wgmma<T, 256, KIND_CONV>(p, s);
    return bn <= 64 ? run_wgmma<T, 64, KIND_CONV>(p, s) : run_wgmma<T, 128, KIND_CONV>(p, s);
  }
  return bn <= 64 ? run_wgmma<T, 64, KIND_CAT>(p, s) : run_wgmma<T, 128, KIND_CAT>(p, s);
}

}  // namespace dla_fast
