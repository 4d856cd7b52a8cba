#pragma once
#include "sparsekern/common.h"

namespace sparsekern {

// y[n, c, p] = max(0, x[n, c, p] * scale[c] + shift[c]) in x's dtype (math in float32).
// dead (nullable, uint8 per channel): a dead channel's x is never read and y is 0 there; with
// write_dead = false the caller says y already holds 0 in dead channels (or nothing reads them),
// so whole runs / vectors of dead channels are not written either (a vector that mixes dead and
// live channels still writes its zeros). x and y may be the same buffer (in place, vx == vy).
// out_max (nullable): out_max[n*C + c] = max over p of y[n, c, p] (float32, NaN-propagating),
// from the same pass. x is laid out as vx, y as vy (same N, C, R, L; strides may differ).
// Runs the instruction-set variant in use (cpu_dispatch.h).
void bn_relu_cpu(const void* x, DType dtype, const View4& vx, const float* scale, const float* shift,
                 const uint8_t* dead, bool write_dead, void* y, const View4& vy, float* out_max);

#ifdef SPARSEKERN_WITH_CUDA
// Same contract on device pointers, launched on the current device (the caller makes it the
// one holding x) and `stream` (a cudaStream_t there). Returns a non-empty error string on failure.
const char* bn_relu_cuda(const void* x, DType dtype, const View4& vx, const float* scale, const float* shift,
                         const uint8_t* dead, bool write_dead, void* y, const View4& vy, float* out_max,
                         void* stream);
#endif

}  // namespace sparsekern
