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

// The tasks of an inner-channel kernel (stride_c == 1: channels_last, (N, C)): each owns one
// sample n, a block of up to kBlock channels and a chunk of the positions, and keeps running
// results for its channels in a kBlock-long slot of a partials buffer, merged afterwards.
// Positions are split into chunks only when the (n, channel block) pairs alone cannot fill the
// cores, and then into chunks of at least 32 positions.
struct ChannelBlockTasks {
  static constexpr int64_t kBlock = 256;

  struct Task {
    int64_t n, c0, cb;  // sample, first channel, channels in this block
    int64_t p0, p1;     // positions [p0, p1)
  };

  int64_t c, positions, cblocks, splits, count;
  int threads;

  ChannelBlockTasks(int64_t n, int64_t c, int64_t positions)
      : c(c), positions(positions), cblocks((c + kBlock - 1) / kBlock), splits(1),
        threads(threads_for(n * c * positions)) {
    if (n * cblocks < 2 * threads && positions >= 64) {
      splits = std::min<int64_t>((2 * threads + n * cblocks - 1) / (n * cblocks), positions / 32);
      splits = std::max<int64_t>(splits, 1);
    }
    count = n * cblocks * splits;
  }

  // Task t; the splits of one (n, channel block) pair are consecutive tasks.
  Task operator[](int64_t t) const {
    const int64_t s = t % splits, nb = t / splits;
    const int64_t c0 = (nb % cblocks) * kBlock;
    return Task{nb / cblocks, c0, std::min(kBlock, c - c0), positions * s / splits, positions * (s + 1) / splits};
  }

  // Where split s of pair nb (= n * cblocks + channel block) keeps its channel k, in partials.
  int64_t slot(int64_t nb, int64_t s, int64_t k) const { return (nb * splits + s) * kBlock + k; }
};

}  // namespace cpu
}  // namespace sparsekern
