// bn_relu on CUDA: y = max(0, x * scale[c] + shift[c]) in x's dtype (math in float32), with an
// optional per-(n, c) max of y from the same pass; launched on the current device, which the caller
// has made x's, and on the caller's stream.
//
// Two kernels:
//  * rows     (stride_l == 1 in x and y, e.g. NCHW): a warp owns a chunk of one contiguous run
//             of a single (n, c), so scale/shift are scalars. 16-byte vector loads and stores
//             over the aligned body of every run, scalar accesses for its unaligned head and
//             its tail only, so runs whose length is not a multiple of the vector width (7x7,
//             and 14x14 in half precision: ResNet's late stages) stay vectorised.
//  * channels (everything else; coalesced when stride_c == 1, e.g. channels_last or (N, C)):
//             threadIdx.x walks VEC consecutive channels, threadIdx.y positions, so a warp
//             reads a contiguous run of channels at one position. The per-channel maxima are
//             reduced over threadIdx.y in shared memory first: one atomicMax per channel per
//             block and job, not one per thread.
// A dead channel's x is never read (an all-dead vector of channels skips its load; in a mixed
// one the dead lanes are zeroed before use) and its y is written as 0, unless write_dead is
// false (the caller says y holds 0 there already): then whole dead runs / vectors are not
// written either. x and y may be the same buffer (in place): no __restrict__ on them.
//
// Arithmetic is IEEE float32 without flush-to-zero (CMakeLists.txt compiles without
// --use_fast_math; __fmaf_rn is the one rounding torch's CPU / Triton FMA does), so subnormal
// inputs and outputs behave as in torch.
//
// The max: y is +0, a positive number or NaN (relu_keep_nan), and for such values the int bit
// patterns order like the floats, so partial maxima merge with atomicMax on int bits into an
// out_max zeroed first. A NaN is entered as 0x7fffffff (a NaN above every other pattern), so a
// (n, c) that saw a NaN reports NaN. The max is taken over the rounded y values, so it equals
// the max of what was stored.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sparsekern/bn_relu.h"

namespace sparsekern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kMaxBlocks = 65535;  // grid-stride loops cover the rest
constexpr int kUnroll = 8;         // vector steps per warp per work item in the rows kernel

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// relu(NaN) = NaN as in torch; everything <= 0 (including -0) becomes +0.
__device__ __forceinline__ float relu_keep_nan(float v) { return (v > 0.0f || isnan(v)) ? v : 0.0f; }

// The ordering key of a stored y value (see the header comment).
__device__ __forceinline__ int max_key(float y) { return isnan(y) ? 0x7fffffff : __float_as_int(y); }

__device__ __forceinline__ int warp_max(int v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// VEC elements moved as one aligned load / store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// y = relu(x * s + b) for one pack, stored; returns the largest key among the stored values.
template <typename T, int VEC>
__device__ __forceinline__ int affine_relu_pack(const T* x, T* y, float s, float b) {
  const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x);
  Pack<T, VEC> out;
  int key = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    out.v[j] = from_f32<T>(relu_keep_nan(__fmaf_rn(to_f32(in.v[j]), s, b)));
    key = max(key, max_key(to_f32(out.v[j])));
  }
  *reinterpret_cast<Pack<T, VEC>*>(y) = out;
  return key;
}

template <typename T, int VEC>
__device__ __forceinline__ void zero_pack(T* y) {
  Pack<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = from_f32<T>(0.0f);
  *reinterpret_cast<Pack<T, VEC>*>(y) = out;
}

struct RowsArgs {
  int64_t c;            // channels
  int64_t runs_per_nc;  // contiguous runs per (n, c): 1 when the R rows are back to back, else R
  int64_t run_len;      // elements per run
  int64_t chunks_per_run, chunk;  // a warp's work item is `chunk` elements of one run's body
  int64_t x_sn, x_sc, x_sr, y_sn, y_sc, y_sr;
  bool write_dead;
};

