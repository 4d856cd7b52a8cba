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
// Optional clamp epilogue (channel_absmax.h, Clamp; float32 only): every element is clamped as
// torch.clamp does, stored to y (x's strides, possibly x itself) and measured after the clamp, so
// a ReLU / ReLU6 and its statistics read the activation once.
//
// NaN handling: max instructions drop NaN operands, so NaN is tracked in a separate mask
// and written as the result at the end (into the min and max too). A zero min or max may come
// out as either +0.0 or -0.0 (min/max instructions do not order the two zeros).
//
// Compiled once per instruction-set variant, into sparsekern::<variant> (cpu_isa.h).
#include "sparsekern/channel_absmax.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
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

// Where the clamp epilogue writes: y's element at the position of x's element p (same strides;
// `shift` is the byte distance y - x, 0 in place).
struct ClampArgs {
  float lo = 0.0f, hi = 0.0f;
  uintptr_t shift = 0;
};

template <typename T>
inline T* out_of(const T* p, uintptr_t shift) {
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) + shift);
}

// torch.clamp of one element: a value equal to a bound (-0.0 against 0) and NaN pass through.
inline float clamp1(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

#ifdef SPARSEKERN_AVX2
// The same on 8 lanes: max_ps(a, b) is a > b ? a : b and min_ps(a, b) is a < b ? a : b, so with
// the bound first, equal values and NaN give the second operand, x.
inline __m256 clamp8(__m256 x, __m256 lo, __m256 hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, x)); }
#endif

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

