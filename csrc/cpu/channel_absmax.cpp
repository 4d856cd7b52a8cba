// channel_absmax on the CPU: out[n, c] = max |x[n, c, :, :]|, NaN-propagating, with an
// optional count of positive elements and an optional signed min and max (the "range") from the
// same pass.
//
// Two layouts get a vectorised path:
//  * rows   (stride_l == 1, e.g. NCHW): each (n, c) reduces R contiguous rows of L elements;
//           OpenMP over the N*C (n, c) pairs.
//  * inner-channel (stride_c == 1, e.g. channels_last, or (N, C)): each position holds a
//           contiguous run of channels; a task owns (n, block of channels, chunk of
//           positions) and walks its positions in tiles of 64, reducing each 32-, 16- or
//           8-channel slice of a tile in registers (running results in a per-task buffer
//           between tiles). Position chunks exist so that small N still fills the cores.
// Anything else goes through a scalar strided loop (correct, not fast).
//
// NaN handling: max instructions drop NaN operands, so NaN is tracked in a separate mask
// and written as the result at the end (into the min and max too). A zero min or max may come
// out as either +0.0 or -0.0 (min/max instructions do not order the two zeros).
//
// Compiled once per instruction-set variant, into sparsekern::<variant> (cpu_isa.h).
#include "sparsekern/channel_absmax.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "sparsekern/cpu_parallel.h"
#include "sparsekern/cpu_simd.h"

SPARSEKERN_ISA_BEGIN  // no #include below this line (cpu_isa.h)
namespace sparsekern {
namespace SPARSEKERN_ISA {
namespace {

using simd::bf16_t;
using simd::f16_t;
using simd::to_float;

struct RowAcc {
  float mx = 0.0f;
  bool nan = false;
  int64_t pos = 0;
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
};

// One scalar element into a running result.
template <bool COUNT, bool RANGE>
inline void take(float v, RowAcc& acc) {
  if (v != v) acc.nan = true;
  acc.mx = std::max(acc.mx, std::fabs(v));
  if (COUNT) acc.pos += v > 0.0f;
  if (RANGE) {
    acc.lo = std::min(acc.lo, v);
    acc.hi = std::max(acc.hi, v);
  }
}

// Write one (n, c) result: NaN in every output when a NaN was seen.
template <bool COUNT, bool RANGE>
inline void write(const RowAcc& acc, int64_t t, float* out, int64_t* pos, float* lo, float* hi) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  out[t] = acc.nan ? kNaN : acc.mx;
  if (COUNT) pos[t] = acc.pos;
  if (RANGE) {
    lo[t] = acc.nan ? kNaN : acc.lo;
    hi[t] = acc.nan ? kNaN : acc.hi;
  }
}

// Reduce `len` contiguous elements into acc.
template <typename T, bool COUNT, bool RANGE>
inline void reduce_row(const T* p, int64_t len, RowAcc& acc) {
  int64_t i = 0;
#ifdef SPARSEKERN_AVX2
  if (len >= 8) {  // short rows too (7x7, 3x3 + 1 of late stages): one vector, then the scalar tail
    __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
    __m256 bad = _mm256_setzero_ps();
    __m256i c0 = _mm256_setzero_si256(), c1 = c0;
    const __m256 zero = _mm256_setzero_ps();
    __m256 lo0 = _mm256_set1_ps(acc.lo), lo1 = lo0, hi0 = _mm256_set1_ps(acc.hi), hi1 = hi0;
    for (; i + 32 <= len; i += 32) {
      __m256 a0 = simd::load8(p + i), a1 = simd::load8(p + i + 8);
      __m256 a2 = simd::load8(p + i + 16), a3 = simd::load8(p + i + 24);
      if (COUNT) {
        c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(_mm256_cmp_ps(a0, zero, _CMP_GT_OQ)));
        c1 = _mm256_sub_epi32(c1, _mm256_castps_si256(_mm256_cmp_ps(a1, zero, _CMP_GT_OQ)));
        c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(_mm256_cmp_ps(a2, zero, _CMP_GT_OQ)));
        c1 = _mm256_sub_epi32(c1, _mm256_castps_si256(_mm256_cmp_ps(a3, zero, _CMP_GT_OQ)));
      }
      // unordered(a, b) is true if either is NaN: two compares cover four vectors.
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a0, a1, _CMP_UNORD_Q));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a2, a3, _CMP_UNORD_Q));
      m0 = _mm256_max_ps(m0, simd::abs8(a0));
      m1 = _mm256_max_ps(m1, simd::abs8(a1));
      m2 = _mm256_max_ps(m2, simd::abs8(a2));
      m3 = _mm256_max_ps(m3, simd::abs8(a3));
      if (RANGE) {  // a NaN operand is flagged in `bad` above; what min/max make of it is overridden
        lo0 = _mm256_min_ps(lo0, _mm256_min_ps(a0, a1));
        lo1 = _mm256_min_ps(lo1, _mm256_min_ps(a2, a3));
        hi0 = _mm256_max_ps(hi0, _mm256_max_ps(a0, a1));
        hi1 = _mm256_max_ps(hi1, _mm256_max_ps(a2, a3));
      }
    }
    for (; i + 8 <= len; i += 8) {
      const __m256 a0 = simd::load8(p + i);
      if (COUNT) c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(_mm256_cmp_ps(a0, zero, _CMP_GT_OQ)));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a0, a0, _CMP_UNORD_Q));
      m0 = _mm256_max_ps(m0, simd::abs8(a0));
      if (RANGE) {
        lo0 = _mm256_min_ps(lo0, a0);
        hi0 = _mm256_max_ps(hi0, a0);
      }
    }
    acc.mx = std::max(acc.mx, simd::hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3))));
    if (_mm256_movemask_ps(bad)) acc.nan = true;
    if (COUNT) acc.pos += simd::hsum8i(_mm256_add_epi32(c0, c1));
    if (RANGE) {
      acc.lo = std::min(acc.lo, simd::hmin8(_mm256_min_ps(lo0, lo1)));
      acc.hi = std::max(acc.hi, simd::hmax8(_mm256_max_ps(hi0, hi1)));
    }
  }