// One element: y = relu(x * s + b); returns its max key.
template <typename T>
__device__ __forceinline__ int affine_relu_one(const T* x, T* y, float s, float b) {
  const T out = from_f32<T>(relu_keep_nan(__fmaf_rn(to_f32(*x), s, b)));
  *y = out;
  return max_key(to_f32(out));
}

// VEC > 1: x and y runs share their misalignment (checked on the host), so each run is an
// unaligned head of < VEC elements, a body of whole aligned packs and a tail of < VEC elements.
// Work item k of a run covers body elements [k * chunk, (k + 1) * chunk); item 0 also does the
// head and the last item the tail, with scalar accesses.
template <typename T, int VEC>
__global__ void rows_kernel(const T* x, T* y, const float* __restrict__ scale, const float* __restrict__ shift,
                            const uint8_t* __restrict__ dead, int* __restrict__ max_bits, RowsArgs a, int64_t items) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; item < items;
       item += warps) {
    const int64_t run = item / a.chunks_per_run, k = item % a.chunks_per_run;
    const int64_t nc = run / a.runs_per_nc, r = run % a.runs_per_nc;
    const int64_t n = nc / a.c, c = nc % a.c;
    const T* xr = x + n * a.x_sn + c * a.x_sc + r * a.x_sr;
    T* yr = y + n * a.y_sn + c * a.y_sc + r * a.y_sr;
    int64_t head = 0;
    if (VEC > 1) {
      const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(xr) % 16) / sizeof(T));
      head = min(a.run_len, mis == 0 ? int64_t(0) : VEC - mis);
    }
    const int64_t body_len = (a.run_len - head) / VEC * VEC;
    const int64_t body_end = head + body_len;
    const int64_t begin = head + k * a.chunk;
    const int64_t end = min(begin + a.chunk, body_end);
    const bool first = k == 0, last = k == a.chunks_per_run - 1;
    if (dead && dead[c]) {
      if (!a.write_dead) continue;  // neither read nor written; its max stays the 0 written before the launch
      for (int64_t i = begin + lane * VEC; i < end; i += 32 * VEC) zero_pack<T, VEC>(yr + i);
      if (first && lane < head) yr[lane] = from_f32<T>(0.0f);
      if (last && body_end + lane < a.run_len) yr[body_end + lane] = from_f32<T>(0.0f);
      continue;
    }
    const float s = scale[c], b = shift[c];
    int key = 0;
    for (int64_t i = begin + lane * VEC; i < end; i += 32 * VEC) {
      key = max(key, affine_relu_pack<T, VEC>(xr + i, yr + i, s, b));
    }
    if (VEC > 1) {
      if (first && lane < head) key = max(key, affine_relu_one<T>(xr + lane, yr + lane, s, b));
      if (last && body_end + lane < a.run_len) key = max(key, affine_relu_one<T>(xr + body_end + lane, yr + body_end + lane, s, b));
    }
    if (max_bits) {
      key = warp_max(key);
      if (lane == 0 && key != 0) atomicMax(max_bits + nc, key);
    }
  }
}

struct ChannelsArgs {
  int64_t n, c, positions, l;
  bool flat;  // position p sits at p * stride_l (the R rows are back to back)
  bool write_dead;
  int64_t chunk;  // positions per block
  int64_t chunks;
  int64_t x_sn, x_sc, x_sr, x_sl, y_sn, y_sc, y_sr, y_sl;
};

