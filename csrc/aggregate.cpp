// dla_fast::aggregate on CUDA: relu?(conv1x1(cat(children, 1), w) + b + residual), channels_last out, without
// materialising the concat: the GEMM's K loop walks the children through a pointer table.
#include <torch/library.h>

#include "host_utils.h"

namespace dla_fast {

at::Tensor aggregate_cuda(at::TensorList children_in, const at::Tensor& weight_in,
                          const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& residual_in,
                          bool relu) {
  constexpr const char* op = "dla_fast::aggregate";
  const int64_t nchild = static_cast<int64_t>(children_in.size());
  DLA_CHECK(nchild >= 1, op, ": children must be a non-empty list of 4-D tensors");
  DLA_CHECK(nchild <= kMaxChildren, op, ": at most ", kMaxChildren, " children are supported, got ", nchild,
              "; concatenate some of them first or use backend='eager'");
  const at::Tensor& ref = children_in[0];
  check_cuda_4d(ref, op, "children[0]");
  const DType dt = dtype_of(ref, op, "children[0]");
  const int64_t N = ref.size(0), H = ref.size(2), W = ref.size(3);
  int64_t ctot = 0;
  for (int64_t i = 0; i < nchild; ++i) {
    const at::Tensor& c = children_in[i];
    const std::string name = "children[" + std::to_string(i) + "]";
    check_cuda_4d(c, op, name);
    check_same(c, ref, op, name, "children[0]");
    DLA_CHECK(c.size(0) == N && c.size(2) == H && c.size(3) == W, op,
                ": children must share batch and spatial size: children[0] is ", ref.sizes(), ", ", name, " is ",
                c.sizes());
    DLA_CHECK(c.size(1) >= 1, op, ": ", name, " has no channels");
    ctot += c.size(1);
  }
  at::Tensor weight = weight_in;
  if (weight.defined() && weight.dim() == 4) {
    DLA_CHECK(weight.size(2) == 1 && weight.size(3) == 1, op, ": weight must be 1x1, got shape ", weight.sizes());
    weight = weight.reshape({weight.size(0), weight.size(1)});
  }
  DLA_CHECK(weight.defined() && weight.dim() == 2, op, ": weight must be [Cout, sum(C_i)], got shape ",
              weight_in.sizes());
  check_same(weight, ref, op, "weight", "children[0]");
  const int64_t Cout = weight.size(0);
  DLA_CHECK(weight.size(1) == ctot, op, ": weight expects ", weight.size(1),
              " input channels but the children have ", ctot, " in total");
  DLA_CHECK(Cout >= 1, op, ": weight has no output channels");

  const at::Tensor bias = checked_bias(bias_in, Cout, ref, op, "the children are");
  const at::Tensor residual = checked_residual(residual_in, ref, N, Cout, H, W, op, "children[0]");

  const c10::cuda::CUDAGuard guard(ref.device());
  at::Tensor y = at::empty({N, Cout, H, W}, ref.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const int64_t M = N * H * W;
  DLA_CHECK(M < (1LL << 31) && ctot < (1LL << 31), op, ": problem too large for 32-bit indices (N*H*W = ", M,
              ", channels = ", ctot, ")");

  const at::Tensor w = weight.contiguous();
  std::vector<at::Tensor> kids;  // keeps any channels_last copies alive until the launch is queued
  kids.reserve(nchild);
  GemmParams p{};
  int vw = 8;
  int64_t koff = 0;
  for (int64_t i = 0; i < nchild; ++i) {
    kids.push_back(as_nhwc(children_in[i]));
    const at::Tensor& c = kids.back();
    p.src[i] = c.data_ptr();
    p.sn[i] = eff_stride(c, 0);
    p.sh[i] = eff_stride(c, 2);
    p.sw[i] = eff_stride(c, 3);
    p.koff[i] = static_cast<int>(koff);
    koff += c.size(1);
    vw = std::min(vw, nhwc_vw(c, static_cast<int>(c.size(1))));
  }
  p.koff[nchild] = static_cast<int>(koff);
  p.nchild = static_cast<int>(nchild);
  p.N = static_cast<int>(N);
  p.H = p.Ho = static_cast<int>(H);
  p.W = p.Wo = static_cast<int>(W);
  p.kh = p.kw = p.sth = p.stw = 1;
  p.padh = p.padw = 0;
  p.groups = 1;
  p.Cin_g = static_cast<int>(ctot);
  p.Cout_g = p.Cout = static_cast<int>(Cout);
  p.K = static_cast<int>(ctot);
  p.M = static_cast<int>(M);
  set_gemm_io(p, w, bias, residual, y, relu);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DLA_CHECK(gemm_grid_fits(M, 1, p.Cout), op,
            ": the output has too many tiles for one launch (more than 2^31 - 1 blocks); split the batch");
  const Force force = forced_kernel();
  if (force != Force::Simt && force != Force::Direct && tc_capable(dt)) {
    auto w_ok = [&](int v) { return ctot % v == 0 && ptr_aligned(w.data_ptr(), v * w.element_size()); };
    if (vw == 8 && !w_ok(8)) vw = w_ok(4) ? 4 : 1;
    if (vw == 4 && !w_ok(4)) vw = 1;
    const int bn = pick_bn(p.Cout, M, 1);
    if (pick_wgmma(force, dt, vw, bn, KIND_CAT)) {
      const int used = launch_igemm_wgmma(dt, KIND_CAT, bn, p, stream);
      set_last_kernel(std::string("wgmma ") + dtype_name(dt) + " bn" + std::to_string(used));
      return y;
    }
    const int used = launch_igemm_tc(dt, KIND_CAT, vw, bn, p, stream);
    set_last_kernel(std::string("tc ") + dtype_name(dt) + " vw" + std::to_string(vw) + " bn" + std::to_string(used));
    return y;
  }
  launch_igemm_simt(dt, KIND_CAT, p, stream);
  set_last_kernel(std::string("simt ") + dtype_name(dt));
  return y;
}

TORCH_LIBRARY_IMPL(dla_fast, CUDA, m) { m.impl("aggregate", &aggregate_cuda); }

}  // namespace dla_fast
