// channel_absmax on CUDA: out[n, c] = max |x[n, c, r, l]| as float32, NaN-propagating, with an
// optional count of positive elements from the same pass.
//
// Exact by integer arithmetic. For non-negative IEEE values the bit patterns order like
// unsigned integers, and every NaN with its sign cleared sorts above +inf. So the kernels
// clear the sign bit and take an unsigned max of the raw storage bits:
//  * the max is exact in every dtype, subnormals included (float max instructions would
//    flush them under --use_fast_math's ftz);
//  * a NaN wins the max by itself: no separate flag;
//  * fp16 / bf16 are never converted except the one final value per (n, c).
// Likewise "x > 0" is "raw bits in [1, +inf]": sign clear, not zero, not NaN.
//
// The optional signed min and max (RANGE, out_lo / out_hi) use the same trick on an order key
// of the raw bits: positive values get the sign bit set, negative ones all bits flipped, so that
// unsigned order is float order (-inf < ... < -0.0 < +0.0 < ... < +inf; NaNs sort outside and
// are overridden: a (n, c) whose absmax is NaN gets NaN min and max). Exact in every dtype,
// no conversion until the final value. Split results meet through atomicMin / atomicMax on
// the keys, written into out_lo / out_hi (pre-filled with the identities), and a last small
// kernel turns keys into floats.
//
// Layouts (the same choice as the CPU kernel):
//  * rows (stride_l == 1, e.g. NCHW): a group of G lanes (4..32, by row length) reduces one
//    (n, c) row with 16-byte loads from the first 16-byte aligned element on (scalar head and
//    tail), four loads in flight per lane.
//  * channels (stride_c == 1, e.g. channels_last, (N, C)): a 256-thread block owns
//    (n, a tile of channels, a range of positions). threadIdx % TX picks VEC adjacent channels
//    (one 16-byte load when alignment allows), threadIdx / TX walks the positions, and a
//    shared-memory tree combines the position partials.
//  * anything else: the rows kernel with scalar strided loads.
// When N*C alone cannot fill the GPU, positions are split across groups / blocks; the partial
// results meet through atomicMax on the float bits (same ordering argument: non-negative
// floats and NaN) and atomicAdd on the counts, into outputs zeroed first.
//
// Launched on the current device, which the caller has made x's, and on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sparsekern/channel_absmax.h"

namespace sparsekern {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Storage traits: the unsigned type holding one element, the mask that clears its sign, the
// bits of +inf, and the conversion of a (sign-cleared) bit pattern to float.
struct F32 {
  using U = uint32_t;
  static constexpr uint32_t kAbs = 0x7fffffffu, kAll = 0xffffffffu, kInf = 0x7f800000u, kSign = 0x80000000u;
  static __device__ float to_float(uint32_t b) { return __uint_as_float(b); }
};
struct F16 {
  using U = uint16_t;
  static constexpr uint32_t kAbs = 0x7fffu, kAll = 0xffffu, kInf = 0x7c00u, kSign = 0x8000u;
  // Exact: every half (subnormals too) is a normal float; NaN stays NaN.
  static __device__ float to_float(uint32_t b) { return __half2float(__ushort_as_half(static_cast<unsigned short>(b))); }
};
struct BF16 {
  using U = uint16_t;
  static constexpr uint32_t kAbs = 0x7fffu, kAll = 0xffffu, kInf = 0x7f80u, kSign = 0x8000u;
  static __device__ float to_float(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
  }
};

// A thread's running result: max of sign-cleared bits, and (COUNT) the positives it saw.
// A thread's own count is 32-bit (overflow would need 2^32 elements through one thread);
// group and block totals are 64-bit.
// lo / hi (RANGE): the min and max order keys seen (identities kAll and 0 before any element).
struct Acc {
  uint32_t mx = 0;
  uint32_t pos = 0;
  uint32_t lo = 0xffffffffu;
  uint32_t hi = 0;
};

// The order key of raw storage bits (see the file comment) and back.
template <class D>
__device__ __forceinline__ uint32_t order_key(uint32_t raw) {
  return (raw & D::kSign) ? (~raw & D::kAll) : (raw | D::kSign);
}
template <class D>
__device__ __forceinline__ float key_to_float(uint32_t key) {
  return D::to_float((key & D::kSign) ? (key & D::kAbs) : (~key & D::kAll));
}

template <class D, bool COUNT, bool RANGE>
__device__ __forceinline__ void take(uint32_t raw, Acc& a) {
  a.mx = max(a.mx, raw & D::kAbs);
  if (COUNT) a.pos += ((raw - 1u) & D::kAll) < D::kInf;
  if (RANGE) {
    const uint32_t k = order_key<D>(raw);
    a.lo = min(a.lo, k);
    a.hi = max(a.hi, k);
  }
}

// One 16-byte word: 4 floats or 8 halves (little endian: the low half comes first).
template <class D, bool COUNT, bool RANGE>
__device__ __forceinline__ void take_vec(const uint4& w, Acc& a) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (sizeof(typename D::U) == 4) {
      take<D, COUNT, RANGE>(words[k], a);
    } else {
      take<D, COUNT, RANGE>(words[k] & 0xffffu, a);
      take<D, COUNT, RANGE>(words[k] >> 16, a);
    }
  }
}

