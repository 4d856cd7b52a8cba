// Torch-free types shared by the CPU and CUDA kernels: raw pointers, int64 sizes and
// element strides. Keeping torch out of the ABI means a torch upgrade never breaks _C.
#pragma once
#include <cstdint>

namespace sparsekern {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// An activation seen as (N, C, R, L) with element strides; see sparsekern/ops/_layout.py.
struct View4 {
  int64_t n, c, r, l;
  int64_t sn, sc, sr, sl;
};

}  // namespace sparsekern