#endif
  for (; i < len; ++i) take<COUNT, RANGE>(to_float(p[i]), acc);
}

template <typename T, bool COUNT, bool RANGE>
void rows_kernel(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi) {
  const int64_t tasks = v.n * v.c;
#pragma omp parallel for schedule(static) num_threads(cpu::threads_for(tasks * v.r * v.l))
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n = t / v.c, c = t % v.c;
    const T* base = x + n * v.sn + c * v.sc;
    RowAcc acc;
    if (v.r == 1 || v.sr == v.l) {
      reduce_row<T, COUNT, RANGE>(base, v.r * v.l, acc);
    } else {
      for (int64_t r = 0; r < v.r; ++r) reduce_row<T, COUNT, RANGE>(base + r * v.sr, v.l, acc);
    }
    write<COUNT, RANGE>(acc, t, out, pos, lo, hi);
  }
}

constexpr int64_t kChannelBlock = cpu::ChannelBlockTasks::kBlock;
// Positions per tile: the tile's rows of a channel block (at most 64 x 256 values) stay in L1/L2
// while every 16-channel slice of the block is reduced over them in registers.
constexpr int64_t kTile = 64;

// Running results of one task's channels (the task's own, on its stack).
struct BlockAcc {
  float mx[kChannelBlock], bad[kChannelBlock], lo[kChannelBlock], hi[kChannelBlock];
  int32_t cnt[kChannelBlock];
};

#ifdef SPARSEKERN_AVX2
// Channels [c, c + 8 * V) (V = 4, 2, 1) of a tile of positions (rows[k] points at channel 0 of position k),
// folded into acc. The running results live in registers for the whole tile: a loop that kept
// them in acc would wait on a store-to-load round trip at every position. Two positions per
// step halve the dependency chain of each accumulator.
template <int V, typename T, bool COUNT, bool RANGE>
inline void tile_slice(const T* const* rows, int64_t len, int64_t c, BlockAcc& acc) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 m[V], bad[V], lo[V], hi[V];
  __m256i cnt[V];
  for (int j = 0; j < V; ++j) {
    m[j] = _mm256_loadu_ps(acc.mx + c + 8 * j);
    bad[j] = _mm256_loadu_ps(acc.bad + c + 8 * j);
    if (COUNT) cnt[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc.cnt + c + 8 * j));
    if (RANGE) {
      lo[j] = _mm256_loadu_ps(acc.lo + c + 8 * j);
      hi[j] = _mm256_loadu_ps(acc.hi + c + 8 * j);
    }
  }
  int64_t k = 0;
  for (; k + 2 <= len; k += 2) {
    for (int j = 0; j < V; ++j) {
      const __m256 a = simd::load8(rows[k] + c + 8 * j), b = simd::load8(rows[k + 1] + c + 8 * j);
      m[j] = _mm256_max_ps(m[j], _mm256_max_ps(simd::abs8(a), simd::abs8(b)));
      bad[j] = _mm256_or_ps(bad[j], _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
      if (COUNT) {
        cnt[j] = _mm256_sub_epi32(cnt[j], _mm256_castps_si256(_mm256_cmp_ps(a, zero, _CMP_GT_OQ)));
        cnt[j] = _mm256_sub_epi32(cnt[j], _mm256_castps_si256(_mm256_cmp_ps(b, zero, _CMP_GT_OQ)));
      }
      if (RANGE) {  // a NaN operand is flagged in `bad`; what min/max make of it is overridden
        lo[j] = _mm256_min_ps(lo[j], _mm256_min_ps(a, b));
        hi[j] = _mm256_max_ps(hi[j], _mm256_max_ps(a, b));
      }
    }
  }
  if (k < len) {
    for (int j = 0; j < V; ++j) {
      const __m256 a = simd::load8(rows[k] + c + 8 * j);
      m[j] = _mm256_max_ps(m[j], simd::abs8(a));
      bad[j] = _mm256_or_ps(bad[j], _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      if (COUNT) cnt[j] = _mm256_sub_epi32(cnt[j], _mm256_castps_si256(_mm256_cmp_ps(a, zero, _CMP_GT_OQ)));
      if (RANGE) {
        lo[j] = _mm256_min_ps(lo[j], a);
        hi[j] = _mm256_max_ps(hi[j], a);
      }
    }
  }
  for (int j = 0; j < V; ++j) {
    _mm256_storeu_ps(acc.mx + c + 8 * j, m[j]);
    _mm256_storeu_ps(acc.bad + c + 8 * j, bad[j]);
    if (COUNT) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc.cnt + c + 8 * j), cnt[j]);
    if (RANGE) {
      _mm256_storeu_ps(acc.lo + c + 8 * j, lo[j]);
      _mm256_storeu_ps(acc.hi + c + 8 * j, hi[j]);
    }
  }
}
#endif

