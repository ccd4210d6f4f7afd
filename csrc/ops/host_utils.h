// Host-side helpers shared by the ops: the checks that keep the kernels' memory accesses in bounds (dla_fast.ops
// validates user arguments before they get here; these guard direct torch.ops calls), NHWC views, alignment tests
// for the vectorised gathers, device info and the rule's tile width.
#pragma once

#include <atomic>
#include <string>

#include <ATen/ATen.h>
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE
// headers, which minimal toolkits (nvcc + cudart only) do not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops/launch.h"

namespace dla_fast {

// Error messages are assembled here instead of by TORCH_CHECK's iostream formatting: on the H100 image
// (torch 2.11), formatting an integer through c10::str in this extension segfaulted (every check whose message
// held a number crashed; those with only strings, dtypes and devices raised normally), so numbers go through
// std::to_string and nothing touches a stream.
inline void fmt_one(std::string& s, const char* v) { s += v; }
inline void fmt_one(std::string& s, const std::string& v) { s += v; }
inline void fmt_one(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void fmt_one(std::string& s, int v) { s += std::to_string(v); }
inline void fmt_one(std::string& s, long v) { s += std::to_string(v); }
inline void fmt_one(std::string& s, long long v) { s += std::to_string(v); }
inline void fmt_one(std::string& s, unsigned long v) { s += std::to_string(v); }
inline void fmt_one(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void fmt_one(std::string& s, const c10::Device& v) { s += v.str(); }
inline void fmt_one(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
template <typename... A>
std::string fmt_msg(const A&... a) {
  std::string s;
  (fmt_one(s, a), ...);
  return s;
}

}  // namespace dla_fast

// TORCH_CHECK with a message from fmt_msg (built only when the check fails).
#define DLA_CHECK(cond, ...) TORCH_CHECK((cond), ::dla_fast::fmt_msg(__VA_ARGS__))

namespace dla_fast {

// Set by the ops, read by dla_fast._C.last_kernel() (tests and benchmarks report which kernel ran).
void set_last_kernel(const std::string& s);

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    default:
      DLA_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; the CUDA kernels support float16, bfloat16 and float32 (use backend='eager' for others)");
  }
  return DType::F32;
}

inline void check_cuda_4d(const at::Tensor& t, const char* op, const std::string& name) {
  DLA_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  DLA_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(),
              "; the CUDA backend needs CUDA tensors (move it with .cuda(), or use backend='eager')");
  DLA_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got shape ", t.sizes());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const std::string& name,
                       const char* refname) {
  DLA_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", refname, " is on ",
              ref.device(), "; move them to one device");
  DLA_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              refname, " has ", ref.scalar_type(), "; cast them to one dtype");
}

// A view the kernels can address as n*sn + h*sh + w*sw + c: channel stride 1 (channels_last, or a channel
// slice of it such as torch.split's output). Anything else is copied to channels_last once.
inline at::Tensor as_nhwc(const at::Tensor& t) {
  if (t.size(1) == 1 || t.stride(1) == 1) return t;
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// The folded-BN bias as a contiguous fp32 [Cout] tensor (undefined when absent), checked against `ref`.
inline at::Tensor checked_bias(const std::optional<at::Tensor>& b, int64_t Cout, const at::Tensor& ref,
                               const char* op, const char* refname) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  DLA_CHECK(b->dim() == 1 && b->size(0) == Cout, op, ": bias must have shape (", Cout, "), got ", b->sizes());
  DLA_CHECK(b->device() == ref.device(), op, ": bias is on ", b->device(), " but ", refname, " on ", ref.device());
  return b->to(at::kFloat).contiguous();
}

// The residual (undefined when absent), checked to have the output's shape [N, Cout, H, W], as an NHWC view.
inline at::Tensor checked_residual(const std::optional<at::Tensor>& r, const at::Tensor& ref, int64_t N,
                                   int64_t Cout, int64_t H, int64_t W, const char* op, const char* refname) {
  if (!r.has_value() || !r->defined()) return at::Tensor();
  check_cuda_4d(*r, op, "residual");
  check_same(*r, ref, op, "residual", refname);
  DLA_CHECK(r->size(0) == N && r->size(1) == Cout && r->size(2) == H && r->size(3) == W, op,
            ": residual must have the output's shape [", N, ", ", Cout, ", ", H, ", ", W, "], got ", r->sizes());
  return as_nhwc(*r);
}

