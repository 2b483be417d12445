// Pieces shared by the persistent LSTM kernels (forward and backward): block shape, shared-memory
// rows, the block-wide matrix x vectors product, and the plan arithmetic the host also needs.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"
#include "common/launch.cuh"

namespace bigkern {
namespace lstm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRowsPerWarp = 8;  // a warp's accumulators: rows x batch fp32 registers

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements in one 16-byte chunk

__host__ __device__ inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Shared-memory rows hold whole 16-byte chunks; the padding is zero, so it adds nothing to a dot.
template <typename T>
__host__ __device__ inline int64_t pitch_of(int64_t k) {
  return round_up(k, kVec<T>);
}

// Shared memory of one block, in bytes (the host checks it against the device, the kernel carves it):
//   forward:  W_hh rows of its units  4*units x pitch(H)    + h_{t-1}  MAX_B x pitch(H)  + z 4*units x MAX_B fp32
//   backward: W_hh columns of its units  units x pitch(4H)  + dz_next  MAX_B x pitch(4H) + z   units x MAX_B fp32
template <typename T>
__host__ __device__ inline int64_t forward_shared_memory(int64_t units, int64_t hidden, int max_batch) {
  return (4 * units + max_batch) * pitch_of<T>(hidden) * int64_t(sizeof(T)) + 4 * units * max_batch * 4;
}

template <typename T>
__host__ __device__ inline int64_t backward_shared_memory(int64_t units, int64_t hidden, int max_batch) {
  return (units + max_batch) * pitch_of<T>(4 * hidden) * int64_t(sizeof(T)) + units * max_batch * 4;
}

__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ __half load_cg(const __half* p) { return __ldcg(p); }
__device__ __forceinline__ __nv_bfloat16 load_cg(const __nv_bfloat16* p) { return __ldcg(p); }

// Copy `rows` rows of k contiguous elements (global, written by other blocks since the launch, so
// read through L2, never a stale L1 line) into shared rows of `pitch`: 16 bytes at a time when the
// rows allow it (pitch is whole chunks, so shared rows always do).
template <typename T>
__device__ void load_rows(T* dst, int64_t pitch, const T* src, int rows, int64_t k) {
  constexpr int VEC = kVec<T>;
  if (k % VEC == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    const int64_t chunks = k / VEC;
    for (int r = 0; r < rows; ++r) {
      const uint4* from = reinterpret_cast<const uint4*>(src + r * k);
      uint4* to = reinterpret_cast<uint4*>(dst + r * pitch);
      for (int64_t c = threadIdx.x; c < chunks; c += kThreads) to[c] = __ldcg(from + c);
    }
    return;
  }
  for (int r = 0; r < rows; ++r)
    for (int64_t c = threadIdx.x; c < k; c += kThreads) dst[r * pitch + c] = load_cg(src + r * k + c);
}

// z[row * MAX_B + b] = sum_k W[row][k] * V[b][k] (fp32), rows < rows, b < batch; W and V are
// shared-memory rows of `pitch` elements. Warp w takes rows w, w + kWarps, ... (at most
// kMaxRowsPerWarp); lane l takes 16-byte chunks l, l + 32, ... of every row, so each chunk of V is
// read once per warp and reused for all of the warp's rows, and a warp's reads are contiguous.
template <typename T, int MAX_B>
__device__ void block_matvec(const T* W, const T* V, int64_t pitch, int rows, int batch, float* z) {
  constexpr int VEC = kVec<T>;
  using Chunk = Pack<T, VEC>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[kMaxRowsPerWarp][MAX_B];
#pragma unroll
  for (int r = 0; r < kMaxRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) acc[r][b] = 0.f;

  const int64_t chunks = pitch / VEC;
  for (int64_t c = lane; c < chunks; c += 32) {
    float v[MAX_B][VEC];
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) {
      Chunk chunk{};
      if (b < batch) chunk = reinterpret_cast<const Chunk*>(V + b * pitch)[c];
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[b][e] = to_float(chunk.v[e]);
    }
#pragma unroll
    for (int r = 0; r < kMaxRowsPerWarp; ++r) {
      const int row = warp + r * kWarps;
      if (row < rows) {  // uniform across the warp
        const Chunk w = reinterpret_cast<const Chunk*>(W + row * pitch)[c];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float we = to_float(w.v[e]);
#pragma unroll
          for (int b = 0; b < MAX_B; ++b) acc[r][b] = fmaf(we, v[b][e], acc[r][b]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRowsPerWarp; ++r) {
    const int row = warp + r * kWarps;
    if (row >= rows) break;  // uniform across the warp: every lane takes part in the shuffles below
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) {
      float sum = acc[r][b];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      if (lane == 0 && b < batch) z[row * MAX_B + b] = sum;
    }
  }
}

// Calls fn(std::integral_constant<int, MAX_B>{}) for the smallest compiled MAX_B >= batch.
constexpr int kMaxBatch = 8;

template <typename Fn>
inline bool dispatch_max_batch(int64_t batch, Fn&& fn) {
  if (batch <= 4) {
    fn(std::integral_constant<int, 4>{});
    return true;
  }
  if (batch <= 8) {
    fn(std::integral_constant<int, 8>{});
    return true;
  }
  return false;
}

// Calls fn(T{}, std::integral_constant<int, MAX_B>{}) for the kernel instance that serves this dtype
// and batch: the persistent kernels' one switch over their template arguments.
template <typename Fn>
inline void dispatch_instance(DType dtype, int64_t batch, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto zero) { dispatch_max_batch(batch, [&](auto max_batch) { fn(zero, max_batch); }); });
}

}  // namespace lstm

// Blocks of the kernel one SM keeps resident with this much dynamic shared memory (0: none), after
// raising the kernel's shared-memory limit to it. Each kernel's file defines its own.
int lstm_persistent_forward_blocks_per_sm(DType dtype, int max_batch, int64_t shared_memory);
int lstm_persistent_backward_blocks_per_sm(DType dtype, int max_batch, int64_t shared_memory);

}  // namespace bigkern