// Reduce positions [p0, p1) of sample n, channels [c0, c0 + cb), into acc (tile by tile).
template <typename T, bool COUNT, bool RANGE>
void inner_channel_block(const T* x, const View4& v, int64_t n, int64_t c0, int64_t cb, int64_t p0,
                         int64_t p1, BlockAcc& acc) {
  for (int64_t c = 0; c < cb; ++c) {
    acc.mx[c] = 0.0f;
    acc.bad[c] = 0.0f;
    acc.cnt[c] = 0;
    acc.lo[c] = std::numeric_limits<float>::infinity();
    acc.hi[c] = -std::numeric_limits<float>::infinity();
  }
  const T* base = x + n * v.sn + c0;  // stride_c == 1
  const T* rows[kTile];
  // Position p = r * l + i sits at r * sr + i * sl: (r, i) advance with p, no division per position.
  int64_t r = p0 / v.l, i = p0 % v.l;
  for (int64_t q0 = p0; q0 < p1; q0 += kTile) {
    const int64_t len = std::min(kTile, p1 - q0);
    for (int64_t k = 0; k < len; ++k) {
      rows[k] = base + r * v.sr + i * v.sl;
      if (++i == v.l) {
        i = 0;
        ++r;
      }
    }
    int64_t c = 0;
#ifdef SPARSEKERN_AVX2
    for (; c + 32 <= cb; c += 32) tile_slice<4, T, COUNT, RANGE>(rows, len, c, acc);
    for (; c + 16 <= cb; c += 16) tile_slice<2, T, COUNT, RANGE>(rows, len, c, acc);
    for (; c + 8 <= cb; c += 8) tile_slice<1, T, COUNT, RANGE>(rows, len, c, acc);
#endif
    for (; c < cb; ++c) {
      for (int64_t k = 0; k < len; ++k) {
        const float a = to_float(rows[k][c]);
        if (a != a) acc.bad[c] = 1.0f;  // any nonzero bit pattern marks NaN
        acc.mx[c] = std::max(acc.mx[c], std::fabs(a));
        if (COUNT) acc.cnt[c] += a > 0.0f;
        if (RANGE) {
          acc.lo[c] = std::min(acc.lo[c], a);
          acc.hi[c] = std::max(acc.hi[c], a);
        }
      }
    }
  }
}

template <bool COUNT, bool RANGE>
inline void write_block(const BlockAcc& acc, int64_t cb, int64_t t0, float* out, int64_t* pos, float* lo, float* hi) {
  for (int64_t c = 0; c < cb; ++c) {
    RowAcc r;
    r.mx = acc.mx[c];
    r.nan = acc.bad[c] != 0.0f;
    r.pos = acc.cnt[c];
    r.lo = acc.lo[c];
    r.hi = acc.hi[c];
    write<COUNT, RANGE>(r, t0 + c, out, pos, lo, hi);
  }
}