// Strides of size-1 dims are arbitrary in PyTorch and never multiplied by a non-zero index: report them as
// 0 so that they do not defeat the alignment test.
inline long long eff_stride(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

inline bool ptr_aligned(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// Largest gather vector width (8, 4, 1 elements) valid for an NHWC tensor whose channel runs start at
// multiples of `chan_mult` and have that many channels.
inline int nhwc_vw(const at::Tensor& t, int chan_mult) {
  const size_t es = t.element_size();
  for (int vw : {8, 4}) {
    if (chan_mult % vw == 0 && ptr_aligned(t.data_ptr(), vw * es) && eff_stride(t, 0) % vw == 0 &&
        eff_stride(t, 2) % vw == 0 && eff_stride(t, 3) % vw == 0)
      return vw;
  }
  return 1;
}

// The GemmParams fields both ops fill alike: weight, fp32 bias, optional NHWC residual, output, ReLU.
inline void set_gemm_io(GemmParams& p, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& residual,
                        const at::Tensor& y, bool relu) {
  p.w = w.data_ptr();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (residual.defined()) {
    p.res = residual.data_ptr();
    p.rsn = eff_stride(residual, 0);
    p.rsh = eff_stride(residual, 2);
    p.rsw = eff_stride(residual, 3);
  }
  p.y = y.data_ptr();
  p.relu = relu ? 1 : 0;
}

// Compute capability major and SM count of the current device, cached per device.
struct DevInfo {
  int major = 0, sms = 1;
};
inline DevInfo dev_info() {
  // Packed (major << 20 | sms) + 1 per device; 0 = not yet queried. Atomic so a reader never sees half of it.
  static std::atomic<int> cache[64];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int v = cache[dev & 63].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, sms = 1;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    v = ((major << 20) | (sms & 0xfffff)) + 1;
    cache[dev & 63].store(v, std::memory_order_relaxed);
  }
  DevInfo d;
  d.major = (v - 1) >> 20;
  d.sms = (v - 1) & 0xfffff;
  return d;
}

// Tensor cores for fp16/bf16 on sm_80+ (mma.sync + cp.async + ldmatrix).
inline bool tc_capable(DType dt) { return dt != DType::F32 && dev_info().major >= 8; }

// Hopper warpgroup MMAs: only in a build that has sm_90a code (setup.py defines DLA_FAST_SM90A then), only on
// compute capability 9.x, fp16/bf16 with the 16-byte gather (vw 8).
inline bool wgmma_usable(DType dt, int vw) {
#ifdef DLA_FAST_SM90A
  return dt != DType::F32 && vw == 8 && dev_info().major == 9;
#else
  (void)dt;
  (void)vw;
  return false;
#endif
}

// The GEMM kernels launch one 1-D grid of (M tiles) x groups x (N tiles) blocks (tile_grid() in common.cuh),
// at most 2^31 - 1: checked with the smallest tiles any of them uses (64 rows, 16 channels).
inline bool gemm_grid_fits(long long m, long long groups, long long cout_g) {
  return ((m + 63) / 64) * groups * ((cout_g + 15) / 16) <= 0x7fffffffLL;
}

// The rule's output-channel tile for the tensor-core kernels: the smallest of 16/32/64/128 that covers a group's
// channels; for wider groups 128, or 64 when the 128-wide grid has fewer blocks than the GPU has SMs (batch 1-8 at
// 7x7). Otherwise a fuller 128-wide grid wins even with a mostly empty last wave, since a block alone on an SM
// runs faster: 64 wide loses to 128 on every 7x7 and 14x14 layer at batch 256 on the H100.
// big_ok (wgmma dense convs whose input suits a TMA im2col map, im2col_ok() in launch.h): the 192x256 tile (one
// block an SM, both operands by TMA) where K >= 256 and its grid needs at most 1.25x the wave-area of the 128x128
// grid at two blocks an SM (waves x tile area per SM: 192 x 256 against 2 x 128 x 128). A big block does more
// work per unit of area, so a somewhat emptier last wave still pays; at a ratio of 1.5 (1x1 convs at 7x7 with
// K <= 256), or with K = 128, the 128-wide tile wins. One-wave 128 grids (batch 1) never qualify.
inline int pick_bn(int cout_g, long long m, int groups, bool big_ok = false, long long k = 0) {
  int bn = cout_g <= 16 ? 16 : cout_g <= 32 ? 32 : cout_g <= 64 ? 64 : 128;
  if (bn == 128) {
    const long long sms = dev_info().sms;
    const long long blocks = ((m + 127) / 128) * groups * ((cout_g + 127) / 128);
    if (blocks < sms) bn = 64;
    if (big_ok && groups == 1 && cout_g > 128 && k >= 256) {
      const long long big = ((m + 191) / 192) * ((cout_g + 255) / 256);
      const long long area128 = ((blocks + 2 * sms - 1) / (2 * sms)) * (2 * 128 * 128);
      const long long area256 = ((big + sms - 1) / sms) * (192 * 256);
      if (4 * area256 <= 5 * area128) bn = 256;
    }
  }
  return bn;
}

inline const char* dtype_name(DType dt) { return dt == DType::F16 ? "f16" : dt == DType::BF16 ? "bf16" : "f32"; }

}  // namespace dla_fast