template <class D>
__device__ __forceinline__ uint32_t load_bits(const typename D::U* p) {
  return static_cast<uint32_t>(__ldg(p));
}

// Store one (n, c) result; `atomic` when several splits contribute to it (outputs pre-zeroed,
// out_lo / out_hi pre-filled with the key identities; finish_range_kernel converts them after).
template <class D, bool COUNT, bool RANGE>
__device__ __forceinline__ void store(float* out, int64_t* pos, float* lo, float* hi, int64_t i, uint32_t mx,
                                      uint64_t count, uint32_t klo, uint32_t khi, bool atomic) {
  const float m = D::to_float(mx);  // non-negative or a positive NaN
  if (atomic) {
    atomicMax(reinterpret_cast<unsigned int*>(out + i), __float_as_uint(m));
    if (COUNT) atomicAdd(reinterpret_cast<unsigned long long*>(pos + i), static_cast<unsigned long long>(count));
    if (RANGE) {
      atomicMin(reinterpret_cast<unsigned int*>(lo + i), klo);
      atomicMax(reinterpret_cast<unsigned int*>(hi + i), khi);
    }
  } else {
    out[i] = m;
    if (COUNT) pos[i] = static_cast<int64_t>(count);
    if (RANGE) {
      const bool nan = mx > D::kInf;
      lo[i] = nan ? __uint_as_float(0x7fc00000u) : key_to_float<D>(klo);
      hi[i] = nan ? __uint_as_float(0x7fc00000u) : key_to_float<D>(khi);
    }
  }
}

// After a split launch: out_lo / out_hi hold order keys; make them floats (NaN where out is NaN).
template <class D>
__global__ void finish_range_kernel(const float* __restrict__ out, float* lo, float* hi, int64_t rows) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool nan = out[i] != out[i];
    const uint32_t klo = __float_as_uint(lo[i]), khi = __float_as_uint(hi[i]);
    lo[i] = nan ? __uint_as_float(0x7fc00000u) : key_to_float<D>(klo);
    hi[i] = nan ? __uint_as_float(0x7fc00000u) : key_to_float<D>(khi);
  }
}

// Every element of p set to v (the results over no positions).
__global__ void fill_kernel(float* p, float v, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = v;
}

