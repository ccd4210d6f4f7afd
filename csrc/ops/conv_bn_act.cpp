// dla_fast::conv_bn_act on CUDA: relu?(conv2d(x, w, b, stride, padding, groups) + residual), channels_last out,
// with the kernel and tile from `config` (plan.h) or the rule below; and dla_fast::conv_candidates, the configs
// that can run a call. Host code only (checks, views, kernel choice); the kernels are in kernels/.
//
// The rule, first that applies:
//   the RGB stem (7x7, 3 -> 16, stride 1, no residual)               stem
//   groups of 4 or 8 channels (in = out), 32 | C, aligned, sm_80+     blockdiag: wgmma on Hopper, else mma.sync
//   other groups with < 16 channels in or out                        grouped (8 a group, 3x3) or direct
//   fp16/bf16 on sm_80+ with at least 8 input channels                wgmma (16-byte gather on Hopper) or mma.sync,
//                                                                     bn from pick_bn(), A by TMA where it can
//   everything else (fp32, the few-channel inputs)                    simt
#include <torch/library.h>

#include "ops/plan.h"

namespace dla_fast {

namespace {
thread_local std::string g_last_kernel;
}
void set_last_kernel(const std::string& s) { g_last_kernel = s; }
const char* last_kernel() { return g_last_kernel.c_str(); }

namespace {

constexpr const char* kConvOp = "dla_fast::conv_bn_act";

// A checked call: the views the kernels read and its GemmParams (all but the output).
struct ConvCall {
  DType dt;
  at::Tensor x;         // NHWC view (channel stride 1) of the input
  at::Tensor w;         // channels_last weight: memory [Cout][kh][kw][Cin/g]
  at::Tensor bias;      // fp32 [Cout] or undefined
  at::Tensor residual;  // NHWC view or undefined
  int64_t N, C, Cout, Ho, Wo;
  GemmParams p{};
};

ConvCall prepare(const char* op, const at::Tensor& x_in, const at::Tensor& weight_in,
                 const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride, at::IntArrayRef padding,
                 int64_t groups, const std::optional<at::Tensor>& residual_in) {
  check_cuda_4d(x_in, op, "x");
  ConvCall c;
  c.dt = dtype_of(x_in, op, "x");
  DLA_CHECK(weight_in.defined() && weight_in.dim() == 4, op, ": weight must be 4-D [Cout, Cin/groups, kh, kw], got ",
            weight_in.sizes());
  check_same(weight_in, x_in, op, "weight", "x");
  DLA_CHECK(stride.size() == 2 && padding.size() == 2, op, ": stride and padding need 2 entries, got ", stride,
            " and ", padding);
  DLA_CHECK(stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 && groups >= 1, op,
            ": need stride >= 1, padding >= 0, groups >= 1; got stride ", stride, ", padding ", padding, ", groups ",
            groups);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Cout = weight_in.size(0), Cin_g = weight_in.size(1), kh = weight_in.size(2), kw = weight_in.size(3);
  DLA_CHECK(kh >= 1 && kw >= 1 && Cout >= 1 && Cin_g >= 1, op, ": empty weight ", weight_in.sizes());
  DLA_CHECK(Cin_g * groups == C && Cout % groups == 0, op, ": x has ", C, " channels but weight ", weight_in.sizes(),
            " with groups=", groups, " expects ", Cin_g * groups, " (and Cout divisible by groups)");
  DLA_CHECK(groups <= 65535, op, ": at most 65535 groups, got ", groups);
  DLA_CHECK(H + 2 * padding[0] >= kh && W + 2 * padding[1] >= kw, op, ": input of spatial size (", H, ", ", W,
            ") is too small for a ", kh, "x", kw, " kernel with padding ", padding);
  const int64_t Ho = (H + 2 * padding[0] - kh) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - kw) / stride[1] + 1;
  const int64_t K = kh * kw * Cin_g;
  const int64_t M = N * Ho * Wo;
  DLA_CHECK(M < (1LL << 31) && K < (1LL << 31) && H < (1LL << 31) && W < (1LL << 31), op,
            ": too large for 32-bit indices (N*Ho*Wo = ", M, ", K = ", K, "); split the batch");
  DLA_CHECK(gemm_grid_fits(M, groups, Cout / groups), op,
            ": the output has too many tiles for one launch (more than 2^31 - 1 blocks); split the batch");

