// Host-side launch of the tensor-core kernel: tile choice among the instantiated configurations.
// The instantiation set is deliberately small (it dominates build time): see NOTES_cuda.md.
#pragma once

#include <atomic>

#include <c10/cuda/CUDAException.h>

#include "kernels/igemm_tc.cuh"

namespace dla_fast {

//                 BM   BN  WM  WN        warps  used for
using TcTiny = TcCfg<128, 16, 32, 16>;   // 4    Cout/g <= 16 (stem, level0)
using TcSmall = TcCfg<128, 32, 32, 32>;  // 4    Cout/g <= 32
using TcMid = TcCfg<128, 64, 64, 32>;    // 4    Cout/g <= 64, and big Cout when the grid would be small
using TcBig = TcCfg<128, 128, 64, 32>;   // 8    Cout/g >= 128

// Dynamic shared memory above 48 KB needs an opt-in, once per kernel and device (not a stream operation, so
// harmless under CUDA-graph capture). `done` is the caller's per-kernel bit set of devices.
template <typename Kern>
void opt_in_smem(Kern kern, int bytes, std::atomic<unsigned long long>& done) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const unsigned long long bit = 1ull << (dev & 63);
  if (!(done.load(std::memory_order_acquire) & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done.fetch_or(bit, std::memory_order_acq_rel);
  }
}

template <typename T, typename Cfg, int KIND, int VW, bool BD = false>
int run_tc(GemmParams p, cudaStream_t stream) {
  auto kern = igemm_tc_kernel<T, Cfg, KIND, VW, BD>;
  constexpr int smem = tc_smem_bytes<Cfg, VW>();
  if constexpr (smem > 40 * 1024) {
    // the static row/child tables (~2.4 KB) count towards the 48 KB too
    static std::atomic<unsigned long long> done{0};
    opt_in_smem(kern, smem, done);
  }
  p.ntiles_n = (p.Cout_g + Cfg::BN - 1) / Cfg::BN;
  kern<<<tile_grid(p, Cfg::BM), Cfg::NT, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return Cfg::BN;
}

template <typename T>
int dispatch_tc_conv(int vw, int bn, const GemmParams& p, cudaStream_t s) {
  if (p.bd_log2 > 0) {  // block-diagonal grouped conv: 32-channel super-groups, 16- or 8-byte gather
    return vw == 8 ? run_tc<T, TcSmall, KIND_CONV, 8, true>(p, s) : run_tc<T, TcSmall, KIND_CONV, 4, true>(p, s);
  }
  if (vw == 8) {
    if (bn <= 16) return run_tc<T, TcTiny, KIND_CONV, 8>(p, s);
    if (bn <= 32) return run_tc<T, TcSmall, KIND_CONV, 8>(p, s);
    if (bn <= 64) return run_tc<T, TcMid, KIND_CONV, 8>(p, s);
    return run_tc<T, TcBig, KIND_CONV, 8>(p, s);
  }
  if (vw == 4) {
    if (bn <= 16) return run_tc<T, TcTiny, KIND_CONV, 4>(p, s);
    if (bn <= 32) return run_tc<T, TcSmall, KIND_CONV, 4>(p, s);
    return run_tc<T, TcMid, KIND_CONV, 4>(p, s);
  }
  if (bn <= 16) return run_tc<T, TcTiny, KIND_CONV, 1>(p, s);
  if (bn <= 32) return run_tc<T, TcSmall, KIND_CONV, 1>(p, s);
  return run_tc<T, TcMid, KIND_CONV, 1>(p, s);
}

template <typename T>
int dispatch_tc_cat(int vw, int bn, const GemmParams& p, cudaStream_t s) {
  if (vw == 8) {
    if (bn <= 32) return run_tc<T, TcSmall, KIND_CAT, 8>(p, s);
    if (bn <= 64) return run_tc<T, TcMid, KIND_CAT, 8>(p, s);
    return run_tc<T, TcBig, KIND_CAT, 8>(p, s);
  }
  if (vw == 4) return run_tc<T, TcMid, KIND_CAT, 4>(p, s);
  return run_tc<T, TcMid, KIND_CAT, 1>(p, s);
}

}  // namespace dla_fast
