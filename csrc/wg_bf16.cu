// Hopper wgmma kernels for __nv_bfloat16 (one translation unit per dtype so that ninja compiles them in parallel).
#include "igemm_wgmma_launch.cuh"

namespace dla_fast {
int launch_wgmma_bf16(int kind, int bn, const GemmParams& p, cudaStream_t s, bool tma) {
  return dispatch_wgmma<__nv_bfloat16>(kind, bn, p, s, tma);
}
}  // namespace dla_fast