// Reduce `len` contiguous elements into acc (clamped and stored first with ACT).
template <typename T, bool COUNT, bool RANGE, bool ACT>
inline void reduce_row(const T* p, int64_t len, RowAcc& acc, const ClampArgs& ca) {
  int64_t i = 0;
  T* const w = ACT ? out_of(p, ca.shift) : nullptr;
#ifdef SPARSEKERN_AVX2
  if (len >= 8) {  // short rows too (7x7, 3x3 + 1 of late stages): one vector, then the scalar tail
    __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
    __m256 bad = _mm256_setzero_ps();
    __m256i c0 = _mm256_setzero_si256(), c1 = c0;
    const __m256 zero = _mm256_setzero_ps();
    __m256 lo0 = _mm256_set1_ps(acc.lo), lo1 = lo0, hi0 = _mm256_set1_ps(acc.hi), hi1 = hi0;
    const __m256 clo = _mm256_set1_ps(ca.lo), chi = _mm256_set1_ps(ca.hi);
    for (; i + 32 <= len; i += 32) {
      __m256 a0 = simd::load8(p + i), a1 = simd::load8(p + i + 8);
      __m256 a2 = simd::load8(p + i + 16), a3 = simd::load8(p + i + 24);
      if (ACT) {
        a0 = clamp8(a0, clo, chi);
        a1 = clamp8(a1, clo, chi);
        a2 = clamp8(a2, clo, chi);
        a3 = clamp8(a3, clo, chi);
        simd::store8(w + i, a0);
        simd::store8(w + i + 8, a1);
        simd::store8(w + i + 16, a2);
        simd::store8(w + i + 24, a3);
      }
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
      __m256 a0 = simd::load8(p + i);
      if (ACT) {
        a0 = clamp8(a0, clo, chi);
        simd::store8(w + i, a0);
      }
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
  for (; i < len; ++i) {
    float a = to_float(p[i]);
    if (ACT) {
      a = clamp1(a, ca.lo, ca.hi);
      simd::store1(w + i, a);
    }
    take<COUNT, RANGE>(a, acc);
  }
}

template <typename T, bool COUNT, bool RANGE, bool ACT>
void rows_kernel(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi, const ClampArgs& ca) {
  const int64_t tasks = v.n * v.c;
#pragma omp parallel for schedule(static) num_threads(cpu::threads_for(tasks * v.r * v.l))
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n = t / v.c, c = t % v.c;
    const T* base = x + n * v.sn + c * v.sc;
    RowAcc acc;
    if (v.r == 1 || v.sr == v.l) {
      reduce_row<T, COUNT, RANGE, ACT>(base, v.r * v.l, acc, ca);
    } else {
      for (int64_t r = 0; r < v.r; ++r) reduce_row<T, COUNT, RANGE, ACT>(base + r * v.sr, v.l, acc, ca);
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
template <int V, typename T, bool COUNT, bool RANGE, bool ACT>
inline void tile_slice(const T* const* rows, int64_t len, int64_t c, BlockAcc& acc, const ClampArgs& ca) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 clo = _mm256_set1_ps(ca.lo), chi = _mm256_set1_ps(ca.hi);
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
      __m256 a = simd::load8(rows[k] + c + 8 * j), b = simd::load8(rows[k + 1] + c + 8 * j);
      if (ACT) {
        a = clamp8(a, clo, chi);
        b = clamp8(b, clo, chi);
        simd::store8(out_of(rows[k], ca.shift) + c + 8 * j, a);
        simd::store8(out_of(rows[k + 1], ca.shift) + c + 8 * j, b);
      }
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
      __m256 a = simd::load8(rows[k] + c + 8 * j);
      if (ACT) {
        a = clamp8(a, clo, chi);
        simd::store8(out_of(rows[k], ca.shift) + c + 8 * j, a);
      }
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
template <typename T, bool COUNT, bool RANGE, bool ACT>
void inner_channel_block(const T* x, const View4& v, int64_t n, int64_t c0, int64_t cb, int64_t p0,
                         int64_t p1, BlockAcc& acc, const ClampArgs& ca) {
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
    for (; c + 32 <= cb; c += 32) tile_slice<4, T, COUNT, RANGE, ACT>(rows, len, c, acc, ca);
    for (; c + 16 <= cb; c += 16) tile_slice<2, T, COUNT, RANGE, ACT>(rows, len, c, acc, ca);
    for (; c + 8 <= cb; c += 8) tile_slice<1, T, COUNT, RANGE, ACT>(rows, len, c, acc, ca);
#endif
    for (; c < cb; ++c) {
      for (int64_t k = 0; k < len; ++k) {
        float a = to_float(rows[k][c]);
        if (ACT) {
          a = clamp1(a, ca.lo, ca.hi);
          simd::store1(out_of(rows[k], ca.shift) + c, a);
        }
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
  int64_t c = 0;
#ifdef SPARSEKERN_AVX2
  // 8 channels per step (with few positions per sample, as in late 3x3 stages, writing the results
  // one channel at a time cost as much as reading the activation).
  const __m256 nan = _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), zero = _mm256_setzero_ps();
  for (; c + 8 <= cb; c += 8) {
    // bad holds 0 or a nonzero pattern (a compare mask, which reads as NaN, or 1.0f): unordered-or-unequal.
    const __m256 seen_nan = _mm256_cmp_ps(_mm256_loadu_ps(acc.bad + c), zero, _CMP_NEQ_UQ);
    _mm256_storeu_ps(out + t0 + c, _mm256_blendv_ps(_mm256_loadu_ps(acc.mx + c), nan, seen_nan));
    if (COUNT) {
      const __m256i cnt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc.cnt + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos + t0 + c), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(cnt)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos + t0 + c + 4),
                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(cnt, 1)));
    }
    if (RANGE) {
      _mm256_storeu_ps(lo + t0 + c, _mm256_blendv_ps(_mm256_loadu_ps(acc.lo + c), nan, seen_nan));
      _mm256_storeu_ps(hi + t0 + c, _mm256_blendv_ps(_mm256_loadu_ps(acc.hi + c), nan, seen_nan));
    }
  }
#endif
  for (; c < cb; ++c) {
    RowAcc r;
    r.mx = acc.mx[c];
    r.nan = acc.bad[c] != 0.0f;
    r.pos = acc.cnt[c];
    r.lo = acc.lo[c];
    r.hi = acc.hi[c];
    write<COUNT, RANGE>(r, t0 + c, out, pos, lo, hi);
  }
}

template <typename T, bool COUNT, bool RANGE, bool ACT>
void inner_channel_kernel(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi,
                          const ClampArgs& ca) {
  const cpu::ChannelBlockTasks tasks(v.n, v.c, v.r * v.l);
  if (tasks.splits == 1) {  // each task owns whole (n, channel block) results: written at once
#pragma omp parallel for schedule(static) num_threads(tasks.threads)
    for (int64_t t = 0; t < tasks.count; ++t) {
      const cpu::ChannelBlockTasks::Task task = tasks[t];
      BlockAcc acc;
      inner_channel_block<T, COUNT, RANGE, ACT>(x, v, task.n, task.c0, task.cb, task.p0, task.p1, acc, ca);
      write_block<COUNT, RANGE>(acc, task.cb, task.n * v.c + task.c0, out, pos, lo, hi);
    }
    return;
  }
  // Position chunks of one (n, channel block) pair run as separate tasks: partials, merged below.
  std::vector<BlockAcc> partials(tasks.count);
#pragma omp parallel for schedule(static) num_threads(tasks.threads)
  for (int64_t t = 0; t < tasks.count; ++t) {
    const cpu::ChannelBlockTasks::Task task = tasks[t];
    inner_channel_block<T, COUNT, RANGE, ACT>(x, v, task.n, task.c0, task.cb, task.p0, task.p1, partials[t], ca);
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

template <typename T, bool COUNT, bool RANGE, bool ACT>
void strided_kernel(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi, const ClampArgs& ca) {
#pragma omp parallel for schedule(static) num_threads(cpu::threads_for(v.n * v.c * v.r * v.l))
  for (int64_t t = 0; t < v.n * v.c; ++t) {
    const int64_t n = t / v.c, c = t % v.c;
    RowAcc acc;
    for (int64_t r = 0; r < v.r; ++r) {
      for (int64_t l = 0; l < v.l; ++l) {
        const T* p = x + n * v.sn + c * v.sc + r * v.sr + l * v.sl;
        float a = to_float(*p);
        if (ACT) {
          a = clamp1(a, ca.lo, ca.hi);
          simd::store1(out_of(p, ca.shift), a);
        }
        take<COUNT, RANGE>(a, acc);
      }
    }
    write<COUNT, RANGE>(acc, t, out, pos, lo, hi);
  }
}

template <typename T, bool COUNT, bool RANGE, bool ACT = false>
void dispatch_layout(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi,
                     const ClampArgs& ca = ClampArgs()) {
  if (v.sl == 1 && v.l >= 16) {
    rows_kernel<T, COUNT, RANGE, ACT>(x, v, out, pos, lo, hi, ca);
  } else if (v.sc == 1) {
    inner_channel_kernel<T, COUNT, RANGE, ACT>(x, v, out, pos, lo, hi, ca);
  } else if (v.sl == 1) {
    rows_kernel<T, COUNT, RANGE, ACT>(x, v, out, pos, lo, hi, ca);
  } else {
    strided_kernel<T, COUNT, RANGE, ACT>(x, v, out, pos, lo, hi, ca);
  }
}

template <typename T>
void dispatch_flags(const void* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi, const Clamp* clamp) {
  const T* p = static_cast<const T*>(x);
  if constexpr (std::is_same_v<T, float>) {
    if (clamp) {  // the clamp epilogue: with counts and range only (channel_stats_cpu's pass)
      ClampArgs ca;
      ca.lo = clamp->lo;
      ca.hi = clamp->hi;
      ca.shift = reinterpret_cast<uintptr_t>(clamp->y) - reinterpret_cast<uintptr_t>(x);
      dispatch_layout<T, true, true, true>(p, v, out, pos, lo, hi, ca);
      return;
    }
  }
  if (lo) {
    pos ? dispatch_layout<T, true, true>(p, v, out, pos, lo, hi) : dispatch_layout<T, false, true>(p, v, out, pos, lo, hi);
  } else {
    pos ? dispatch_layout<T, true, false>(p, v, out, pos, lo, hi) : dispatch_layout<T, false, false>(p, v, out, pos, lo, hi);
  }
}

}  // namespace

// The running per-channel values of channel_stats_cpu (channel_absmax.h) from one batch's per-(n, c)
// results, row by row over blocks of 64 channels (contiguous reads, running values in registers or
// small arrays), parallel over the blocks when there are many values. Every comparison has the
// scalar loop's semantics: a NaN maximum is counted, never taken as the max; a (n, c) whose range
// is NaN (it saw a NaN) leaves value_min / value_max alone.
void channel_stats_accumulate(const float* m, const float* lo, const float* hi, const int64_t* pos, int64_t n,
                              int64_t c, float* mx, int64_t* nan_samples, int64_t* inf_samples, int64_t* positive,
                              float* value_min, float* value_max) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (c + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n * c > 32768)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kBlock, cb = std::min(kBlock, c - c0);
    float bmax[kBlock], vmin[kBlock], vmax[kBlock];
    int32_t nan[kBlock], inf[kBlock];  // per batch: at most N < 2^31 samples
    int64_t p[kBlock];
    for (int64_t j = 0; j < cb; ++j) {
      bmax[j] = 0.0f;
      vmin[j] = std::numeric_limits<float>::infinity();
      vmax[j] = -std::numeric_limits<float>::infinity();
      nan[j] = inf[j] = 0;
      p[j] = 0;
    }
    int64_t j0 = 0;
#ifdef SPARSEKERN_AVX2
    const __m256 kInf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    for (; j0 + 8 <= cb; j0 += 8) {
      __m256 bm = _mm256_loadu_ps(bmax + j0), mn = _mm256_loadu_ps(vmin + j0), mxv = _mm256_loadu_ps(vmax + j0);
      __m256i nn = _mm256_setzero_si256(), ni = nn, p0 = nn, p1 = nn;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = i * c + c0 + j0;
        const __m256 mi = _mm256_loadu_ps(m + row), l = _mm256_loadu_ps(lo + row), h = _mm256_loadu_ps(hi + row);
        p0 = _mm256_add_epi64(p0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + row)));
        p1 = _mm256_add_epi64(p1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + row + 4)));
        nn = _mm256_sub_epi32(nn, _mm256_castps_si256(_mm256_cmp_ps(mi, mi, _CMP_UNORD_Q)));
        ni = _mm256_sub_epi32(ni, _mm256_castps_si256(_mm256_cmp_ps(mi, kInf, _CMP_EQ_OQ)));
        bm = _mm256_max_ps(mi, bm);  // mi > bm ? mi : bm
        const __m256 finite_range = _mm256_cmp_ps(l, h, _CMP_ORD_Q);
        mn = _mm256_blendv_ps(mn, l, _mm256_and_ps(finite_range, _mm256_cmp_ps(l, mn, _CMP_LT_OQ)));
        mxv = _mm256_blendv_ps(mxv, h, _mm256_and_ps(finite_range, _mm256_cmp_ps(h, mxv, _CMP_GT_OQ)));
      }
      _mm256_storeu_ps(bmax + j0, bm);
      _mm256_storeu_ps(vmin + j0, mn);
      _mm256_storeu_ps(vmax + j0, mxv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(nan + j0), nn);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(inf + j0), ni);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j0), p0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j0 + 4), p1);
    }