// Reduce `len` contiguous elements at p with the `group` lanes of a group (lane = 0..group-1).
template <class D, bool COUNT, bool RANGE>
__device__ void reduce_contiguous(const typename D::U* p, int64_t len, int lane, int group, Acc& a) {
  using U = typename D::U;
  constexpr int kVec = 16 / sizeof(U);
  // Scalar head up to the first 16-byte boundary (p is always element aligned).
  const int64_t head = imin(((16 - reinterpret_cast<uintptr_t>(p) % 16) % 16) / sizeof(U), len);
  for (int64_t i = lane; i < head; i += group) take<D, COUNT, RANGE>(load_bits<D>(p + i), a);
  const uint4* vec = reinterpret_cast<const uint4*>(p + head);
  const int64_t nvec = (len - head) / kVec;
  int64_t i = lane;
  for (; i + 3 * group < nvec; i += 4 * group) {  // four independent loads in flight
    const uint4 w0 = __ldg(vec + i), w1 = __ldg(vec + i + group);
    const uint4 w2 = __ldg(vec + i + 2 * group), w3 = __ldg(vec + i + 3 * group);
    take_vec<D, COUNT, RANGE>(w0, a);
    take_vec<D, COUNT, RANGE>(w1, a);
    take_vec<D, COUNT, RANGE>(w2, a);
    take_vec<D, COUNT, RANGE>(w3, a);
  }
  for (; i < nvec; i += group) take_vec<D, COUNT, RANGE>(__ldg(vec + i), a);
  for (int64_t j = head + nvec * kVec + lane; j < len; j += group) take<D, COUNT, RANGE>(load_bits<D>(p + j), a);
}

// Work item = ((n, c) row, split). A group of `group` lanes takes one item; the loop is
// warp-uniform so every lane reaches the shuffles, valid item or not.
template <class D, bool COUNT, bool RANGE, bool CONTIG>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const typename D::U* __restrict__ x, View4 v, int group, int64_t splits, int64_t split_len,
                float* __restrict__ out, int64_t* __restrict__ pos, float* __restrict__ lo, float* __restrict__ hi) {
  const int64_t rows = v.n * v.c, items = rows * splits, positions = v.r * v.l;
  const int groups_per_warp = 32 / group;
  const int lane = threadIdx.x % 32, g_lane = lane % group;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; w * groups_per_warp < items;
       w += warps) {
    const int64_t item = w * groups_per_warp + lane / group;
    Acc a;
    if (item < items) {
      const int64_t t = item / splits, s = item % splits;
      const typename D::U* base = x + (t / v.c) * v.sn + (t % v.c) * v.sc;
      int64_t p = s * split_len;
      const int64_t p_end = imin(positions, p + split_len);
      int64_t r = p / v.l, l = p - r * v.l;
      while (p < p_end) {  // one contiguous run of a row r per step
        const int64_t len = imin(v.l - l, p_end - p);
        const typename D::U* run = base + r * v.sr + l * v.sl;
        if (CONTIG) {
          reduce_contiguous<D, COUNT, RANGE>(run, len, g_lane, group, a);
        } else {
          for (int64_t i = g_lane; i < len; i += group) take<D, COUNT, RANGE>(load_bits<D>(run + i * v.sl), a);
        }
        p += len;
        ++r;
        l = 0;
      }
    }
    uint64_t count = a.pos;
    for (int o = group / 2; o > 0; o >>= 1) {
      a.mx = max(a.mx, __shfl_xor_sync(kFullMask, a.mx, o));
      if (COUNT) count += __shfl_xor_sync(kFullMask, count, o);
      if (RANGE) {
        a.lo = min(a.lo, __shfl_xor_sync(kFullMask, a.lo, o));
        a.hi = max(a.hi, __shfl_xor_sync(kFullMask, a.hi, o));
      }
    }
    if (item < items && g_lane == 0)
      store<D, COUNT, RANGE>(out, pos, lo, hi, item / splits, a.mx, count, a.lo, a.hi, splits > 1);
  }
}

