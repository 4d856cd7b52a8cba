// Small load/convert helpers for the CPU kernels: 8 lanes of float32 from float32, float16
// or bfloat16 storage and back (AVX2 + F16C in the variants compiled for them, scalar
// otherwise), in sparsekern::<variant>::simd (see cpu_isa.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sparsekern/cpu_isa.h"

SPARSEKERN_ISA_BEGIN
namespace sparsekern {
namespace SPARSEKERN_ISA {
namespace simd {

struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16_t v) {
#ifdef SPARSEKERN_AVX2
  return _cvtsh_ss(v.bits);
#else
  const uint32_t sign = (v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { e++; man <<= 1; } while ((man & 0x400u) == 0);
    u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even, NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t float_to_f16_bits(float f) {  // round to nearest even, NaN kept NaN
#ifdef SPARSEKERN_AVX2
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((u >> 13) & 0x3ffu));
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (u >= 0x38800000u) {  // normal half: rebias the exponent, round away the low 13 bits
    uint32_t r = u - (112u << 23);
    r += 0xfffu + ((r >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  // Subnormal half: adding 0.5f makes the FPU round |f| to a multiple of 2^-24 (nearest even).
  float a;
  std::memcpy(&a, &u, 4);
  a += 0.5f;
  uint32_t b;
  std::memcpy(&b, &a, 4);
  return static_cast<uint16_t>(sign | (b - 0x3f000000u));
#endif
}

// One float32 value stored as float32, float16 or bfloat16 (round to nearest even).
inline void store1(float* p, float v) { *p = v; }
inline void store1(f16_t* p, float v) { p->bits = float_to_f16_bits(v); }
inline void store1(bf16_t* p, float v) { p->bits = float_to_bf16_bits(v); }

#ifdef SPARSEKERN_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const bf16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
// Horizontal max / min / sum of the 8 lanes (log-step shuffles; NaN lanes: whatever max/min give,
// callers that can see NaN track it separately).
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline int64_t hsum8i(__m256i v) {  // in int64: the lane counts may each be near 2^31
  __m256i w = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                               _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  __m128i s = _mm_add_epi64(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  return _mm_cvtsi128_si64(_mm_add_epi64(s, _mm_unpackhi_epi64(s, s)));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(f16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(bf16_t* p, __m256 v) {  // round to nearest even, NaN kept NaN (as float_to_bf16_bits)
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet_nan),
                                           _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i hi = _mm256_srli_epi32(r, 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
}
#endif

}  // namespace simd
}  // namespace SPARSEKERN_ISA
}  // namespace sparsekern
SPARSEKERN_ISA_END