  c.bias = checked_bias(bias_in, Cout, x_in, op, "x is");
  c.residual = checked_residual(residual_in, x_in, N, Cout, Ho, Wo, op, "x");
  c.x = as_nhwc(x_in);
  c.w = weight_in.contiguous(at::MemoryFormat::ChannelsLast);
  c.N = N;
  c.C = C;
  c.Cout = Cout;
  c.Ho = Ho;
  c.Wo = Wo;

  GemmParams& p = c.p;
  p.src[0] = c.x.data_ptr();
  p.sn[0] = eff_stride(c.x, 0);
  p.sh[0] = eff_stride(c.x, 2);
  p.sw[0] = eff_stride(c.x, 3);
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
  p.w = c.w.data_ptr();  // the output and the epilogue fields: set_gemm_io() before the launch
  return c;
}

// Which kernels can run a call (on the current device).
struct ConvFacts {
  bool tc = false;             // mma.sync: fp16/bf16 on sm_80+
  int vw = 1;                  // the dense tensor-core gather width (elements): x's channel runs and weight rows
  bool wgmma = false;          // the dense wgmma kernels: the 16-byte gather on a Hopper build and device
  bool im2col = false;         // wgmma with A by TMA im2col (im2col_ok())
  bool few_per_group = false;  // grouped, with fewer than 16 channels a group in or out
  bool tiny_cin = false;       // dense with fewer than 8 input channels
  bool stem = false;           // the RGB stem kernel
  bool grouped = false;        // the grouped 3x3 kernel (8 channels a group)
  int bd_g = 0;                // block-diagonal: the group size (4 or 8), 0 where it cannot run
  int bd_vw = 0;               // its mma.sync gather width
  bool bd_wgmma = false;       // and its wgmma variant
};

ConvFacts conv_facts(const ConvCall& c) {
  const GemmParams& p = c.p;
  const int64_t es = c.x.element_size();
  ConvFacts f;
  f.tc = tc_capable(c.dt);
  // x's channel runs start at g*Cin_g and hold Cin_g channels; weight rows hold K.
  auto w_ok = [&](int v) { return p.K % v == 0 && ptr_aligned(p.w, v * es); };
  f.vw = nhwc_vw(c.x, p.Cin_g);
  if (f.vw == 8 && !w_ok(8)) f.vw = w_ok(4) ? 4 : 1;
  if (f.vw == 4 && !w_ok(4)) f.vw = 1;
  f.wgmma = f.tc && wgmma_usable(c.dt, f.vw);
  f.im2col = f.wgmma && im2col_ok(p);
  f.few_per_group = p.groups > 1 && (p.Cin_g < 16 || p.Cout_g < 16);
  f.tiny_cin = p.groups == 1 && c.C < 8;
  f.stem = stem_supported(p, c.residual.defined());
  f.grouped = grouped_supported(p, nhwc_vw(c.x, p.Cin_g), static_cast<int>(es));
  // Groups of 4 or 8 channels on tensor cores: a dense GEMM over super-groups of 32 channels whose weight is
  // block-diagonal (B reads zeros off the diagonal): 4-8x the useful MACs, but whole 32-channel runs of the input
  // per tap and tensor-core rates, where the CUDA-core kernels are latency-bound.
  const int G = p.Cin_g;
  if (f.few_per_group && f.tc && (G == 4 || G == 8) && p.Cout_g == G && c.C % 32 == 0) {
    const int xvw = nhwc_vw(c.x, 32);
    const int vw = std::min(xvw, G);  // mma.sync: one width for A and B, and a B vector never spans two groups
    if (vw >= 4 && ptr_aligned(p.w, vw * es)) {
      f.bd_g = G;
      f.bd_vw = vw;
      f.bd_wgmma = wgmma_usable(c.dt, xvw);  // 16-byte A gather, B copied per real group (igemm_wgmma.cuh)
    }
  }
  return f;
}

int rule_family(const ConvFacts& f) {
  if (f.stem) return kStem;
  if (f.few_per_group && f.bd_g) return f.bd_wgmma ? kBlockdiagWgmma : kBlockdiagTc;
  if (f.few_per_group) return f.grouped ? kGrouped : kDirect;
  // Inputs with fewer than 8 channels stay on simt: mma.sync can gather them only one element at a time
  // (conv_candidates offers it, for a plan to measure).
  if (f.tc && !f.tiny_cin) return f.wgmma ? kWgmma : kTc;
  return kSimt;
}

// `fam` if it can run this call, else the family it falls back to (plan.h).
int runnable_family(const ConvFacts& f, int fam) {
  switch (fam) {
    case kWgmma:
      if (f.wgmma) return kWgmma;
      [[fallthrough]];
    case kTc:
      return f.tc ? kTc : kSimt;
    case kSimt:
    case kDirect:
      return fam;
    case kGrouped:
      return f.grouped ? kGrouped : rule_family(f);
    case kStem:
      return f.stem ? kStem : rule_family(f);
    case kBlockdiagWgmma:
      if (f.bd_wgmma) return kBlockdiagWgmma;
      [[fallthrough]];
    case kBlockdiagTc:
      return f.bd_g ? kBlockdiagTc : rule_family(f);
    default:
      return rule_family(f);
  }
}

// The widths the dense tensor-core kernels have for this call: mma.sync's 128-wide tile needs the 16-byte gather,
// the 192x256 wgmma tile a dense conv whose input suits a TMA im2col map.
bool dense_bn_ok(const ConvFacts& f, int fam, int bn) {
  if (bn == 16 || bn == 32 || bn == 64) return true;
  if (bn == 128) return fam == kWgmma || f.vw == 8;
  return bn == 256 && fam == kWgmma && f.im2col;
}

int dense_rule_bn(const ConvCall& c, const ConvFacts& f, int fam) {
  const GemmParams& p = c.p;
  const int bn = pick_bn(p.Cout_g, p.M, p.groups, fam == kWgmma && f.im2col, p.K);
  return bn == 128 && !dense_bn_ok(f, fam, bn) ? 64 : bn;
}

// The fully specified config that runs this call for the request `req` (plan.h: the environment first, then
// `req`, each element falling back to the rule's where it cannot run).
Config resolve(const ConvCall& c, const ConvFacts& f, const Config& req, const EnvOverrides& env) {
  const int want = env.family != kRuleFamily ? env.family : req.family;
  Config k;
  k.family = runnable_family(f, want == kRuleFamily ? rule_family(f) : want);
  k.a_load = kGather;
  switch (k.family) {
    case kWgmma:
    case kTc: {
      int bn = env.wide_bn != 0 && c.p.Cout_g > 64 ? env.wide_bn : req.bn;
      if (bn == 0 || !dense_bn_ok(f, k.family, bn)) bn = dense_rule_bn(c, f, k.family);
      k.bn = bn;
      if (k.family == kWgmma) {
        // The rule loads A by TMA wherever it can: the 64/128/256-wide tiles of a conv that suits an im2col map.
        const int a = env.a_load != kRuleALoad ? env.a_load : req.a_load;
        const bool tma_ok = f.im2col && bn >= 64;
        k.a_load = bn == 256 || (tma_ok && a != kGather) ? kTma : kGather;
      }
      break;
    }
    case kSimt: k.bn = kSimtBn; break;
    case kDirect: k.bn = kDirectBn; break;
    case kGrouped: k.bn = kGroupedBn; break;
    case kStem: k.bn = kStemBn; break;
    default: k.bn = kBlockdiagBn; break;  // blockdiag: the 32-channel super-groups
  }
  return k;
}

void launch(const ConvCall& c, const ConvFacts& f, const Config& k, GemmParams p, cudaStream_t stream) {
  const DType dt = c.dt;
  const std::string dts = dtype_name(dt);
  switch (k.family) {
    case kStem:
      launch_stem_conv(dt, p, stream);
      set_last_kernel("stem7 " + dts);
      return;
    case kBlockdiagWgmma:
    case kBlockdiagTc: {
      constexpr int SG = 32;  // super-group channels
      GemmParams q = p;
      q.groups = static_cast<int>(c.C / SG);
      q.Cin_g = q.Cout_g = SG;
      q.K = p.kh * p.kw * SG;
      q.koff[1] = q.K;
      q.bd_log2 = f.bd_g == 4 ? 2 : 3;
      const std::string g = " g" + std::to_string(f.bd_g);
      if (k.family == kBlockdiagWgmma) {
        const int used = launch_igemm_wgmma(dt, KIND_CONV, SG, q, stream);
        set_last_kernel("wgmma-blockdiag " + dts + g + " bn" + std::to_string(used));
      } else {
        const int used = launch_igemm_tc(dt, KIND_CONV, f.bd_vw, SG, q, stream);
        set_last_kernel("tc-blockdiag " + dts + g + " vw" + std::to_string(f.bd_vw) + " bn" + std::to_string(used));
      }
      return;
    }
    case kGrouped:
      launch_grouped_conv(dt, p, stream);
      set_last_kernel("grouped " + dts + " g" + std::to_string(p.Cin_g));
      return;
    case kDirect:
      launch_direct_conv(dt, p, stream);
      set_last_kernel("direct " + dts);
      return;
    case kWgmma: {
      const bool tma = k.a_load == kTma;
      const int used = launch_igemm_wgmma(dt, KIND_CONV, k.bn, p, stream, tma);
      set_last_kernel("wgmma " + dts + " bn" + std::to_string(used) + (tma ? " tma" : ""));
      return;
    }
    case kTc: {
      const int used = launch_igemm_tc(dt, KIND_CONV, f.vw, k.bn, p, stream);
      set_last_kernel("tc " + dts + " vw" + std::to_string(f.vw) + " bn" + std::to_string(used));
      return;
    }
    default:
      launch_igemm_simt(dt, KIND_CONV, p, stream);
      set_last_kernel("simt " + dts);
      return;
  }
}

}  // namespace

