// Host-side launch of the Hopper wgmma kernel (igemm_wgmma.cuh). Only called when the extension was built
// for sm_90a and the device is compute capability 9.x (wgmma_usable() in host_utils.h).
#pragma once

#include "igemm_tc_launch.cuh"
#include "igemm_wgmma.cuh"

namespace dla_fast {

template <typename T, int BN, int KIND>
int run_wgmma(GemmParams p, cudaStream_t stream) {
  auto kern = igemm_wgmma_kernel<T, BN, KIND>;
  static std::atomic<unsigned long long> done{0};
  opt_in_smem(kern, wgmma_smem_bytes<BN>(wg_stages<BN>()), done);  // the most any launch asks for
  const int smem = wgmma_smem_bytes<BN>(wgmma_stages_used<BN>(p.K));
  p.ntiles_n = (p.Cout_g + BN - 1) / BN;
  const dim3 grid((p.M + WG_BM - 1) / WG_BM, p.groups * p.ntiles_n);
  kern<<<grid, WG_NT, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return BN;
}

template <typename T>
int dispatch_wgmma(int kind, int bn, const GemmParams& p, cudaStream_t s) {
  if (kind == KIND_CONV) return bn <= 64 ? run_wgmma<T, 64, KIND_CONV>(p, s) : run_wgmma<T, 128, KIND_CONV>(p, s);
  return bn <= 64 ? run_wgmma<T, 64, KIND_CAT>(p, s) : run_wgmma<T, 128, KIND_CAT>(p, s);
}

}  // namespace dla_fast
