// The per-call kernel configuration: the `int[] config` argument of conv_bn_act and aggregate, with which a
// per-layer plan picks the kernel and tile of each call, and the environment switches that override it.
//
//   []                          the extension's own rule (conv_bn_act.cpp, aggregate.cpp say what it picks).
//   [family, bn, a_load]        a choice; 0 in any element means "the rule's" for that element.
//     family  conv_bn_act: 1 wgmma (Hopper warpgroup MMAs), 2 tc (mma.sync tensor cores), 3 simt (CUDA-core
//             implicit GEMM), 4 direct (CUDA-core direct conv), 5 grouped (CUDA-core grouped 3x3, 8 channels a
//             group), 6 stem (the RGB 7x7 kernel), 7 blockdiag-wgmma and 8 blockdiag-tc (grouped convs with 4 or 8
//             channels a group as a block-diagonal GEMM over 32-channel super-groups).
//             aggregate: 1 wgmma, 2 tc, 3 simt.
//     bn      the output-channel tile: 16, 32, 64, 128 or 256 (256: the 192x256 wgmma tile, dense convs whose input
//             suits a TMA im2col map). Kernels with one width have it fixed: simt 64, direct 32, grouped 64 (8
//             groups of 8), stem 16, blockdiag 32.
//     a_load  how A (the input) reaches shared memory: 1 the kernel's own gather (cp.async on the tensor cores),
//             2 TMA in im2col mode (wgmma convs with bn >= 64 where im2col_ok(); bn 256 has only this).
//             aggregate: 0 or 1 (always gathered).
//
// A config that cannot run this call falls back element by element to what the rule would run: first the
// family (wgmma -> tc -> simt; blockdiag-wgmma -> blockdiag-tc -> the rule's family; grouped or stem -> the rule's
// family; simt and direct run everything), then bn (a width the family lacks for this call -> the rule's width
// for that family), then a_load (TMA where it cannot run -> the gather; bn 256 -> TMA). last_kernel() names what
// ran. A malformed config (wrong length, unknown family, a bn or a_load outside the sets above) is an error.
//
// conv_candidates / aggregate_candidates list the configs that run a call exactly as named, the rule's first.
//
// Debugging overrides, read once per process (the first op call), ahead of config:
//   DLA_FAST_CUDA_KERNEL=auto|wgmma|tc|simt|direct  the family (aggregate: direct means simt);
//   DLA_FAST_CUDA_WIDE_BN=64|128|256                 bn of the calls with more than 64 outputs a group;
//   DLA_FAST_CUDA_IM2COL=0|1                         a_load of the wgmma convs: 0 the gather, 1 TMA where it runs.
// Each falls back like config. An invalid value makes every conv_bn_act / aggregate call raise the same error.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "ops/host_utils.h"

