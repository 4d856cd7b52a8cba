// channel_absmax on the CPU: out[n, c] = max |x[n, c, :, :]|, NaN-propagating, with an
// optional count of positive elements and an optional signed min and max (the "range") from the
// same pass.
//
// Two layouts get a vectorised path:
//  * rows   (stride_l == 1, e.g. NCHW): each (n, c) reduces R contiguous rows of L elements;
//           OpenMP over the N*C (n, c) pairs.
//  * inner-channel (stride_c == 1, e.g. channels_last, or (N, C)): each position holds a
//           contiguous run of channels; a task owns (n, block of channels, chunk of
//           positions) and keeps its running maxima in a small buffer, so every byte is read
//           once and sequentially. Position chunks exist so that small N still fills the cores.
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
  if (len >= 32) {
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
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    for (float v : lanes) acc.mx = std::max(acc.mx, v);
    if (_mm256_movemask_ps(bad)) acc.nan = true;
    if (COUNT) {
      alignas(32) int32_t cl[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(cl), _mm256_add_epi32(c0, c1));
      for (int32_t v : cl) acc.pos += v;
    }
    if (RANGE) {
      alignas(32) float los[8], his[8];
      _mm256_store_ps(los, _mm256_min_ps(lo0, lo1));
      _mm256_store_ps(his, _mm256_max_ps(hi0, hi1));
      for (int k = 0; k < 8; ++k) {
        acc.lo = std::min(acc.lo, los[k]);
        acc.hi = std::max(acc.hi, his[k]);
      }
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

// Reduce positions [p0, p1) of sample n, channels [c0, c0 + cb), into mx / bad / cnt / lo / hi.
template <typename T, bool COUNT, bool RANGE>
void inner_channel_block(const T* x, const View4& v, int64_t n, int64_t c0, int64_t cb, int64_t p0,
                         int64_t p1, float* mx, float* bad, int32_t* cnt, float* lo, float* hi) {
  for (int64_t c = 0; c < cb; ++c) {
    mx[c] = 0.0f;
    bad[c] = 0.0f;
    if (COUNT) cnt[c] = 0;  // cnt is null when not counting
    if (RANGE) {            // lo / hi are null without a range
      lo[c] = std::numeric_limits<float>::infinity();
      hi[c] = -std::numeric_limits<float>::infinity();
    }
  }
  const T* base = x + n * v.sn + c0;  // stride_c == 1
  for (int64_t p = p0; p < p1; ++p) {
    const T* row = base + (p / v.l) * v.sr + (p % v.l) * v.sl;
    int64_t c = 0;
#ifdef SPARSEKERN_AVX2
    const __m256 zero = _mm256_setzero_ps();
    for (; c + 8 <= cb; c += 8) {
      __m256 a = simd::load8(row + c);
      _mm256_storeu_ps(mx + c, _mm256_max_ps(_mm256_loadu_ps(mx + c), simd::abs8(a)));
      _mm256_storeu_ps(bad + c, _mm256_or_ps(_mm256_loadu_ps(bad + c), _mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
      if (COUNT) {
        __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + c));
        k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(a, zero, _CMP_GT_OQ)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cnt + c), k);
      }
      if (RANGE) {
        _mm256_storeu_ps(lo + c, _mm256_min_ps(_mm256_loadu_ps(lo + c), a));
        _mm256_storeu_ps(hi + c, _mm256_max_ps(_mm256_loadu_ps(hi + c), a));
      }
    }
#endif
    for (; c < cb; ++c) {
      const float a = to_float(row[c]);
      if (a != a) bad[c] = 1.0f;  // any nonzero bit pattern marks NaN
      mx[c] = std::max(mx[c], std::fabs(a));
      if (COUNT) cnt[c] += a > 0.0f;
      if (RANGE) {
        lo[c] = std::min(lo[c], a);
        hi[c] = std::max(hi[c], a);
      }
    }
  }
}

template <typename T, bool COUNT, bool RANGE>
void inner_channel_kernel(const T* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi) {
  const cpu::ChannelBlockTasks tasks(v.n, v.c, v.r * v.l);
  // Partial results per task; merged below (cheap: tasks * kChannelBlock values).
  std::vector<float> pmx(tasks.count * kChannelBlock), pbad(tasks.count * kChannelBlock);
  std::vector<int32_t> pcnt(COUNT ? tasks.count * kChannelBlock : 0);
  std::vector<float> plo(RANGE ? tasks.count * kChannelBlock : 0), phi(RANGE ? tasks.count * kChannelBlock : 0);
#pragma omp parallel for schedule(static) num_threads(tasks.threads)
  for (int64_t t = 0; t < tasks.count; ++t) {
    const cpu::ChannelBlockTasks::Task task = tasks[t];
    inner_channel_block<T, COUNT, RANGE>(x, v, task.n, task.c0, task.cb, task.p0, task.p1, &pmx[t * kChannelBlock],
                                         &pbad[t * kChannelBlock], COUNT ? &pcnt[t * kChannelBlock] : nullptr,
                                         RANGE ? &plo[t * kChannelBlock] : nullptr,
                                         RANGE ? &phi[t * kChannelBlock] : nullptr);
  }
  for (int64_t nb = 0; nb < v.n * tasks.cblocks; ++nb) {
    const cpu::ChannelBlockTasks::Task block = tasks[nb * tasks.splits];
    for (int64_t c = 0; c < block.cb; ++c) {
      RowAcc acc;
      for (int64_t s = 0; s < tasks.splits; ++s) {
        const int64_t i = tasks.slot(nb, s, c);
        acc.mx = std::max(acc.mx, pmx[i]);
        acc.nan = acc.nan || pbad[i] != 0.0f;
        if (COUNT) acc.pos += pcnt[i];
        if (RANGE) {
          acc.lo = std::min(acc.lo, plo[i]);
          acc.hi = std::max(acc.hi, phi[i]);
        }
      }
      write<COUNT, RANGE>(acc, block.n * v.c + block.c0 + c, out, pos, lo, hi);
    }
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
