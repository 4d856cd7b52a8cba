// bn_relu on the CPU: y = max(0, x * scale[c] + shift[c]) in x's dtype (math in float32), with
// an optional per-(n, c) max of y from the same pass, so measuring sparsity costs no extra read.
//
// Layouts, as in channel_absmax.cpp:
//  * rows   (stride_l == 1 in x and y, e.g. NCHW): each (n, c) is R contiguous rows of L
//           elements with one scale/shift; OpenMP over the N*C (n, c) pairs. A dead row is
//           never read; it is written as zeros unless the caller says the output already
//           holds them (write_dead = false: then it is not touched at all).
//  * inner-channel (stride_c == 1 in x and y, e.g. channels_last or (N, C)): each position
//           holds a contiguous run of channels, processed 8 at a time with per-channel
//           scale/shift vectors; a task owns (n, block of channels, chunk of positions) and keeps
//           its running maxima in a small buffer. A group of 8 channels that are all dead is
//           never loaded; in a group mixing dead and live channels the dead lanes share the
//           vector load but are masked to 0 before anything uses them.
// Anything else goes through a scalar strided loop (correct, not fast).
// x and y may be the same buffer (in place, vx == vy): every element is read before it is written.
//
// NaN: relu(NaN) = NaN as in torch (maxps returns its second operand when either is NaN, so
// the value goes second). Max instructions drop NaN operands, so a NaN seen by a (n, c) is
// tracked in a separate mask and written as its max at the end.
// The max is taken over float32 values before rounding to x's dtype; rounding is monotonic, so
// rounding the max once gives exactly the max of the stored y.
//
// Compiled once per instruction-set variant, into sparsekern::<variant> (cpu_isa.h).
#include "sparsekern/bn_relu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "sparsekern/cpu_parallel.h"
#include "sparsekern/cpu_simd.h"

SPARSEKERN_ISA_BEGIN  // no #include below this line (cpu_isa.h)
namespace sparsekern {
namespace SPARSEKERN_ISA {
namespace {

using simd::bf16_t;
using simd::f16_t;
using simd::store1;
using simd::to_float;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// max(0, v) with the same NaN rule as the vector path: NaN stays NaN.
inline float relu1(float v) { return 0.0f > v ? 0.0f : v; }

// The float32 value a stored T holds, so the reported max equals the max of y exactly.
template <typename T>
inline float round_trip(float v) {
  T t;
  store1(&t, v);
  return to_float(t);
}

#ifdef SPARSEKERN_AVX2
inline __m256 affine8(__m256 x, __m256 s, __m256 b) {
#ifdef SPARSEKERN_FMA
  return _mm256_fmadd_ps(x, s, b);
#else
  return _mm256_add_ps(_mm256_mul_ps(x, s), b);
#endif
}
#endif

struct RowMax {
  float mx = 0.0f;
  bool nan = false;
};

// One contiguous run of `len` elements of a single (n, c): y = relu(x * s + b), max into acc.
template <typename T, bool MAX>
inline void affine_relu_row(const T* x, T* y, int64_t len, float s, float b, RowMax& acc) {
  int64_t i = 0;
#ifdef SPARSEKERN_AVX2
  if (len >= 8) {
    const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b), zero = _mm256_setzero_ps();
    __m256 m0 = zero, m1 = zero, bad = zero;
    for (; i + 16 <= len; i += 16) {
      const __m256 a0 = _mm256_max_ps(zero, affine8(simd::load8(x + i), vs, vb));
      const __m256 a1 = _mm256_max_ps(zero, affine8(simd::load8(x + i + 8), vs, vb));
      simd::store8(y + i, a0);
      simd::store8(y + i + 8, a1);
      if (MAX) {
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a0, a1, _CMP_UNORD_Q));  // either one NaN
        m0 = _mm256_max_ps(m0, a0);
        m1 = _mm256_max_ps(m1, a1);
      }
    }
    for (; i + 8 <= len; i += 8) {
      const __m256 a = _mm256_max_ps(zero, affine8(simd::load8(x + i), vs, vb));
      simd::store8(y + i, a);
      if (MAX) {
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        m0 = _mm256_max_ps(m0, a);
      }
    }
    if (MAX) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
      for (float v : lanes) acc.mx = std::max(acc.mx, v);
      if (_mm256_movemask_ps(bad)) acc.nan = true;
    }
  }
#endif
  for (; i < len; ++i) {
    const float a = relu1(std::fma(to_float(x[i]), s, b));
    store1(y + i, a);
    if (MAX) {
      if (a != a) acc.nan = true;
      acc.mx = std::max(acc.mx, a);
    }
  }
}

template <typename T>
inline void zero_row(T* y, int64_t len) {
  std::memset(static_cast<void*>(y), 0, static_cast<size_t>(len) * sizeof(T));  // +0 in every dtype
}

