#pragma once
#include "sparsekern/common.h"

namespace sparsekern {

// An activation applied by the measuring pass (float32 only): y = clamp(x, lo, hi) with torch.clamp's
// semantics (a value equal to a bound, such as -0.0 against 0, and NaN pass through), stored to y,
// which has x's strides (y == x: in place); every statistic is then of y. lo = 0 with hi = +inf is
// ReLU, lo = 0 with hi = 6 ReLU6.
struct Clamp {
  float lo, hi;
  void* y;
};

// out_max[n*C + c] = max over (r, l) of |x[n, c, r, l]| as float32; NaN if any element was NaN.
// out_pos (nullable): number of elements > 0 per (n, c).
// out_lo / out_hi (both null or both set): the signed min and max of x[n, c, :, :] as float32, from
// the same pass; NaN where out_max is NaN; +inf / -inf over no positions; a zero may be +-0.0.
// clamp (nullable; float32 with out_pos, out_lo and out_hi set): the Clamp epilogue above.
// Runs the instruction-set variant in use (cpu_dispatch.h).
void channel_absmax_cpu(const void* x, DType dtype, const View4& v, float* out_max, int64_t* out_pos,
                        float* out_lo, float* out_hi, const Clamp* clamp);

// The statistics update of one batch in one call (csrc/cpu_dispatch.cpp; the Python contract is
// sparsekern/ops/channel_stats_update.py): the per-(n, c) pass of channel_absmax_cpu (into
// `maxima` when non-null, else a scratch buffer of this call) folded into per-channel accumulators,
// each of length C unless said otherwise:
//   mx = max(mx, max over non-NaN samples of m); nan_samples / inf_samples += samples whose m is
//   NaN / +Inf; positive += elements > 0; value_min / value_max = min / max with the non-NaN samples'
//   signed min / max; histogram (nullable, C x buckets int64) += one count per sample in bucket
//   0 (m == 0), 1 + (bits(m) >> (23 - hist_bits)) (m > 0 finite) or buckets - 1 (NaN / Inf);
//   two-pass (reference nullable): pass2_counts[c * T + i] += samples with
//   double(m) / double(reference[c]) < thresholds[i], pass2_max = max(pass2_max, batch max).
// clamp (nullable, float32): the activation applied in the same pass; the statistics are of its output.
void channel_stats_cpu(const void* x, DType dtype, const View4& v, float* maxima, float* mx, int64_t* nan_samples,
                       int64_t* inf_samples, int64_t* positive, float* value_min, float* value_max,
                       int64_t* histogram, int64_t buckets, int hist_bits, const float* reference,
                       const double* thresholds, int64_t num_thresholds, int64_t* pass2_counts, float* pass2_max,
                       const Clamp* clamp);

// sparsekern/stats/checksums.py's checksum of `count` float32 maxima, in one pass: the int64 sum of
// their bit patterns, with every NaN counted as -1 and +-0.0 as 0.
int64_t maxima_checksum_cpu(const float* m, int64_t count);

#ifdef SPARSEKERN_WITH_CUDA
// Same contract on device pointers, launched on the current device (the caller makes it the
// one holding x: sparsekern/_backend.py, cuda_device) and `stream` (a cudaStream_t there).
// Returns a non-empty error string on failure.
const char* channel_absmax_cuda(const void* x, DType dtype, const View4& v, float* out_max,
                                int64_t* out_pos, float* out_lo, float* out_hi, void* stream);

// channel_stats_cpu's contract on device pointers (thresholds too), on `stream`: the channel_absmax
// kernels into stream-ordered scratch (cudaMallocAsync), then one thread per channel accumulating.
const char* channel_stats_cuda(const void* x, DType dtype, const View4& v, float* maxima, float* mx,
                               int64_t* nan_samples, int64_t* inf_samples, int64_t* positive, float* value_min,
                               float* value_max, int64_t* histogram, int64_t buckets, int hist_bits,
                               const float* reference, const double* thresholds, int64_t num_thresholds,
                               int64_t* pass2_counts, float* pass2_max, void* stream);
#endif

}  // namespace sparsekern
