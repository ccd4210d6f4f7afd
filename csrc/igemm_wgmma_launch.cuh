// Host-side launch of the Hopper wgmma kernel (igemm_wgmma.cuh). Only called when the extension was built
// for sm_90a and the device is compute capability 9.x (wgmma_usable() in host_utils.h).
#pragma once

#include "igemm_tc_launch.cuh"
#include "igemm_wgmma.cuh"

namespace dla_fast {

template <typename T, int BN, int KIND, bool BD = false>
int run_wgmma(GemmParams p, cudaStream_t stream) {
  using C = WgCfg<BN>;
  auto kern = igemm_wgmma_kernel<T, BN, KIND, BD>;
  static std::atomic<unsigned long long> done{0};
  opt_in_smem(kern, wgmma_smem_bytes<BN>(C::STAGES), done);  // the most any launch asks for
  const int smem = wgmma_smem_bytes<BN>(wgmma_stages_used<BN>(p.K));
  p.ntiles_n = (p.Cout_g + BN - 1) / BN;
  kern<<<tile_grid(p, C::BM), C::NT, smem, stream>>>(p);
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