template <typename T, bool MAX>
void rows_kernel(const T* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                 bool write_dead, T* y, const View4& vy, float* out_max) {
  const int64_t tasks = vx.n * vx.c;
  // Both sides hold each (n, c) as one run when its R rows follow each other without gaps.
  const bool flat = vx.r == 1 || (vx.sr == vx.l && vy.sr == vy.l);
#pragma omp parallel for schedule(static) num_threads(cpu::threads_for(tasks * vx.r * vx.l))
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n = t / vx.c, c = t % vx.c;
    const T* xb = x + n * vx.sn + c * vx.sc;
    T* yb = y + n * vy.sn + c * vy.sc;
    RowMax acc;
    if (dead && dead[c]) {
      if (!write_dead) {
        // neither read nor written: the caller says y already holds 0 here (or nothing reads it)
      } else if (flat) {
        zero_row(yb, vx.r * vx.l);
      } else {
        for (int64_t r = 0; r < vx.r; ++r) zero_row(yb + r * vy.sr, vx.l);
      }
    } else if (flat) {
      affine_relu_row<T, MAX>(xb, yb, vx.r * vx.l, scale[c], shift[c], acc);
    } else {
      for (int64_t r = 0; r < vx.r; ++r)
        affine_relu_row<T, MAX>(xb + r * vx.sr, yb + r * vy.sr, vx.l, scale[c], shift[c], acc);
    }
    if (MAX) out_max[t] = acc.nan ? kNaN : round_trip<T>(acc.mx);
  }
}

constexpr int64_t kChannelBlock = cpu::ChannelBlockTasks::kBlock;

// Per-call channel facts for the inner-channel layout: which lanes are live (as float bit
// masks, for an AND), and which 8-channel groups are entirely dead (skipped without a load).
struct DeadLanes {
  std::vector<uint32_t> live_bits;
  std::vector<uint8_t> group_dead;

  DeadLanes(const uint8_t* dead, int64_t c) : live_bits(c), group_dead((c + 7) / 8) {
    for (int64_t i = 0; i < c; ++i) live_bits[i] = dead[i] ? 0u : 0xffffffffu;
    for (int64_t g = 0; g < (c + 7) / 8; ++g) {
      bool all = true;
      for (int64_t i = g * 8; i < std::min(c, g * 8 + 8); ++i) all = all && dead[i];
      group_dead[g] = all;
    }
  }
};

