// Tensor-core cat kernels for __half (one translation unit per dtype x op so that ninja compiles them in parallel).
#include "igemm_tc_launch.cuh"

namespace dla_fast {
int launch_tc_cat_f16(int vw, int bn, const GemmParams& p, cudaStream_t s) {
  return dispatch_tc_cat<__half>(vw, bn, p, s);
}
}  // namespace dla_fast