template <typename T, bool COUNT, bool RANGE>
void inner_channel_kernel(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi) {
  const cpu::ChannelBlockTasks tasks(v.n, v.c, v.r * v.l);
  if (tasks.splits == 1) {  // each task owns whole (n, channel block) results: written at once
#pragma omp parallel for schedule(static) num_threads(tasks.threads)
    for (int64_t t = 0; t < tasks.count; ++t) {
      const cpu::ChannelBlockTasks::Task task = tasks[t];
      BlockAcc acc;
      inner_channel_block<T, COUNT, RANGE>(x, v, task.n, task.c0, task.cb, task.p0, task.p1, acc);
      write_block<COUNT, RANGE>(acc, task.cb, task.n * v.c + task.c0, out, pos, lo, hi);
    }
    return;
  }
  // Position chunks of one (n, channel block) pair run as separate tasks: partials, merged below.
  std::vector<BlockAcc> partials(tasks.count);
#pragma omp parallel for schedule(static) num_threads(tasks.threads)
  for (int64_t t = 0; t < tasks.count; ++t) {
    const cpu::ChannelBlockTasks::Task task = tasks[t];
    inner_channel_block<T, COUNT, RANGE>(x, v, task.n, task.c0, task.cb, task.p0, task.p1, partials[t]);
  }
  for (int64_t nb = 0; nb < v.n * tasks.cblocks; ++nb) {
    const cpu::ChannelBlockTasks::Task block = tasks[nb * tasks.splits];
    BlockAcc& merged = partials[nb * tasks.splits];
    for (int64_t s = 1; s < tasks.splits; ++s) {
      const BlockAcc& p = partials[nb * tasks.splits + s];
      for (int64_t c = 0; c < block.cb; ++c) {
        merged.mx[c] = std::max(merged.mx[c], p.mx[c]);
        if (p.bad[c] != 0.0f) merged.bad[c] = 1.0f;
        merged.cnt[c] += p.cnt[c];
        merged.lo[c] = std::min(merged.lo[c], p.lo[c]);
        merged.hi[c] = std::max(merged.hi[c], p.hi[c]);
      }
    }
    write_block<COUNT, RANGE>(merged, block.cb, block.n * v.c + block.c0, out, pos, lo, hi);
  }
}

template <typename T, bool COUNT, bool RANGE>
void strided_kernel(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi) {
#pragma omp parallel for schedule(static) num_threads(cpu::threads_for(v.n * v.c * v.r * v.l))
  for (int64_t t = 0; t < v.n * v.c; ++t) {
    const int64_t n = t / v.c, c = t % v.c;
    RowAcc acc;
    for (int64_t r = 0; r < v.r; ++r)
      for (int64_t l = 0; l < v.l; ++l) take<COUNT, RANGE>(to_float(x[n * v.sn + c * v.sc + r * v.sr + l * v.sl]), acc);
    write<COUNT, RANGE>(acc, t, out, pos, lo, hi);
  }
}

template <typename T, bool COUNT, bool RANGE>
void dispatch_layout(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi) {
  if (v.sl == 1 && v.l >= 16) {
    rows_kernel<T, COUNT, RANGE>(x, v, out, pos, lo, hi);
  } else if (v.sc == 1) {
    inner_channel_kernel<T, COUNT, RANGE>(x, v, out, pos, lo, hi);
  } else if (v.sl == 1) {
    rows_kernel<T, COUNT, RANGE>(x, v, out, pos, lo, hi);
  } else {
    strided_kernel<T, COUNT, RANGE>(x, v, out, pos, lo, hi);
  }
}

template <typename T>
void dispatch_flags(const void* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi) {
  const T* p = static_cast<const T*>(x);
  if (lo) {
    pos ? dispatch_layout<T, true, true>(p, v, out, pos, lo, hi) : dispatch_layout<T, false, true>(p, v, out, pos, lo, hi);
  } else {
    pos ? dispatch_layout<T, true, false>(p, v, out, pos, lo, hi) : dispatch_layout<T, false, false>(p, v, out, pos, lo, hi);
  }
}

}  // namespace

void channel_absmax_cpu(const void* x, DType dtype, const View4& v, float* out_max, int64_t* out_pos, float* out_lo,
                        float* out_hi) {
  switch (dtype) {
    case DType::kFloat32: dispatch_flags<float>(x, v, out_max, out_pos, out_lo, out_hi); break;
    case DType::kFloat16: dispatch_flags<simd::f16_t>(x, v, out_max, out_pos, out_lo, out_hi); break;
    case DType::kBFloat16: dispatch_flags<simd::bf16_t>(x, v, out_max, out_pos, out_lo, out_hi); break;
  }
}

}  // namespace SPARSEKERN_ISA
}  // namespace sparsekern
SPARSEKERN_ISA_END