template <typename T, int VEC>
__global__ void channels_kernel(const T* x, T* y, const float* __restrict__ scale, const float* __restrict__ shift,
                                const uint8_t* __restrict__ dead, int* __restrict__ max_bits, ChannelsArgs a) {
  // Per-block partial maxima, reduced over threadIdx.y before one atomicMax per channel.
  __shared__ int red[kThreads * 8];  // blockDim.x * blockDim.y == kThreads, VEC <= 8
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < a.c;  // no early return: every thread reaches the __syncthreads below
  // VEC > 1 only when C is a multiple of VEC and channels are contiguous (checked on the host).
  float s[VEC], b[VEC];
  bool live[VEC];
  bool any_live = false;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    live[j] = active && !(dead && dead[c0 + j]);
    any_live = any_live || live[j];
    s[j] = active ? scale[c0 + j] : 0.0f;
    b[j] = active ? shift[c0 + j] : 0.0f;
  }
  const bool touch = active && (any_live || a.write_dead);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t job = blockIdx.y; job < a.n * a.chunks; job += gridDim.y) {
    const int64_t n = job / a.chunks, p_begin = (job % a.chunks) * a.chunk;
    const int64_t p_end = min(p_begin + a.chunk, a.positions);
    int key[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) key[j] = 0;
    for (int64_t p = p_begin + threadIdx.y; touch && p < p_end; p += blockDim.y) {
      const int64_t r = a.flat ? 0 : p / a.l, l = a.flat ? p : p % a.l;
      const T* xp = x + n * a.x_sn + c0 * a.x_sc + r * a.x_sr + l * a.x_sl;
      T* yp = y + n * a.y_sn + c0 * a.y_sc + r * a.y_sr + l * a.y_sl;
      if (!any_live) {
        if (VEC > 1) {
          zero_pack<T, VEC>(yp);
        } else {
          *yp = from_f32<T>(0.0f);
        }
        continue;
      }
      Pack<T, VEC> in, out;
      if (VEC > 1) {
        in = *reinterpret_cast<const Pack<T, VEC>*>(xp);
      } else {
        in.v[0] = *xp;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float v = live[j] ? relu_keep_nan(__fmaf_rn(to_f32(in.v[j]), s[j], b[j])) : 0.0f;
        out.v[j] = from_f32<T>(v);
        key[j] = max(key[j], max_key(to_f32(out.v[j])));
      }
      if (VEC > 1) {
        *reinterpret_cast<Pack<T, VEC>*>(yp) = out;
      } else {
        *yp = out.v[0];
      }
    }
    if (max_bits) {  // uniform over the block (a kernel argument)
#pragma unroll
      for (int j = 0; j < VEC; ++j) red[tid * VEC + j] = key[j];
      __syncthreads();
      for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
        if (threadIdx.y < stride) {
          const int other = (tid + stride * blockDim.x) * VEC;
#pragma unroll
          for (int j = 0; j < VEC; ++j) red[tid * VEC + j] = max(red[tid * VEC + j], red[other + j]);
        }
        __syncthreads();
      }
      if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (red[tid * VEC + j] != 0) atomicMax(max_bits + n * a.c + c0 + j, red[tid * VEC + j]);
      }
      __syncthreads();  // red is reused by the next job
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch_rows(const T* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead, bool write_dead,
                 T* y, const View4& vy, int* max_bits, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  RowsArgs a;
  a.c = vx.c;
  a.write_dead = write_dead;
  const bool flat = vx.r == 1 || (vx.sr == vx.l && vy.sr == vy.l);
  a.runs_per_nc = flat ? 1 : vx.r;
  a.run_len = flat ? vx.r * vx.l : vx.l;
  a.x_sn = vx.sn; a.x_sc = vx.sc; a.x_sr = vx.sr;
  a.y_sn = vy.sn; a.y_sc = vy.sc; a.y_sr = vy.sr;
  // The vector path needs every run of x and of y at the same offset modulo 16 bytes (then the
  // head / body / tail split of a run is the same on both sides): equal strides and bases that
  // differ by a multiple of 16 bytes. Run lengths and alignment of the runs themselves are free.
  const int64_t base_diff = reinterpret_cast<intptr_t>(x) - reinterpret_cast<intptr_t>(y);
  bool vec = base_diff % 16 == 0 && a.x_sn == a.y_sn && a.x_sc == a.y_sc && (flat || a.x_sr == a.y_sr);
  vec = vec && a.run_len >= kVec;
  const int step = vec ? kVec : 1;
  a.chunk = static_cast<int64_t>(32) * step * kUnroll;
  a.chunks_per_run = std::max<int64_t>(1, (a.run_len + a.chunk - 1) / a.chunk);
  const int64_t items = vx.n * vx.c * a.runs_per_nc * a.chunks_per_run;
  const int64_t blocks = std::min<int64_t>((items + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
  if (vec) {
    rows_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, scale, shift, dead, max_bits, a,
                                                                                items);
  } else {
    rows_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, scale, shift, dead, max_bits, a,
                                                                             items);
  }
}