#endif
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = i * c + c0;
      for (int64_t j = j0; j < cb; ++j) {
        const float mi = m[row + j], l = lo[row + j], h = hi[row + j];
        p[j] += pos[row + j];
        nan[j] += mi != mi;
        inf[j] += mi == std::numeric_limits<float>::infinity();  // m = max |x| >= 0
        bmax[j] = mi > bmax[j] ? mi : bmax[j];
        const bool finite_range = l == l && h == h;
        vmin[j] = finite_range && l < vmin[j] ? l : vmin[j];
        vmax[j] = finite_range && h > vmax[j] ? h : vmax[j];
      }
    }
    for (int64_t j = 0; j < cb; ++j) {
      const int64_t ch = c0 + j;
      if (bmax[j] > mx[ch]) mx[ch] = bmax[j];
      nan_samples[ch] += nan[j];
      inf_samples[ch] += inf[j];
      positive[ch] += p[j];
      if (vmin[j] < value_min[ch]) value_min[ch] = vmin[j];
      if (vmax[j] > value_max[ch]) value_max[ch] = vmax[j];
    }
  }
}

int64_t maxima_checksum_cpu(const float* m, int64_t count) {
  // Integer tests on the bit patterns, without branches, so that the loop vectorises (in int64 lanes:
  // a sum of int32 bit patterns overflows int32 after two of them).
  int64_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    int32_t bits;
    std::memcpy(&bits, m + i, sizeof bits);
    const int32_t magnitude = bits & 0x7fffffff;
    // Masks rather than a conditional (GCC does not vectorise that one): NaN -> -1, +-0.0 -> 0.
    const int32_t nan = -static_cast<int32_t>(magnitude > 0x7f800000);
    const int32_t keep = -static_cast<int32_t>(magnitude != 0) & ~nan;
    sum += static_cast<int64_t>((bits & keep) | nan);
  }
  return sum;
}

void channel_absmax_cpu(const void* x, DType dtype, const View4& v, float* out_max, int64_t* out_pos, float* out_lo,
                        float* out_hi, const Clamp* clamp) {
  switch (dtype) {
    case DType::kFloat32: dispatch_flags<float>(x, v, out_max, out_pos, out_lo, out_hi, clamp); break;
    case DType::kFloat16: dispatch_flags<simd::f16_t>(x, v, out_max, out_pos, out_lo, out_hi, nullptr); break;
    case DType::kBFloat16: dispatch_flags<simd::bf16_t>(x, v, out_max, out_pos, out_lo, out_hi, nullptr); break;
  }
}

}  // namespace SPARSEKERN_ISA
}  // namespace sparsekern
SPARSEKERN_ISA_END
