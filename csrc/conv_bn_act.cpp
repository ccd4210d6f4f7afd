// dla_fast::conv_bn_act on CUDA: relu?(conv2d(x, w, b, stride, padding, groups) + residual), channels_last out.
// Host code only (checks, views, kernel choice); the kernels are in the .cu files.
#include <torch/library.h>

#include "host_utils.h"

namespace dla_fast {

namespace {
thread_local std::string g_last_kernel;
}
void set_last_kernel(const std::string& s) { g_last_kernel = s; }
const char* last_kernel() { return g_last_kernel.c_str(); }

at::Tensor conv_bn_act_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                            at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups,
                            const std::optional<at::Tensor>& residual_in, bool relu) {
  constexpr const char* op = "dla_fast::conv_bn_act";
  check_cuda_4d(x_in, op, "x");
  const DType dt = dtype_of(x_in, op, "x");
  DLA_CHECK(weight_in.defined() && weight_in.dim() == 4, op,
              ": weight must be a 4-D [Cout, Cin/groups, kh, kw] tensor, got shape ", weight_in.sizes());
  check_same(weight_in, x_in, op, "weight", "x");
  DLA_CHECK(stride.size() == 2 && padding.size() == 2, op, ": stride and padding must have 2 entries, got ",
              stride, " and ", padding);
  DLA_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  DLA_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  DLA_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);

  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Cout = weight_in.size(0), Cin_g = weight_in.size(1), kh = weight_in.size(2), kw = weight_in.size(3);
  DLA_CHECK(Cin_g * groups == C, op, ": x has ", C, " channels but weight [", Cout, ", ", Cin_g, ", ", kh, ", ", kw,
              "] with groups=", groups, " expects ", Cin_g * groups);
  DLA_CHECK(Cout % groups == 0, op, ": weight has ", Cout, " output channels, not divisible by groups=", groups);
  DLA_CHECK(kh >= 1 && kw >= 1 && Cout >= 1 && Cin_g >= 1, op, ": empty weight ", weight_in.sizes());
  const int64_t Ho = (H + 2 * padding[0] - kh) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - kw) / stride[1] + 1;
  DLA_CHECK(H + 2 * padding[0] >= kh && W + 2 * padding[1] >= kw && Ho >= 1 && Wo >= 1, op,
              ": input of spatial size (", H, ", ", W, ") is too small for a ", kh, "x", kw, " kernel with padding ",
              padding);

  const at::Tensor bias = checked_bias(bias_in, Cout, x_in, op, "x is");
  const at::Tensor residual = checked_residual(residual_in, x_in, N, Cout, Ho, Wo, op, "x");

  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({N, Cout, Ho, Wo}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;

  const at::Tensor x = as_nhwc(x_in);
  const at::Tensor w = weight_in.contiguous(at::MemoryFormat::ChannelsLast);  // memory [Cout][kh][kw][Cin/g]
  const int64_t K = kh * kw * Cin_g;
  const int64_t M = N * Ho * Wo;
  DLA_CHECK(M < (1LL << 31) && K < (1LL << 31) && H < (1LL << 31) && W < (1LL << 31), op,
              ": problem too large for 32-bit row/reduction indices (N*Ho*Wo = ", M, ", K = ", K, ")");
  DLA_CHECK(groups <= 65535, op, ": at most 65535 groups are supported, got ", groups);

  GemmParams p{};
  p.src[0] = x.data_ptr();
  p.sn[0] = eff_stride(x, 0);
  p.sh[0] = eff_stride(x, 2);
  p.sw[0] = eff_stride(x, 3);
  p.koff[0] = 0;
  p.koff[1] = static_cast<int>(K);
  p.nchild = 1;
  p.N = static_cast<int>(N);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.Ho = static_cast<int>(Ho);
  p.Wo = static_cast<int>(Wo);
  p.kh = static_cast<int>(kh);
  p.kw = static_cast<int>(kw);
  p.sth = static_cast<int>(stride[0]);
  p.stw = static_cast<int>(stride[1]);
  p.padh = static_cast<int>(padding[0]);
  p.padw = static_cast<int>(padding[1]);
  p.groups = static_cast<int>(groups);
  p.Cin_g = static_cast<int>(Cin_g);
  p.Cout_g = static_cast<int>(Cout / groups);
  p.Cout = static_cast<int>(Cout);
  p.K = static_cast<int>(K);
  p.M = static_cast<int>(M);
  set_gemm_io(p, w, bias, residual, y, relu);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DLA_CHECK(gemm_grid_fits(M, groups, p.Cout_g), op,
            ": the output has too many tiles for one launch (more than 2^31 - 1 blocks); split the batch");
  const Force force = forced_kernel();
  if (force == Force::Auto && stem_supported(p, residual.defined())) {
    launch_stem_conv(dt, p, stream);
    set_last_kernel(std::string("stem7 ") + dtype_name(dt));
    return y;
  }
  const bool few_per_group = groups > 1 && (Cin_g < 16 || Cout / groups < 16);
  if (force == Force::Auto && few_per_group && tc_capable(dt)) {
    // Groups of 4 or 8 channels on tensor cores: a dense GEMM over super-groups of 32 channels whose weight is
    // block-diagonal (B reads zeros off the diagonal): 4-8x the useful MACs, but whole 32-channel runs of the
    // input per tap and tensor-core rates, where the CUDA-core kernels are latency-bound (NOTES v5).
    constexpr int SG = 32;
    const int G = static_cast<int>(Cin_g);
    if ((G == 4 || G == 8) && Cout / groups == G && C % SG == 0) {
      const int xvw = nhwc_vw(x, SG);
      const int vw = std::min(xvw, G);  // mma.sync: one vector width for A and B, and a B vector never spans
                                        // two real groups
      if (vw >= 4 && ptr_aligned(w.data_ptr(), vw * w.element_size())) {
        GemmParams q = p;
        q.groups = static_cast<int>(C / SG);
        q.Cin_g = q.Cout_g = SG;
        q.K = static_cast<int>(kh * kw) * SG;
        q.koff[1] = q.K;
        q.bd_log2 = G == 4 ? 2 : 3;
        if (wgmma_usable(dt, xvw)) {  // Hopper: 16-byte A gather, B copied per real group (igemm_wgmma.cuh)
          launch_igemm_wgmma(dt, KIND_CONV, SG, q, stream);
          set_last_kernel(std::string("wgmma-blockdiag ") + dtype_name(dt) + " g" + std::to_string(G) + " bn32");
          return y;
        }
        const int used = launch_igemm_tc(dt, KIND_CONV, vw, SG, q, stream);
        set_last_kernel(std::string("tc-blockdiag ") + dtype_name(dt) + " g" + std::to_string(G) + " vw" +
                        std::to_string(vw) + " bn" + std::to_string(used));
        return y;
      }
    }
  }
  if (force == Force::Auto && few_per_group) {
    if (grouped_supported(p, nhwc_vw(x, p.Cin_g), static_cast<int>(x.element_size()))) {
      launch_grouped_conv(dt, p, stream);
      set_last_kernel(std::string("grouped ") + dtype_name(dt) + " g" + std::to_string(p.Cin_g));
      return y;
    }
  }
  bool use_direct = force == Force::Direct || (force == Force::Auto && few_per_group);
  if (use_direct) {
    launch_direct_conv(dt, p, stream);
    set_last_kernel(std::string("direct ") + dtype_name(dt));
    return y;
  }
  // Inputs with fewer than 8 channels (the RGB stem) stay on the SIMT kernel: the tensor-core gather needs
  // whole 8-channel runs, and the zero-padded variant of it computed wrong results on the H100 (2026-11-25).
  const bool tiny_cin = groups == 1 && C < 8;
  if (force != Force::Simt && tc_capable(dt) && !(tiny_cin && force == Force::Auto)) {
    // Vector width: x's channel runs start at g*Cin_g and hold Cin_g channels; weight rows hold K.
    auto w_ok = [&](int v) { return K % v == 0 && ptr_aligned(w.data_ptr(), v * w.element_size()); };
    int vw = nhwc_vw(x, p.Cin_g);
    if (vw == 8 && !w_ok(8)) vw = w_ok(4) ? 4 : 1;
    if (vw == 4 && !w_ok(4)) vw = 1;
    const bool wg = pick_wgmma(force, dt, vw, 128, KIND_CONV);  // (convs: any width)
    const bool tma_ok = wg && im2col_ok(p);
    const int bn = pick_bn(p.Cout_g, M, p.groups, tma_ok, p.K);
    if (wg) {
      // A and B by TMA where the tile has the TMA variant (64 wide and up) and the input suits an im2col map.
      const bool tma = tma_ok && (bn == 256 || (bn >= 64 && im2col_enabled()));
      const int used = launch_igemm_wgmma(dt, KIND_CONV, bn, p, stream, tma);
      set_last_kernel(std::string("wgmma ") + dtype_name(dt) + " bn" + std::to_string(used) + (tma ? " tma" : ""));
      return y;
    }
    const int used = launch_igemm_tc(dt, KIND_CONV, vw, bn, p, stream);
    set_last_kernel(std::string("tc ") + dtype_name(dt) + " vw" + std::to_string(vw) + " bn" + std::to_string(used));
    return y;
  }
  launch_igemm_simt(dt, KIND_CONV, p, stream);
  set_last_kernel(std::string("simt ") + dtype_name(dt));
  return y;
}

TORCH_LIBRARY_IMPL(dla_fast, CUDA, m) { m.impl("conv_bn_act", &conv_bn_act_cuda); }

}  // namespace dla_fast
