// Runtime dispatch of the CPU kernels to the variant compiled for the best instruction set this
// CPU has (cpu_isa.h, cpu_dispatch.h). Compiled with the baseline target like bindings.cpp.
#include "sparsekern/cpu_dispatch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <iterator>
#include <stdexcept>
#include <vector>

#include "sparsekern/bn_relu.h"
#include "sparsekern/channel_absmax.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace sparsekern {

using ChannelAbsmaxFn = decltype(channel_absmax_cpu);
using BnReluFn = decltype(bn_relu_cpu);
using ChecksumFn = decltype(maxima_checksum_cpu);
// channel_stats_cpu's per-channel accumulation of one batch's (N, C) results (csrc/cpu/channel_absmax.cpp).
using StatsAccumulateFn = void(const float* m, const float* lo, const float* hi, const int64_t* pos, int64_t n,
                               int64_t c, float* mx, int64_t* nan_samples, int64_t* inf_samples, int64_t* positive,
                               float* value_min, float* value_max);

// Each compiled variant's kernels: sparsekern::<variant>::*, defined in csrc/cpu/*.cpp.
#define SPARSEKERN_VARIANT_KERNELS(isa) \
  namespace isa {                       \
  ChannelAbsmaxFn channel_absmax_cpu;   \
  StatsAccumulateFn channel_stats_accumulate; \
  BnReluFn bn_relu_cpu;                 \
  ChecksumFn maxima_checksum_cpu;       \
  }
#ifdef SPARSEKERN_HAVE_ISA_NATIVE
SPARSEKERN_VARIANT_KERNELS(native)
#endif
#ifdef SPARSEKERN_HAVE_ISA_AVX512
SPARSEKERN_VARIANT_KERNELS(avx512)
#endif
#ifdef SPARSEKERN_HAVE_ISA_AVX2
SPARSEKERN_VARIANT_KERNELS(avx2)
#endif
#ifdef SPARSEKERN_HAVE_ISA_BASELINE
SPARSEKERN_VARIANT_KERNELS(baseline)
#endif
#undef SPARSEKERN_VARIANT_KERNELS

namespace {

bool always() { return true; }

#if defined(__x86_64__) || defined(__i386__)
// __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers; F16C is
// not among the names every compiler knows, so it is read from CPUID leaf 1 directly.
bool cpu_has_avx2_fma_f16c() {
  __builtin_cpu_init();  // needed when called before the library's constructors have run
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
  return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool cpu_has_avx512() {
  return cpu_has_avx2_fma_f16c() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

struct Variant {
  const char* name;
  bool (*supported)();
  ChannelAbsmaxFn* channel_absmax;
  StatsAccumulateFn* stats_accumulate;
  BnReluFn* bn_relu;
  ChecksumFn* maxima_checksum;
};

// One row of kVariants: a variant's name, its CPU check and its kernels (one line per new op here).
#define SPARSEKERN_VARIANT(isa, supported) \
  {#isa, supported, isa::channel_absmax_cpu, isa::channel_stats_accumulate, isa::bn_relu_cpu, isa::maxima_checksum_cpu}

// Best first. native is the build machine's own target: it is the only variant of such a build.
const Variant kVariants[] = {
#ifdef SPARSEKERN_HAVE_ISA_NATIVE
    SPARSEKERN_VARIANT(native, always),
#endif
#ifdef SPARSEKERN_HAVE_ISA_AVX512
    SPARSEKERN_VARIANT(avx512, cpu_has_avx512),
#endif
#ifdef SPARSEKERN_HAVE_ISA_AVX2
    SPARSEKERN_VARIANT(avx2, cpu_has_avx2_fma_f16c),
#endif
#ifdef SPARSEKERN_HAVE_ISA_BASELINE
    SPARSEKERN_VARIANT(baseline, always),
#endif
};
#undef SPARSEKERN_VARIANT

const Variant* best_supported() {
  for (const Variant& v : kVariants)
    if (v.supported()) return &v;
  return &kVariants[std::size(kVariants) - 1];  // not reached: the last one, baseline or native, always runs
}

std::atomic<const Variant*>& active() {
  static std::atomic<const Variant*> variant{best_supported()};  // chosen once, at the first use
  return variant;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

std::vector<std::string> cpu_isas_compiled() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants) names.push_back(v.name);
  return names;
}

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants)
    if (v.supported()) names.push_back(v.name);
  return names;
}

std::string cpu_isa() { return active().load()->name; }

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    active().store(best_supported());
    return;
  }
  for (const Variant& v : kVariants) {
    if (name != v.name) continue;
    if (!v.supported())
      throw std::invalid_argument("this CPU does not support the " + name + " kernels (it runs: " +
                                  join(cpu_isas_supported()) + ")");
    active().store(&v);
    return;
  }
  const bool known = name == "baseline" || name == "avx2" || name == "avx512" || name == "native";
  throw std::invalid_argument((known ? "this build has no " + name + " kernels" : "unknown instruction set '" + name + "'") +
                              "; expected auto or one of this build's: " + join(cpu_isas_compiled()));
}

