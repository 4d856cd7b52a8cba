// The instruction set that one compilation of the CPU kernels targets.
//
// CMake compiles every csrc/cpu/*.cpp once per variant, defining SPARSEKERN_ISA_<NAME>:
//   baseline  the compiler's default target (plain x86-64, or aarch64 etc.): scalar code
//   avx2      AVX2 + FMA + F16C: the 8-lane float32 paths
//   avx512    AVX2 + FMA + F16C + AVX-512 F/BW/DQ/VL: the same 8-lane code, which the compiler
//             may encode with EVEX (32 registers, masked tails of auto-vectorised loops)
//   native    SPARSEKERN_NATIVE=1: the only variant, everything compiled with -march=native
// csrc/cpu_dispatch.cpp picks one when the extension loads, from what the CPU supports.
//
// Each variant's code lives in namespace sparsekern::SPARSEKERN_ISA, so no symbol is shared
// between variants. The files themselves are compiled with the baseline flags, and only the
// code between SPARSEKERN_ISA_BEGIN and SPARSEKERN_ISA_END is marked for the variant's target
// (a target pragma / attribute). Per-file -mavx512f flags would not be safe: every inline or
// template function of a header (std::vector, std::max, ...) that such a file instantiates is
// emitted as a weak symbol compiled for AVX-512, and the linker keeps one copy of each for the
// whole library, possibly that one, which the baseline code then calls on a CPU without AVX-512.
// With the pragma, header code keeps the baseline target. Hence the one rule for these files:
// include every header before SPARSEKERN_ISA_BEGIN, never between BEGIN and END.
#pragma once

#if defined(SPARSEKERN_ISA_AVX512)
#define SPARSEKERN_ISA avx512
#define SPARSEKERN_ISA_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl"
#elif defined(SPARSEKERN_ISA_AVX2)
#define SPARSEKERN_ISA avx2
#define SPARSEKERN_ISA_TARGET "avx2,fma,f16c"
#elif defined(SPARSEKERN_ISA_NATIVE)
#define SPARSEKERN_ISA native
#else
#define SPARSEKERN_ISA baseline
#endif

// What the kernel code may use: SPARSEKERN_AVX2 (AVX2 + F16C intrinsics), SPARSEKERN_FMA.
#ifdef SPARSEKERN_ISA_TARGET
#define SPARSEKERN_AVX2 1
#define SPARSEKERN_FMA 1
#elif defined(__AVX2__) && defined(__F16C__)  // native, or a baseline built with such CXXFLAGS
#define SPARSEKERN_AVX2 1
#ifdef __FMA__
#define SPARSEKERN_FMA 1
#endif
#endif

#ifdef SPARSEKERN_AVX2
#include <immintrin.h>  // declares every intrinsic, whatever the command-line target
#endif

#define SPARSEKERN_PRAGMA(text) _Pragma(#text)
#if defined(SPARSEKERN_ISA_TARGET) && defined(__clang__)
#define SPARSEKERN_TARGET_PUSH(isa_target) \
  SPARSEKERN_PRAGMA(clang attribute push(__attribute__((target(isa_target))), apply_to = function))
#define SPARSEKERN_ISA_BEGIN SPARSEKERN_TARGET_PUSH(SPARSEKERN_ISA_TARGET)
#define SPARSEKERN_ISA_END _Pragma("clang attribute pop")
#elif defined(SPARSEKERN_ISA_TARGET)
#define SPARSEKERN_TARGET_PUSH(isa_target) _Pragma("GCC push_options") SPARSEKERN_PRAGMA(GCC target(isa_target))
#define SPARSEKERN_ISA_BEGIN SPARSEKERN_TARGET_PUSH(SPARSEKERN_ISA_TARGET)
#define SPARSEKERN_ISA_END _Pragma("GCC pop_options")
#else
#define SPARSEKERN_ISA_BEGIN
#define SPARSEKERN_ISA_END
#endif
