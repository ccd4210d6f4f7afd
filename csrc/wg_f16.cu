// Hopper wgmma kernels for __half (one translation unit per dtype so that ninja compiles them in parallel).
#include "igemm_wgmma_launch.cuh"

namespace dla_fast {
int launch_wgmma_f16(int kind, int bn, const GemmParams& p, cudaStream_t s, bool tma) {
  return dispatch_wgmma<__half>(kind, bn, p, s, tma);
}
}  // namespace dla_fast