namespace dla_fast {

enum Family : int {
  kRuleFamily = 0,
  kWgmma = 1,
  kTc = 2,
  kSimt = 3,
  kDirect = 4,
  kGrouped = 5,
  kStem = 6,
  kBlockdiagWgmma = 7,
  kBlockdiagTc = 8,
};
constexpr int kConvFamilies = 8;  // codes 1..8
constexpr int kAggregateFamilies = 3;  // codes 1..3

enum ALoad : int { kRuleALoad = 0, kGather = 1, kTma = 2 };

// The fixed output-channel widths of the one-width kernels (launch.h and the kernels say why).
constexpr int kSimtBn = 64, kDirectBn = 32, kGroupedBn = 64, kStemBn = 16, kBlockdiagBn = 32;

struct Config {
  int family = kRuleFamily, bn = 0, a_load = kRuleALoad;
  bool operator==(const Config& o) const { return family == o.family && bn == o.bn && a_load == o.a_load; }
};

inline const char* family_name(int f) {
  static const char* names[] = {"rule", "wgmma", "tc", "simt", "direct", "grouped", "stem", "blockdiag-wgmma",
                                "blockdiag-tc"};
  return f >= 0 && f <= kConvFamilies ? names[f] : "?";
}

inline bool valid_bn(int64_t bn) { return bn == 0 || bn == 16 || bn == 32 || bn == 64 || bn == 128 || bn == 256; }

// The config argument, checked for shape and codes (not for whether it can run this call: that falls back).
inline Config parse_config(at::IntArrayRef cfg, bool conv, const char* op) {
  if (cfg.empty()) return Config{};
  DLA_CHECK(cfg.size() == 3, op, ": config must be [] (the rule) or [family, bn, a_load], got ", cfg);
  const int nfam = conv ? kConvFamilies : kAggregateFamilies;
  DLA_CHECK(cfg[0] >= 0 && cfg[0] <= nfam, op, ": config ", cfg, " has family ", cfg[0], "; valid: 0 (the rule's), ",
            conv ? "1 wgmma, 2 tc, 3 simt, 4 direct, 5 grouped, 6 stem, 7 blockdiag-wgmma, 8 blockdiag-tc"
                 : "1 wgmma, 2 tc, 3 simt");
  DLA_CHECK(valid_bn(cfg[1]), op, ": config ", cfg, " has bn ", cfg[1],
            "; valid: 0 (the rule's), 16, 32, 64, 128, 256");
  DLA_CHECK(cfg[2] >= 0 && cfg[2] <= (conv ? 2 : 1), op, ": config ", cfg, " has a_load ", cfg[2], "; valid: ",
            conv ? "0 (the rule's), 1 gather, 2 TMA im2col" : "0 or 1 (the aggregate's input is always gathered)");
  return Config{static_cast<int>(cfg[0]), static_cast<int>(cfg[1]), static_cast<int>(cfg[2])};
}

// The environment overrides, parsed once. `error` is non-empty when a variable holds an invalid value.
struct EnvOverrides {
  int family = kRuleFamily;  // DLA_FAST_CUDA_KERNEL
  int wide_bn = 0;           // DLA_FAST_CUDA_WIDE_BN
  int a_load = kRuleALoad;   // DLA_FAST_CUDA_IM2COL (0 -> kGather, 1 -> kTma)
  std::string error;
};

inline EnvOverrides read_env_overrides() {
  EnvOverrides e;
  auto get = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v == nullptr ? std::string() : std::string(v);
  };
  const std::string k = get("DLA_FAST_CUDA_KERNEL"), bn = get("DLA_FAST_CUDA_WIDE_BN"),
                    im = get("DLA_FAST_CUDA_IM2COL");
  if (k == "wgmma" || k == "tc" || k == "simt" || k == "direct") {
    e.family = k == "wgmma" ? kWgmma : k == "tc" ? kTc : k == "simt" ? kSimt : kDirect;
  } else if (!k.empty() && k != "auto") {
    e.error += "DLA_FAST_CUDA_KERNEL must be one of auto, wgmma, tc, simt, direct; got '" + k + "'. ";
  }
  if (bn == "64" || bn == "128" || bn == "256") {
    e.wide_bn = std::stoi(bn);
  } else if (!bn.empty()) {
    e.error += "DLA_FAST_CUDA_WIDE_BN must be 64, 128 or 256; got '" + bn + "'. ";
  }
  if (im == "0" || im == "1") {
    e.a_load = im == "0" ? kGather : kTma;
  } else if (!im.empty()) {
    e.error += "DLA_FAST_CUDA_IM2COL must be 0 or 1; got '" + im + "'. ";
  }
  if (!e.error.empty()) e.error += "(debugging overrides of the CUDA backend's kernel choice; unset them to use it)";
  return e;
}

// The process's overrides: read at the first call (C++ static initialisation is thread-safe); checked by every
// conv_bn_act / aggregate / *_candidates call.
inline const EnvOverrides& env_overrides(const char* op) {
  static const EnvOverrides env = read_env_overrides();
  DLA_CHECK(env.error.empty(), op, ": ", env.error);
  return env;
}

// A list of configs as the candidates ops return it: 3 ints per config.
inline std::vector<int64_t> flatten(const std::vector<Config>& cs) {
  std::vector<int64_t> out;
  out.reserve(cs.size() * 3);
  for (const Config& c : cs) {
    out.push_back(c.family);
    out.push_back(c.bn);
    out.push_back(c.a_load);
  }
  return out;
}

}  // namespace dla_fast