template <typename T>
void launch_channels(const T* x, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                     bool write_dead, T* y, const View4& vy, int* max_bits, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  ChannelsArgs a;
  a.n = vx.n; a.c = vx.c; a.positions = vx.r * vx.l; a.l = vx.l;
  a.write_dead = write_dead;
  a.flat = vx.r == 1 || (vx.sr == vx.l * vx.sl && vy.sr == vy.l * vy.sl);
  a.x_sn = vx.sn; a.x_sc = vx.sc; a.x_sr = vx.sr; a.x_sl = vx.sl;
  a.y_sn = vy.sn; a.y_sc = vy.sc; a.y_sr = vy.sr; a.y_sl = vy.sl;
  bool vec = vx.sc == 1 && vy.sc == 1 && vx.c % kVec == 0 && aligned16(x) && aligned16(y);
  for (int64_t stride : {vx.sn, vx.sr, vx.sl, vy.sn, vy.sr, vy.sl}) vec = vec && stride % kVec == 0;
  const int64_t lanes_c = vec ? vx.c / kVec : vx.c;  // threads needed along channels
  int bx = 32;
  while (bx > 1 && bx / 2 >= lanes_c) bx /= 2;  // narrow blocks for few channels
  const int by = kThreads / bx;  // a power of two: the shared-memory reduction halves it
  a.chunk = static_cast<int64_t>(by) * 8;
  a.chunks = (a.positions + a.chunk - 1) / a.chunk;
  const dim3 block(bx, by);
  const dim3 grid(static_cast<unsigned>((lanes_c + bx - 1) / bx),
                  static_cast<unsigned>(std::min<int64_t>(a.n * a.chunks, kMaxBlocks)));
  if (vec) {
    channels_kernel<T, kVec><<<grid, block, 0, stream>>>(x, y, scale, shift, dead, max_bits, a);
  } else {
    channels_kernel<T, 1><<<grid, block, 0, stream>>>(x, y, scale, shift, dead, max_bits, a);
  }
}

template <typename T>
const char* run(const void* xv, const View4& vx, const float* scale, const float* shift, const uint8_t* dead,
                bool write_dead, void* yv, const View4& vy, float* out_max, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  int* max_bits = reinterpret_cast<int*>(out_max);
  if (max_bits) {
    const cudaError_t err = cudaMemsetAsync(max_bits, 0, static_cast<size_t>(vx.n * vx.c) * sizeof(int), stream);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  const bool rows = vx.sl == 1 && vy.sl == 1;
  const bool inner_channel = vx.sc == 1 && vy.sc == 1;
  if (rows && (vx.l >= 16 || !inner_channel)) {
    launch_rows<T>(x, vx, scale, shift, dead, write_dead, y, vy, max_bits, stream);
  } else {
    launch_channels<T>(x, vx, scale, shift, dead, write_dead, y, vy, max_bits, stream);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* bn_relu_cuda(const void* x, DType dtype, const View4& vx, const float* scale, const float* shift,
                         const uint8_t* dead, bool write_dead, void* y, const View4& vy, float* out_max,
                         void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return run<float>(x, vx, scale, shift, dead, write_dead, y, vy, out_max, s);
    case DType::kFloat16: return run<__half>(x, vx, scale, shift, dead, write_dead, y, vy, out_max, s);
    case DType::kBFloat16: return run<__nv_bfloat16>(x, vx, scale, shift, dead, write_dead, y, vy, out_max, s);
  }
  return "unknown dtype";
}

}  // namespace sparsekern