// Work unit = (n, channel tile, split), one per block at a time (block-uniform loop, so the
// __syncthreads are safe). Requires stride_c == 1; VEC > 1 also requires 16-byte alignment of
// every (n, position) run of channels and C % VEC == 0 (checked by the launcher).
template <class D, bool COUNT, bool RANGE, int VEC>
__global__ void __launch_bounds__(kThreads)
    channels_kernel(const typename D::U* __restrict__ x, View4 v, int tx_count, int64_t splits, int64_t split_len,
                    float* __restrict__ out, int64_t* __restrict__ pos, float* __restrict__ lo,
                    float* __restrict__ hi) {
  __shared__ uint32_t s_mx[VEC * kThreads];
  __shared__ unsigned long long s_pos[COUNT ? VEC * kThreads : 1];
  __shared__ uint32_t s_lo[RANGE ? VEC * kThreads : 1];
  __shared__ uint32_t s_hi[RANGE ? VEC * kThreads : 1];
  const int tx = threadIdx.x % tx_count, ty = threadIdx.x / tx_count, ty_count = kThreads / tx_count;
  const int64_t tile = static_cast<int64_t>(tx_count) * VEC;
  const int64_t tiles = (v.c + tile - 1) / tile, units = v.n * tiles * splits, positions = v.r * v.l;
  // Advancing a position by ty_count moves (r, l) by (dr, dl): no division in the loop.
  const int64_t dr = ty_count / v.l, dl = ty_count % v.l;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t s = u % splits, nt = u / splits, n = nt / tiles;
    const int64_t c0 = (nt % tiles) * tile + static_cast<int64_t>(tx) * VEC;
    Acc a[VEC];
    if (c0 < v.c) {
      const typename D::U* base = x + n * v.sn + c0;
      int64_t p = s * split_len + ty;
      const int64_t p_end = imin(positions, (s + 1) * split_len);
      int64_t r = p / v.l, l = p - r * v.l;
      // Several positions' loads in flight per thread; not for 8-channel (fp16/bf16) vectors,
      // whose eight accumulators already fill the registers (unrolling them spills on sm_90).
#pragma unroll(VEC > 4 ? 1 : 4)
      for (; p < p_end; p += ty_count) {
        const typename D::U* q = base + r * v.sr + l * v.sl;
        if (VEC > 1) {  // VEC adjacent channels, one accumulator each
          const uint4 w = __ldg(reinterpret_cast<const uint4*>(q));
          const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const uint32_t raw = sizeof(typename D::U) == 4 ? words[j] : (words[j / 2] >> (16 * (j % 2))) & 0xffffu;
            take<D, COUNT, RANGE>(raw, a[j]);
          }
        } else {
          take<D, COUNT, RANGE>(load_bits<D>(q), a[0]);
        }
        l += dl;
        r += dr;
        if (l >= v.l) {
          l -= v.l;
          ++r;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s_mx[j * kThreads + threadIdx.x] = a[j].mx;
      if (COUNT) s_pos[j * kThreads + threadIdx.x] = a[j].pos;
      if (RANGE) {
        s_lo[j * kThreads + threadIdx.x] = a[j].lo;
        s_hi[j * kThreads + threadIdx.x] = a[j].hi;
      }
    }
    __syncthreads();
    for (int half = ty_count / 2; half > 0; half /= 2) {  // tree over the position partials
      if (ty < half) {
        const int other = threadIdx.x + half * tx_count;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          s_mx[j * kThreads + threadIdx.x] = max(s_mx[j * kThreads + threadIdx.x], s_mx[j * kThreads + other]);
          if (COUNT) s_pos[j * kThreads + threadIdx.x] += s_pos[j * kThreads + other];
          if (RANGE) {
            s_lo[j * kThreads + threadIdx.x] = min(s_lo[j * kThreads + threadIdx.x], s_lo[j * kThreads + other]);
            s_hi[j * kThreads + threadIdx.x] = max(s_hi[j * kThreads + threadIdx.x], s_hi[j * kThreads + other]);
          }
        }
      }
      __syncthreads();
    }
    if (ty == 0 && c0 < v.c) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (c0 + j < v.c) {
          store<D, COUNT, RANGE>(out, pos, lo, hi, n * v.c + c0 + j, s_mx[j * kThreads + threadIdx.x],
                                 COUNT ? s_pos[j * kThreads + threadIdx.x] : 0,
                                 RANGE ? s_lo[j * kThreads + threadIdx.x] : 0u,
                                 RANGE ? s_hi[j * kThreads + threadIdx.x] : 0u, splits > 1);
        }
      }
    }
    __syncthreads();  // the next unit reuses the shared arrays
  }
}

inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t pow2_floor(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Positions per split so that `units` pieces of work become about `target`, each split at
// least `min_len` positions long (a multiple of `align`, which keeps split starts aligned).
int64_t split_length(int64_t units, int64_t positions, int64_t target, int64_t min_len, int64_t align) {
  if (units >= target || positions <= min_len) return positions;
  const int64_t wanted = imin(ceil_div(target, units), ceil_div(positions, min_len));
  return imin(positions, ceil_div(ceil_div(positions, wanted), align) * align);
}

// Split launches accumulate into pre-set outputs: zeros for the max and counts, key identities for
// the range (all ones for the min, zero for the max).
template <bool COUNT, bool RANGE>
void prefill(float* out, int64_t* pos, float* lo, float* hi, int64_t rows, cudaStream_t stream) {
  cudaMemsetAsync(out, 0, rows * sizeof(float), stream);
  if (COUNT) cudaMemsetAsync(pos, 0, rows * sizeof(int64_t), stream);
  if (RANGE) {
    cudaMemsetAsync(lo, 0xff, rows * sizeof(float), stream);
    cudaMemsetAsync(hi, 0, rows * sizeof(float), stream);
  }
}

template <class D, bool COUNT, bool RANGE>
const char* launch(const void* x_raw, const View4& v, float* out, int64_t* pos, float* lo, float* hi,
                   cudaStream_t stream, int sms) {
  using U = typename D::U;
  constexpr int kVec = 16 / sizeof(U);
  const U* x = static_cast<const U*>(x_raw);
  const int64_t rows = v.n * v.c, positions = v.r * v.l;
  const int64_t max_blocks = static_cast<int64_t>(sms) * (2048 / kThreads);  // one full wave
  int64_t split_len = positions, splits = 1;

  const bool rows_layout = (v.sl == 1 && v.l >= 16) || v.sc != 1;
  if (rows_layout) {
    const bool contig = v.sl == 1;
    // Group size: about two 16-byte loads per lane per row (or two elements when strided).
    // A split gives each lane at least four loads' worth (one unrolled step).
    const int64_t per_lane = contig ? 2 * kVec : 2;
    const int group = static_cast<int>(imin(32, imax(4, pow2_floor(v.l / per_lane))));
    const int64_t groups_in_flight = max_blocks * (kThreads / group);
    split_len = split_length(rows, positions, groups_in_flight, static_cast<int64_t>(group) * per_lane * 2, kVec);
    splits = ceil_div(positions, split_len);
    if (splits > 1) prefill<COUNT, RANGE>(out, pos, lo, hi, rows, stream);
    const int64_t blocks = imin(ceil_div(rows * splits, kThreads / group), max_blocks);
    if (contig) {
      rows_kernel<D, COUNT, RANGE, true><<<blocks, kThreads, 0, stream>>>(x, v, group, splits, split_len, out, pos,
                                                                          lo, hi);
    } else {
      rows_kernel<D, COUNT, RANGE, false><<<blocks, kThreads, 0, stream>>>(x, v, group, splits, split_len, out, pos,
                                                                           lo, hi);
    }
  } else {
    // stride_c == 1. Vector loads need every run of channels 16-byte aligned and whole vectors.
    const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && v.c % kVec == 0 && v.sn % kVec == 0 &&
                     v.sr % kVec == 0 && v.sl % kVec == 0;
    const int64_t lanes_needed = ceil_div(v.c, vec ? kVec : 1);
    const int tx_count = static_cast<int>(imin(32, pow2_ceil(lanes_needed)));
    const int64_t tiles = ceil_div(v.c, static_cast<int64_t>(tx_count) * (vec ? kVec : 1));
    const int ty_count = kThreads / tx_count;
    // A split gives each thread at least eight positions.
    split_len = split_length(v.n * tiles, positions, max_blocks, static_cast<int64_t>(ty_count) * 8, 1);
    splits = ceil_div(positions, split_len);
    if (splits > 1) prefill<COUNT, RANGE>(out, pos, lo, hi, rows, stream);
    const int64_t blocks = imin(v.n * tiles * splits, 4 * max_blocks);
    if (vec) {
      channels_kernel<D, COUNT, RANGE, kVec><<<blocks, kThreads, 0, stream>>>(x, v, tx_count, splits, split_len, out,
                                                                              pos, lo, hi);
    } else {
      channels_kernel<D, COUNT, RANGE, 1><<<blocks, kThreads, 0, stream>>>(x, v, tx_count, splits, split_len, out,
                                                                           pos, lo, hi);
    }
  }
  if (RANGE && splits > 1) {
    const int64_t blocks = imin(ceil_div(rows, kThreads), max_blocks);
    finish_range_kernel<D><<<blocks, kThreads, 0, stream>>>(out, lo, hi, rows);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class D>
const char* launch_flags(const void* x, const View4& v, float* out, int64_t* pos, float* lo, float* hi,
                         cudaStream_t stream, int sms) {
  if (lo) {
    return pos ? launch<D, true, true>(x, v, out, pos, lo, hi, stream, sms)
               : launch<D, false, true>(x, v, out, pos, lo, hi, stream, sms);
  }
  return pos ? launch<D, true, false>(x, v, out, pos, lo, hi, stream, sms)
             : launch<D, false, false>(x, v, out, pos, lo, hi, stream, sms);
}

}  // namespace

const char* channel_absmax_cuda(const void* x, DType dtype, const View4& v, float* out_max, int64_t* out_pos,
                                float* out_lo, float* out_hi, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t rows = v.n * v.c;
  if (rows == 0) return nullptr;
  if (v.r * v.l == 0) {  // max over no positions is 0, as in the reference
    cudaMemsetAsync(out_max, 0, rows * sizeof(float), stream);
    if (out_pos) cudaMemsetAsync(out_pos, 0, rows * sizeof(int64_t), stream);
    if (out_lo) {  // min / max over no positions: +inf / -inf
      const int64_t blocks = imin(ceil_div(rows, kThreads), 1024);
      fill_kernel<<<blocks, kThreads, 0, stream>>>(out_lo, __builtin_huge_valf(), rows);
      fill_kernel<<<blocks, kThreads, 0, stream>>>(out_hi, -__builtin_huge_valf(), rows);
    }
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
  // The current device is x's: the caller selects it (sparsekern/_backend.py, cuda_device).
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  switch (dtype) {
    case DType::kFloat32: return launch_flags<F32>(x, v, out_max, out_pos, out_lo, out_hi, stream, sms);
    case DType::kFloat16: return launch_flags<F16>(x, v, out_max, out_pos, out_lo, out_hi, stream, sms);
    case DType::kBFloat16: return launch_flags<BF16>(x, v, out_max, out_pos, out_lo, out_hi, stream, sms);
  }
  return "channel_absmax_cuda: unknown dtype";
}

namespace {

// Float order as unsigned order (-inf < ... < -0 < +0 < ... < +inf), so that comparisons are exact
// under --use_fast_math's ftz (a float compare there treats subnormals as zero).
__device__ inline uint32_t order_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// One thread per channel walks the N per-sample results (adjacent threads read adjacent channels:
// coalesced) and folds them into that channel's accumulators; no atomics, so the result is the
// CPU kernel's (channel_stats_cpu) bit for bit. The same rules as there: channel_absmax.h.
__global__ void stats_accumulate_kernel(const float* __restrict__ m, const int64_t* __restrict__ pos,
                                        const float* __restrict__ lo, const float* __restrict__ hi, int64_t n,
                                        int64_t c, float* mx, int64_t* nan_samples, int64_t* inf_samples,
                                        int64_t* positive, float* value_min, float* value_max, int64_t* histogram,
                                        int64_t buckets, int hist_bits, const float* reference,
                                        const double* thresholds, int64_t num_thresholds, int64_t* pass2_counts,
                                        float* pass2_max) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  float bmax = 0.0f, vmin = __builtin_huge_valf(), vmax = -__builtin_huge_valf();
  int64_t nan = 0, inf = 0, p = 0;
  const double ref = reference ? static_cast<double>(reference[ch]) : 0.0;
  const int shift = 23 - hist_bits;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = i * c + ch;
    const float mi = m[k];
    p += pos[k];
    int64_t bucket;
    if (isnan(mi)) {
      ++nan;
      bucket = buckets - 1;
    } else {
      if (isinf(mi)) {
        ++inf;
        bucket = buckets - 1;
      } else if (__float_as_int(mi) > 0) {  // m >= 0 here: positive bits, subnormals included
        bucket = static_cast<int64_t>(__float_as_int(mi) >> shift) + 1;
      } else {
        bucket = 0;
      }
      if (__float_as_int(mi) > __float_as_int(bmax)) bmax = mi;
    }
    if (!isnan(lo[k]) && !isnan(hi[k])) {
      if (order_key(lo[k]) < order_key(vmin)) vmin = lo[k];
      if (order_key(hi[k]) > order_key(vmax)) vmax = hi[k];
    }
    if (histogram) ++histogram[ch * buckets + bucket];
    if (reference) {
      const double ratio = static_cast<double>(mi) / ref;  // IEEE double division (not fast-math)
      for (int64_t t = 0; t < num_thresholds; ++t) pass2_counts[ch * num_thresholds + t] += ratio < thresholds[t];
    }
  }
  if (__float_as_int(bmax) > __float_as_int(mx[ch])) mx[ch] = bmax;
  nan_samples[ch] += nan;
  inf_samples[ch] += inf;
  positive[ch] += p;
  if (order_key(vmin) < order_key(value_min[ch])) value_min[ch] = vmin;
  if (order_key(vmax) > order_key(value_max[ch])) value_max[ch] = vmax;
  if (reference && __float_as_int(bmax) > __float_as_int(pass2_max[ch])) pass2_max[ch] = bmax;
}

}  // namespace

const char* channel_stats_cuda(const void* x, DType dtype, const View4& v, float* maxima, float* mx,
                               int64_t* nan_samples, int64_t* inf_samples, int64_t* positive, float* value_min,
                               float* value_max, int64_t* histogram, int64_t buckets, int hist_bits,
                               const float* reference, const double* thresholds, int64_t num_thresholds,
                               int64_t* pass2_counts, float* pass2_max, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t nc = v.n * v.c;
  if (nc == 0) return nullptr;
  // Scratch for the per-(n, c) results, stream-ordered (no device sync): m (unless the caller keeps
  // the maxima), positive counts, min and max.
  const size_t bytes = nc * ((maxima ? 0 : sizeof(float)) + sizeof(int64_t) + 2 * sizeof(float));
  char* scratch = nullptr;
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&scratch), bytes, stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  int64_t* pos = reinterpret_cast<int64_t*>(scratch);
  float* lo = reinterpret_cast<float*>(pos + nc);
  float* hi = lo + nc;
  float* m = maxima ? maxima : hi + nc;
  const char* msg = channel_absmax_cuda(x, dtype, v, m, pos, lo, hi, stream_ptr);
  if (!msg) {
    const int64_t blocks = ceil_div(v.c, int64_t(kThreads));
    stats_accumulate_kernel<<<blocks, kThreads, 0, stream>>>(
        m, pos, lo, hi, v.n, v.c, mx, nan_samples, inf_samples, positive, value_min, value_max, histogram, buckets,
        hist_bits, reference, thresholds, num_thresholds, pass2_counts, pass2_max);
    err = cudaGetLastError();
    if (err != cudaSuccess) msg = cudaGetErrorString(err);
  }
  err = cudaFreeAsync(scratch, stream);
  if (!msg && err != cudaSuccess) msg = cudaGetErrorString(err);
  return msg;
}

}  // namespace sparsekern
