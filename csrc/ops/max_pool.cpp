// dla_fast::max_pool on CUDA: max_pool2d(x, k, stride=k) (no padding, floor mode) into a channels_last output.
// Host code only; the kernel is kernels/max_pool.cu.
#include <torch/library.h>

#include "ops/host_utils.h"

namespace dla_fast {

at::Tensor max_pool_cuda(const at::Tensor& x_in, int64_t k) {
  constexpr const char* op = "dla_fast::max_pool";
  check_cuda_4d(x_in, op, "x");
  const DType dt = dtype_of(x_in, op, "x");
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  DLA_CHECK(k >= 1 && k <= H && k <= W, op, ": the window k must be in [1, min(H, W)] = [1, ", std::min(H, W),
            "], got ", k);
  DLA_CHECK(N < (1LL << 31) && C < (1LL << 31) && H < (1LL << 31) && W < (1LL << 31), op,
            ": too large for 32-bit sizes, got ", x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({N, C, H / k, W / k}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const at::Tensor x = as_nhwc(x_in);
  MaxPoolParams p{};
  p.x = x.data_ptr();
  p.sn = eff_stride(x, 0);
  p.sh = eff_stride(x, 2);
  p.sw = eff_stride(x, 3);
  p.y = y.data_ptr();
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.Ho = static_cast<int>(H / k);
  p.Wo = static_cast<int>(W / k);
  p.k = static_cast<int>(k);
  // 16-byte loads where every channel vector of every pixel is 16-byte aligned (the output always is then).
  const int v16 = static_cast<int>(16 / x.element_size());
  const bool vec = C % v16 == 0 && ptr_aligned(p.x, 16) && p.sn % v16 == 0 && p.sh % v16 == 0 && p.sw % v16 == 0;
  launch_max_pool(dt, vec ? v16 : 1, p, c10::cuda::getCurrentCUDAStream());
  set_last_kernel(std::string("max_pool ") + dtype_name(dt) + " vw" + std::to_string(vec ? v16 : 1));
  return y;
}

TORCH_LIBRARY_IMPL(dla_fast, CUDA, m) { m.impl("max_pool", &max_pool_cuda); }

}  // namespace dla_fast