void channel_absmax_cpu(const void* x, DType dtype, const View4& v, float* out_max, int64_t* out_pos, float* out_lo,
                        float* out_hi, const Clamp* clamp) {
  active().load()->channel_absmax(x, dtype, v, out_max, out_pos, out_lo, out_hi, clamp);
}

int64_t maxima_checksum_cpu(const float* m, int64_t count) { return active().load()->maxima_checksum(m, count); }

void bn_relu_cpu(const void* x, DType dtype, const View4& vx, const float* scale, const float* shift,
                 const uint8_t* dead, bool write_dead, void* y, const View4& vy, float* out_max) {
  active().load()->bn_relu(x, dtype, vx, scale, shift, dead, write_dead, y, vy, out_max);
}

// One call per batch: the dispatched per-(n, c) pass, then the dispatched per-channel accumulation
// (channel_stats_accumulate, a loop over N x C values; the pass over the N x C x positions input
// dominates), then, only when asked for, the histogram and two-pass counts (scattered increments).
void channel_stats_cpu(const void* x, DType dtype, const View4& v, float* maxima, float* mx, int64_t* nan_samples,
                       int64_t* inf_samples, int64_t* positive, float* value_min, float* value_max,
                       int64_t* histogram, int64_t buckets, int hist_bits, const float* reference,
                       const double* thresholds, int64_t num_thresholds, int64_t* pass2_counts, float* pass2_max,
                       const Clamp* clamp) {
  const int64_t n = v.n, c = v.c, nc = v.n * v.c;
  // Per-(n, c) scratch, kept per calling thread and grown, never shrunk: fresh buffers of
  // N x C x 20 bytes per batch come from mmap and cost a page fault per 4 KiB, which measured
  // 3x the accumulation itself (64x1280x3x3: ~1 ms of ~1.4 ms). At most 20 bytes per (n, c) of
  // the largest batch seen stay allocated.
  struct Scratch {
    std::vector<float> m, lo, hi;
    std::vector<int64_t> pos;
  };
  thread_local Scratch scratch;
  if (scratch.lo.size() < static_cast<size_t>(nc)) {
    scratch.m.resize(nc);
    scratch.lo.resize(nc);
    scratch.hi.resize(nc);
    scratch.pos.resize(nc);
  }
  float* m = maxima ? maxima : scratch.m.data();
  channel_absmax_cpu(x, dtype, v, m, scratch.pos.data(), scratch.lo.data(), scratch.hi.data(), clamp);
  active().load()->stats_accumulate(m, scratch.lo.data(), scratch.hi.data(), scratch.pos.data(), n, c, mx,
                                    nan_samples, inf_samples, positive, value_min, value_max);
  if (!histogram && !reference) return;
  const int shift = 23 - hist_bits;
#pragma omp parallel for schedule(static) if (nc > 32768)
  for (int64_t ch = 0; ch < c; ++ch) {
    const double ref = reference ? static_cast<double>(reference[ch]) : 0.0;
    int64_t* hist = histogram ? histogram + ch * buckets : nullptr;
    int64_t* counts = reference ? pass2_counts + ch * num_thresholds : nullptr;
    float bmax = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float mi = m[i * c + ch];
      bmax = mi > bmax ? mi : bmax;  // NaN fails the comparison: never the max
      if (hist) {
        int64_t bucket = 0;
        if (std::isnan(mi) || std::isinf(mi)) {
          bucket = buckets - 1;
        } else if (mi > 0.0f) {
          int32_t bits;
          std::memcpy(&bits, &mi, sizeof bits);
          bucket = static_cast<int64_t>(bits >> shift) + 1;
        }
        ++hist[bucket];
      }
      if (counts) {
        const double ratio = static_cast<double>(mi) / ref;
        for (int64_t t = 0; t < num_thresholds; ++t) counts[t] += ratio < thresholds[t];
      }
    }
    if (reference && bmax > pass2_max[ch]) pass2_max[ch] = bmax;
  }
}

}  // namespace sparsekern
