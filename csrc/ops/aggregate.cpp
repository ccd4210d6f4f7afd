// dla_fast::aggregate on CUDA: relu?(conv1x1(cat(children, 1), w) + b + residual), channels_last out, without
// materialising the concat: the GEMM's K loop walks the children through a pointer table. The kernel and tile
// come from `config` (plan.h) or the rule: fp16/bf16 on sm_80+ on tensor cores (wgmma on Hopper where the gather
// is 16 bytes wide and the tile 64 or 128 channels, else mma.sync; bn from pick_bn()), fp32 on the SIMT GEMM.
// dla_fast::aggregate_candidates lists the configs that can run a call.
#include <torch/library.h>

#include "ops/plan.h"

namespace dla_fast {

namespace {

constexpr const char* kAggOp = "dla_fast::aggregate";

struct AggCall {
  DType dt;
  std::vector<at::Tensor> kids;  // NHWC views (or channels_last copies, kept alive until the launch is queued)
  at::Tensor w, bias, residual;
  int64_t N, Cout, H, W;
  int vw = 8;  // the gather width every child allows (elements)
  GemmParams p{};
};

// children[0], checked to exist and be a CUDA 4-D tensor (its device is the op's).
const at::Tensor& first_child(const char* op, at::TensorList children) {
  const int64_t nchild = static_cast<int64_t>(children.size());
  DLA_CHECK(nchild >= 1 && nchild <= kMaxChildren, op, ": need 1 to ", kMaxChildren, " children, got ", nchild,
            " (concatenate some of them first)");
  check_cuda_4d(children[0], op, "children[0]");
  return children[0];
}

AggCall prepare(const char* op, at::TensorList children_in, const at::Tensor& weight_in,
                const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& residual_in) {
  const int64_t nchild = static_cast<int64_t>(children_in.size());
  const at::Tensor& ref = first_child(op, children_in);
  AggCall a;
  a.dt = dtype_of(ref, op, "children[0]");
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
  if (weight.defined() && weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1)
    weight = weight.reshape({weight.size(0), weight.size(1)});
  DLA_CHECK(weight.defined() && weight.dim() == 2, op, ": weight must be [Cout, sum(C_i)] (or 1x1 4-D), got ",
            weight_in.sizes());
  check_same(weight, ref, op, "weight", "children[0]");
  const int64_t Cout = weight.size(0);
  DLA_CHECK(Cout >= 1 && weight.size(1) == ctot, op, ": weight expects ", weight.size(1),
            " input channels but the children have ", ctot, " in total (weight ", weight_in.sizes(), ")");
  const int64_t M = N * H * W;
  DLA_CHECK(M < (1LL << 31) && ctot < (1LL << 31), op, ": too large for 32-bit indices (N*H*W = ", M,
            ", channels = ", ctot, "); split the batch");
  DLA_CHECK(gemm_grid_fits(M, 1, Cout), op,
            ": the output has too many tiles for one launch (more than 2^31 - 1 blocks); split the batch");

  a.bias = checked_bias(bias_in, Cout, ref, op, "the children are");
  a.residual = checked_residual(residual_in, ref, N, Cout, H, W, op, "children[0]");
  a.w = weight.contiguous();
  a.N = N;
  a.Cout = Cout;
  a.H = H;
  a.W = W;

  GemmParams& p = a.p;
  a.kids.reserve(nchild);
  int64_t koff = 0;
  for (int64_t i = 0; i < nchild; ++i) {
    a.kids.push_back(as_nhwc(children_in[i]));
    const at::Tensor& c = a.kids.back();
    p.src[i] = c.data_ptr();
    p.sn[i] = eff_stride(c, 0);
    p.sh[i] = eff_stride(c, 2);
    p.sw[i] = eff_stride(c, 3);
    p.koff[i] = static_cast<int>(koff);
    koff += c.size(1);
    a.vw = std::min(a.vw, nhwc_vw(c, static_cast<int>(c.size(1))));
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
  p.w = a.w.data_ptr();
  // weight rows hold K = ctot elements
  auto w_ok = [&](int v) { return ctot % v == 0 && ptr_aligned(p.w, v * a.w.element_size()); };
  if (a.vw == 8 && !w_ok(8)) a.vw = w_ok(4) ? 4 : 1;
  if (a.vw == 4 && !w_ok(4)) a.vw = 1;
  return a;
}

// The widths the aggregate's tensor-core kernels have: wgmma 64 and 128 (its outputs are 64+ channels in DLA);
// mma.sync 32, 64 and 128 with the 16-byte gather, else 64.
bool agg_bn_ok(const AggCall& a, int fam, int bn) {
  if (fam == kWgmma) return bn == 64 || bn == 128;
  return a.vw == 8 ? bn == 32 || bn == 64 || bn == 128 : bn == 64;
}

int agg_rule_bn(const AggCall& a, int fam) {
  const int bn = pick_bn(a.p.Cout, a.p.M, 1);
  if (fam == kWgmma) return bn <= 64 ? 64 : 128;
  return a.vw == 8 ? std::max(bn, 32) : 64;
}

Config resolve(const AggCall& a, const Config& req, const EnvOverrides& env) {
  const bool tc = tc_capable(a.dt);
  const bool wgmma = tc && wgmma_usable(a.dt, a.vw);
  int fam = env.family == kDirect ? kSimt : env.family != kRuleFamily ? env.family : req.family;
  // The rule: wgmma where its 64/128-wide tiles suit the output, else mma.sync, and simt for fp32.
  if (fam == kRuleFamily) fam = !tc ? kSimt : wgmma && pick_bn(a.p.Cout, a.p.M, 1) >= 64 ? kWgmma : kTc;
  if (fam == kWgmma && !wgmma) fam = kTc;
  if (fam == kTc && !tc) fam = kSimt;
  Config k{fam, kSimtBn, kGather};
  if (fam != kSimt) {
    int bn = env.wide_bn != 0 && a.p.Cout > 64 ? env.wide_bn : req.bn;
    k.bn = bn != 0 && agg_bn_ok(a, fam, bn) ? bn : agg_rule_bn(a, fam);
  }
  return k;
}

}  // namespace

at::Tensor aggregate_cuda(at::TensorList children_in, const at::Tensor& weight_in,
                          const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& residual_in,
                          bool relu, at::IntArrayRef config) {
  const EnvOverrides& env = env_overrides(kAggOp);
  const Config req = parse_config(config, false, kAggOp);
  const at::Tensor& ref = first_child(kAggOp, children_in);
  const c10::cuda::CUDAGuard guard(ref.device());
  const AggCall a = prepare(kAggOp, children_in, weight_in, bias_in, residual_in);
  at::Tensor y = at::empty({a.N, a.Cout, a.H, a.W}, ref.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  GemmParams p = a.p;
  set_gemm_io(p, a.w, a.bias, a.residual, y, relu);
  const Config k = resolve(a, req, env);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const std::string dts = dtype_name(a.dt);
  if (k.family == kWgmma) {
    const int used = launch_igemm_wgmma(a.dt, KIND_CAT, k.bn, p, stream);
    set_last_kernel("wgmma " + dts + " bn" + std::to_string(used));
  } else if (k.family == kTc) {
    const int used = launch_igemm_tc(a.dt, KIND_CAT, a.vw, k.bn, p, stream);
    set_last_kernel("tc " + dts + " vw" + std::to_string(a.vw) + " bn" + std::to_string(used));
  } else {
    launch_igemm_simt(a.dt, KIND_CAT, p, stream);
    set_last_kernel("simt " + dts);
  }
  return y;
}

// The rule's config first; for tensor-core aggregates with more than 64 outputs, the other width.
std::vector<int64_t> aggregate_candidates_cuda(at::TensorList children_in, const at::Tensor& weight_in,
                                               const std::optional<at::Tensor>& bias_in,
                                               const std::optional<at::Tensor>& residual_in) {
  constexpr const char* op = "dla_fast::aggregate_candidates";
  const EnvOverrides& env = env_overrides(op);
  const c10::cuda::CUDAGuard guard(first_child(op, children_in).device());
  const AggCall a = prepare(op, children_in, weight_in, bias_in, residual_in);
  std::vector<Config> out{resolve(a, Config{}, env)};
  const Config rule = out[0];
  if (rule.family != kSimt && a.p.Cout > 64) {
    for (int bn : {64, 128}) {
      const Config want{rule.family, bn, kGather};
      if (bn != rule.bn && resolve(a, want, env) == want) out.push_back(want);
    }
  }
  return flatten(out);
}

TORCH_LIBRARY_IMPL(dla_fast, CUDA, m) {
  m.impl("aggregate", &aggregate_cuda);
  m.impl("aggregate_candidates", &aggregate_candidates_cuda);
}

}  // namespace dla_fast
