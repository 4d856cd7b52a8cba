#pragma once
#include "sparsekern/common.h"

namespace sparsekern {

// out_max[n*C + c] = max over (r, l) of |x[n, c, r, l]| as float32; NaN if any element was NaN.
// out_pos (nullable): number of elements > 0 per (n, c).
// out_lo / out_hi (both null or both set): the signed min and max of x[n, c, :, :] as float32, from
// the same pass; NaN where out_max is NaN; +inf / -inf over no positions; a zero may be +-0.0.
// Runs the instruction-set variant in use (cpu_dispatch.h).
void channel_absmax_cpu(const void* x, DType dtype, const View4& v, float* out_max, int64_t* out_pos,
                        float* out_lo, float* out_hi);

#ifdef SPARSEKERN_WITH_CUDA
// Same contract on device pointers, launched on the current device (the caller makes it the
// one holding x: sparsekern/_backend.py, cuda_device) and `stream` (a cudaStream_t there).
// Returns a non-empty error string on failure.
const char* channel_absmax_cuda(const void* x, DType dtype, const View4& v, float* out_max,
                                int64_t* out_pos, float* out_lo, float* out_hi, void* stream);
#endif

}  // namespace sparsekern