// Positions [p0, p1) of sample n, channels [c0, c0 + cb): write y, keep maxima in mx / bad.
template <typename T, bool MAX, bool DEAD>
void inner_channel_block(const T* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                         bool write_dead, const DeadLanes* lanes, T* y, const View4& vy, int64_t n, int64_t c0, int64_t cb, int64_t p0,
                         int64_t p1, float* mx, float* bad) {
  if (MAX) {
    for (int64_t c = 0; c < cb; ++c) { mx[c] = 0.0f; bad[c] = 0.0f; }
  }
  const T* xb = x + n * vx.sn + c0;  // stride_c == 1 on both sides
  T* yb = y + n * vy.sn + c0;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t r = p / vx.l, l = p % vx.l;
    const T* xrow = xb + r * vx.sr + l * vx.sl;
    T* yrow = yb + r * vy.sr + l * vy.sl;
    int64_t c = 0;
#ifdef SPARSEKERN_AVX2
    const __m256 zero = _mm256_setzero_ps();
    for (; c + 8 <= cb; c += 8) {
      if (DEAD && lanes->group_dead[(c0 + c) / 8]) {
        if (write_dead) simd::store8(yrow + c, zero);
        continue;
      }
      __m256 a = affine8(simd::load8(xrow + c), _mm256_loadu_ps(scale + c0 + c), _mm256_loadu_ps(shift + c0 + c));
      a = _mm256_max_ps(zero, a);
      if (DEAD) {
        a = _mm256_and_ps(a, _mm256_loadu_ps(reinterpret_cast<const float*>(lanes->live_bits.data() + c0 + c)));
      }
      simd::store8(yrow + c, a);
      if (MAX) {
        _mm256_storeu_ps(mx + c, _mm256_max_ps(_mm256_loadu_ps(mx + c), a));
        _mm256_storeu_ps(bad + c, _mm256_or_ps(_mm256_loadu_ps(bad + c), _mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
      }
    }
#endif
    for (; c < cb; ++c) {
      if (DEAD && dead[c0 + c]) {
        if (write_dead) store1(yrow + c, 0.0f);
        continue;
      }
      const float a = relu1(std::fma(to_float(xrow[c]), scale[c0 + c], shift[c0 + c]));
      store1(yrow + c, a);
      if (MAX) {
        if (a != a) bad[c] = 1.0f;  // any nonzero bit pattern marks NaN
        mx[c] = std::max(mx[c], a);
      }
    }
  }
}

template <typename T, bool MAX, bool DEAD>
void inner_channel_kernel(const T* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                          bool write_dead, T* y, const View4& vy, float* out_max) {
  const cpu::ChannelBlockTasks tasks(vx.n, vx.c, vx.r * vx.l);
  std::optional<DeadLanes> lanes_storage;
  if (DEAD) lanes_storage.emplace(dead, vx.c);
  const DeadLanes* lanes = DEAD ? &*lanes_storage : nullptr;
  // Partial maxima per task, merged below (cheap: tasks * kChannelBlock values).
  std::vector<float> pmx(MAX ? tasks.count * kChannelBlock : 0), pbad(MAX ? tasks.count * kChannelBlock : 0);
#pragma omp parallel for schedule(static) num_threads(tasks.threads)
  for (int64_t t = 0; t < tasks.count; ++t) {
    const cpu::ChannelBlockTasks::Task task = tasks[t];
    inner_channel_block<T, MAX, DEAD>(x, vx, scale, shift, dead, write_dead, lanes, y, vy, task.n, task.c0, task.cb, task.p0,
                                      task.p1, MAX ? &pmx[t * kChannelBlock] : nullptr,
                                      MAX ? &pbad[t * kChannelBlock] : nullptr);
  }
  if (!MAX) return;
  for (int64_t nb = 0; nb < vx.n * tasks.cblocks; ++nb) {
    const cpu::ChannelBlockTasks::Task block = tasks[nb * tasks.splits];
    for (int64_t c = 0; c < block.cb; ++c) {
      float m = 0.0f;
      bool nan = false;
      for (int64_t s = 0; s < tasks.splits; ++s) {
        const int64_t i = tasks.slot(nb, s, c);
        m = std::max(m, pmx[i]);
        nan = nan || pbad[i] != 0.0f;
      }
      out_max[block.n * vx.c + block.c0 + c] = nan ? kNaN : round_trip<T>(m);
    }
  }
}

template <typename T, bool MAX>
void strided_kernel(const T* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                    bool write_dead, T* y, const View4& vy, float* out_max) {
#pragma omp parallel for schedule(static) num_threads(cpu::threads_for(vx.n * vx.c * vx.r * vx.l))
  for (int64_t t = 0; t < vx.n * vx.c; ++t) {
    const int64_t n = t / vx.c, c = t % vx.c;
    const bool is_dead = dead && dead[c];
    RowMax acc;
    for (int64_t r = 0; r < vx.r; ++r)
      for (int64_t l = 0; l < vx.l; ++l) {
        T* out = y + n * vy.sn + c * vy.sc + r * vy.sr + l * vy.sl;
        if (is_dead) {
          if (write_dead) store1(out, 0.0f);
          continue;
        }
        const float a = relu1(std::fma(to_float(x[n * vx.sn + c * vx.sc + r * vx.sr + l * vx.sl]), scale[c], shift[c]));
        store1(out, a);
        if (MAX) {
          if (a != a) acc.nan = true;
          acc.mx = std::max(acc.mx, a);
        }
      }
    if (MAX) out_max[t] = acc.nan ? kNaN : round_trip<T>(acc.mx);
  }
}

template <typename T, bool MAX>
void dispatch_layout(const T* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                     bool write_dead, T* y, const View4& vy, float* out_max) {
  const bool rows = vx.sl == 1 && vy.sl == 1;
  const bool inner_channel = vx.sc == 1 && vy.sc == 1;
  if (rows && (vx.l >= 16 || !inner_channel)) {
    rows_kernel<T, MAX>(x, vx, scale, shift, dead, write_dead, y, vy, out_max);
  } else if (inner_channel) {
    if (dead) {
      inner_channel_kernel<T, MAX, true>(x, vx, scale, shift, dead, write_dead, y, vy, out_max);
    } else {
      inner_channel_kernel<T, MAX, false>(x, vx, scale, shift, dead, write_dead, y, vy, out_max);
    }
  } else {
    strided_kernel<T, MAX>(x, vx, scale, shift, dead, write_dead, y, vy, out_max);
  }
}

template <typename T>
void dispatch_max(const void* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                  bool write_dead, void* y, const View4& vy, float* out_max) {
  if (out_max) {
    dispatch_layout<T, true>(static_cast<const T*>(x), vx, scale, shift, dead, write_dead, static_cast<T*>(y), vy,
                                    out_max);
  } else {
    dispatch_layout<T, false>(static_cast<const T*>(x), vx, scale, shift, dead, write_dead, static_cast<T*>(y), vy,
                                    out_max);
  }
}

}  // namespace

void bn_relu_cpu(const void* x, DType dtype, const View4& vx, const float* scale, const float* shift,
                 const uint8_t* dead, bool write_dead, void* y, const View4& vy, float* out_max) {
  switch (dtype) {
    case DType::kFloat32: dispatch_max<float>(x, vx, scale, shift, dead, write_dead, y, vy, out_max); break;
    case DType::kFloat16: dispatch_max<f16_t>(x, vx, scale, shift, dead, write_dead, y, vy, out_max); break;
    case DType::kBFloat16: dispatch_max<bf16_t>(x, vx, scale, shift, dead, write_dead, y, vy, out_max); break;
  }
}

}  // namespace SPARSEKERN_ISA
}  // namespace sparsekern
SPARSEKERN_ISA_END
