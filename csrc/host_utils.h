// Host-side helpers shared by the two ops: argument checks with messages a user can act on, NHWC views,
// alignment tests for the vectorised gather, and the kernel choice.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE
// headers, which minimal toolkits (nvcc + cudart only) do not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launch.h"

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

// Set by the ops, read by dla_fast._C.last_kernel() (tests and benchmarks report which path ran).
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

// DLA_FAST_CUDA_KERNEL=auto|wgmma|tc|simt|direct forces a kernel family (debugging, tests, benchmarks); a
// family that cannot run the case falls back the way `auto` would (wgmma -> tc -> simt). Read on every call
// (a getenv is far cheaper than a launch) so a test can flip it at run time.
enum class Force { Auto, Wgmma, TC, Simt, Direct };
inline Force forced_kernel() {
  const char* e = std::getenv("DLA_FAST_CUDA_KERNEL");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return Force::Auto;
  if (std::strcmp(e, "wgmma") == 0) return Force::Wgmma;
  if (std::strcmp(e, "tc") == 0) return Force::TC;
  if (std::strcmp(e, "simt") == 0) return Force::Simt;
  if (std::strcmp(e, "direct") == 0) return Force::Direct;
  DLA_CHECK(false, "DLA_FAST_CUDA_KERNEL must be one of auto, wgmma, tc, simt, direct; got '", e, "'");
  return Force::Auto;
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

// Which tensor-core kernel: wgmma wherever it can run (the 16-byte gather on a Hopper build and device), unless
// DLA_FAST_CUDA_KERNEL=tc asks for mma.sync. Convolutions have narrow wgmma tiles (16/32 channels, 5 blocks an
// SM); the aggregation node only the 64/128-wide ones, so its narrower outputs stay on mma.sync.
inline bool pick_wgmma(Force force, DType dt, int vw, int bn, int kind) {
  if (!wgmma_usable(dt, vw)) return false;
  return force == Force::Wgmma || (force == Force::Auto && (kind == KIND_CONV || bn >= 64));
}

// Output-channel tile: the smallest of 16/32/64/128 that covers a group's channels; 64 instead of 128 only when the
// 128-wide grid has fewer blocks than the GPU has SMs (batch 1-8, 7x7 layers). A fuller 128-wide grid beats the
// 64-wide one even when its last wave is mostly empty (a lone block on an SM runs ~1.6x faster): 64 wide was
// 1.2-1.4x slower on every 7x7 / 14x14 layer at batch 256, 512->512 3x3 at 7x7 included (NOTES v7, K12).
// big_ok (wgmma dense convolutions that im2col_ok() in launch.h admits): the 192x256 tile (one block an SM, both
// operands by TMA) where its grid takes at most 1.25x the waves-worth of tile area of the 128x128 grid at two
// blocks an SM (waves x tile area per SM: 192 x 256 against 2 x 128 x 128; a 192x256 block does more work per
// unit of area, so a slightly emptier last wave still pays), and K >= 256. Forced onto all dense layer shapes
// with > 128 outputs (K23, H100, batch 256, the im2col tile), it was 1.05-1.62x faster wherever this picks it,
// 0.85-0.93x on 1x1 convs at 7x7 with K <= 256 (area ratio 1.5), and 0.94-1.10x with K = 128; the wave
// condition alone, without the 1.25, missed 512->896 1x1 @14x14 (ratio 1.09, 1.14x faster big) (NOTES v10).
// One-wave 128 grids (batch 1) never qualify: 1.25 x 2 x 128 x 128 < 192 x 256.
// DLA_FAST_CUDA_WIDE_BN=64|128|256 overrides the choice for benchmarking (256 only where big_ok, else 128).
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
    const char* e = std::getenv("DLA_FAST_CUDA_WIDE_BN");
    if (e != nullptr && *e != '\0') {
      DLA_CHECK(std::strcmp(e, "64") == 0 || std::strcmp(e, "128") == 0 || std::strcmp(e, "256") == 0,
                "DLA_FAST_CUDA_WIDE_BN must be 64, 128 or 256; got '", e, "'");
      bn = std::atoi(e);
      if (bn == 256 && !(big_ok && groups == 1)) bn = 128;
    }
  }
  return bn;
}

// DLA_FAST_CUDA_IM2COL=0 keeps the cp.async gather on the 64/128-wide wgmma tiles of the convs that could load A
// by TMA im2col (benchmarking the two against each other; the 192x256 tile has only TMA). Default 1.
inline bool im2col_enabled() {
  const char* e = std::getenv("DLA_FAST_CUDA_IM2COL");
  if (e == nullptr || *e == '\0') return true;
  DLA_CHECK(std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0, "DLA_FAST_CUDA_IM2COL must be 0 or 1; got '", e,
            "'");
  return *e == '1';
}

inline const char* dtype_name(DType dt) { return dt == DType::F16 ? "f16" : dt == DType::BF16 ? "bf16" : "f32"; }

}  // namespace dla_fast