at::Tensor conv_bn_act_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                            const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride, at::IntArrayRef padding,
                            int64_t groups, const std::optional<at::Tensor>& residual_in, bool relu,
                            at::IntArrayRef config) {
  const EnvOverrides& env = env_overrides(kConvOp);
  const Config req = parse_config(config, true, kConvOp);
  check_cuda_4d(x_in, kConvOp, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ConvCall c = prepare(kConvOp, x_in, weight_in, bias_in, stride, padding, groups, residual_in);
  at::Tensor y = at::empty({c.N, c.Cout, c.Ho, c.Wo}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const ConvFacts f = conv_facts(c);
  GemmParams p = c.p;
  set_gemm_io(p, c.w, c.bias, c.residual, y, relu);
  launch(c, f, resolve(c, f, req, env), p, c10::cuda::getCurrentCUDAStream());
  return y;
}

// The configs that run this call exactly as named, the rule's first; then the others that can win: for the dense
// tensor-core kernels with more than 64 outputs a group the other widths (256 above 128 outputs) and A loads, for
// groups of few channels the block-diagonal GEMMs and the CUDA-core kernel, and mma.sync for the few-channel inputs
// the rule leaves to simt.
std::vector<int64_t> conv_candidates_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                          const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                                          at::IntArrayRef padding, int64_t groups,
                                          const std::optional<at::Tensor>& residual_in) {
  constexpr const char* op = "dla_fast::conv_candidates";
  const EnvOverrides& env = env_overrides(op);
  check_cuda_4d(x_in, op, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ConvCall c = prepare(op, x_in, weight_in, bias_in, stride, padding, groups, residual_in);
  const ConvFacts f = conv_facts(c);
  std::vector<Config> out{resolve(c, f, Config{}, env)};
  auto add = [&](const Config& want) {
    const Config got = resolve(c, f, want, env);
    if (!(got == want)) return;  // it would run as something else
    for (const Config& o : out)
      if (o == got) return;
    out.push_back(got);
  };
  const Config rule = out[0];
  if ((rule.family == kWgmma || rule.family == kTc) && c.p.Cout_g > 64) {
    for (int bn : {128, 64, 256}) {
      if (bn == 256 && c.p.Cout_g <= 128) continue;  // half the tile would be empty
      for (int a : {kTma, kGather}) add(Config{rule.family, bn, a});
    }
  }
  if (f.few_per_group) {
    add(Config{kBlockdiagWgmma, kBlockdiagBn, kGather});
    add(Config{kBlockdiagTc, kBlockdiagBn, kGather});
    add(f.grouped ? Config{kGrouped, kGroupedBn, kGather} : Config{kDirect, kDirectBn, kGather});
  }
  if (rule.family == kSimt && f.tiny_cin && f.tc) add(Config{kTc, dense_rule_bn(c, f, kTc), kGather});
  return flatten(out);
}

TORCH_LIBRARY_IMPL(dla_fast, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act_cuda);
  m.impl("conv_candidates", &conv_candidates_cuda);
}

}  // namespace dla_fast
