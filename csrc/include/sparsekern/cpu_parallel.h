// How many OpenMP threads a CPU kernel should use for a given amount of work.
//
// A parallel region costs a fork/join; on a busy machine a join can wait milliseconds for a
// descheduled thread, which dwarfs the work of a small activation (a 28x28 feature map of a
// small batch is tens of microseconds of reading). So small inputs run serially and large ones
// get one thread per kMinElementsPerThread elements, up to the OpenMP maximum.
#pragma once
#include <algorithm>
#include <cstdint>

#ifdef SPARSEKERN_WITH_OPENMP
#include <omp.h>
#endif

namespace sparsekern {
namespace cpu {

constexpr int64_t kMinElementsPerThread = int64_t(1) << 18;  // 1 MiB of float32

inline int max_threads() {
#ifdef SPARSEKERN_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int threads_for(int64_t elements) {
  const int64_t wanted = elements / kMinElementsPerThread;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, max_threads())));
}

}  // namespace cpu
}  // namespace sparsekern
