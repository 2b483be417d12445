// Building blocks of the sm_80+ flash-attention kernels (flash_forward.cuh, flash_backward.cuh):
// shared-memory tiles, the two warp-level matrix products every step of attention is made of, and
// the coordinates of an accumulator element.
//
// Each warp owns 16 rows of its product; an accumulator `float acc[N / 8][4]` holds a 16 x N fp32
// tile: element acc[j][e] sits at row g + 8 (e / 2) and column 8 j + 2 (lane % 4) + e % 2 of it
// (g = lane / 4). Softmax, masking and scaling all work on that layout, and the register-A product
// consumes it directly (FlashAttention-2's trick: P and dS never touch shared memory).
//
// Tiles are row-major in shared memory with each row padded by 8 elements (16 bytes): ldmatrix reads
// 8 rows at one column, and the padding puts those rows in 8 different 16-byte bank groups (a row is
// a multiple of 16 bytes plus 16, so row r starts 4r banks further on), for every head dim.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention.h"
#include "common/launch.cuh"
#include "attention/tensor_core.cuh"

namespace bigkern {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// Two fp32 values rounded to T and packed into one register, `lo` in the lower 16 bits.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Reductions over the four lanes of a quad (lanes 4g..4g+3 hold the same accumulator rows).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Padded row length, in elements, of a shared-memory tile with `cols` columns.
template <int COLS>
constexpr int kTileStride = COLS + 8;

template <typename T>
__device__ __forceinline__ const T* head_pointer(const AttentionTensor& t, int batch, int head) {
  return static_cast<const T*>(t.data) + batch * t.batch_stride + head * t.head_stride;
}

template <typename T>
__device__ __forceinline__ T* head_pointer_mut(const AttentionTensor& t, int batch, int head) {
  return static_cast<T*>(t.data) + batch * t.batch_stride + head * t.head_stride;
}

// Start copying a ROWS x COLS tile (rows row_stride apart in global memory) into shared memory;
// rows at or past `valid_rows` are filled with zeros. The caller commits and waits.
template <int ROWS, int COLS, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
  constexpr int kChunksPerRow = COLS / 8;  // 16-byte chunks
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(COLS % 8 == 0, "tile rows are copied 16 bytes at a time");
#pragma unroll
  for (int first = 0; first < kChunks; first += THREADS) {
    const int chunk = first + threadIdx.x;
    if (kChunks % THREADS != 0 && chunk >= kChunks) break;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    const bool valid = row < valid_rows;
    // an invalid row reads nothing; its address is only kept inside the tensor
    const T* src = gmem + (valid ? row * row_stride : 0) + col;
    cp_async_16(smem + row * kTileStride<COLS> + col, src, valid);
  }
}

// The key side of a query block's pass (the forward, and dQ of the backward): K and V tiles of
// BLOCK_N rows through two shared-memory stages (`k_tiles` and `v_tiles`, 2 x BLOCK_N padded rows
// each), from the last key block the block's rows can see down to the first, so that the causal
// diagonal block, the only one with masked keys, comes first. start() issues the first block's
// copies (with any the caller issued before it); walk(step) calls step(n_block, k_tile, v_tile)
// once per block, with that block's tiles landed and the next block's copies in flight.
template <typename T, int D, int BLOCK_N, int THREADS>
struct KeyBlockWalk {
  static constexpr int kStride = kTileStride<D>;
  T* k_tiles;
  T* v_tiles;
  const AttentionProblem& problem;
  const AttentionTensor& key;
  const AttentionTensor& value;
  const T* k;
  const T* v;
  int n_blocks;

  __device__ __forceinline__ KeyBlockWalk(T* k_tiles, T* v_tiles, const AttentionProblem& problem,
                                          const AttentionTensor& key, const AttentionTensor& value, int batch,
                                          int kv_head, int query_end)
      : k_tiles(k_tiles), v_tiles(v_tiles), problem(problem), key(key), value(value),
        k(head_pointer<T>(key, batch, kv_head)), v(head_pointer<T>(value, batch, kv_head)) {
    // keys the block can see: all, or under the causal mask those j < query_end (j <= its last row)
    const int n_end = problem.causal ? min(problem.len_kv, query_end) : problem.len_kv;
    n_blocks = (n_end + BLOCK_N - 1) / BLOCK_N;
  }

  __device__ __forceinline__ void load(int n_block, int stage) const {
    const int n0 = n_block * BLOCK_N;
    load_tile_async<BLOCK_N, D, THREADS>(k_tiles + stage * BLOCK_N * kStride, k + n0 * key.row_stride,
                                         key.row_stride, problem.len_kv - n0);
    load_tile_async<BLOCK_N, D, THREADS>(v_tiles + stage * BLOCK_N * kStride, v + n0 * value.row_stride,
                                         value.row_stride, problem.len_kv - n0);
  }

  __device__ __forceinline__ void start() const {
    if (n_blocks > 0) load(n_blocks - 1, 0);
    cp_async_commit();
  }

  template <typename Step>
  __device__ __forceinline__ void walk(Step&& step) const {
    for (int it = 0; it < n_blocks; ++it) {
      const int n_block = n_blocks - 1 - it;
      const int stage = it % 2;
      if (it + 1 < n_blocks) load(n_block - 1, stage ^ 1);
      cp_async_commit();  // possibly empty: the wait below always leaves exactly the newest group
      cp_async_wait<1>();
      __syncthreads();
      step(n_block, k_tiles + stage * BLOCK_N * kStride, v_tiles + stage * BLOCK_N * kStride);
      __syncthreads();  // every warp is done with this stage before it is refilled
    }
    cp_async_wait<0>();  // nothing left in flight at exit (the last group is empty, or the only one unused)
  }
};

// acc (16 x N) += A (16 x K) B^T, with this warp's 16 rows of A row-major at `a` and all N rows of
// B row-major (N x K) at `b`, both padded tiles. Used for every "rows times rows" product:
// Q K^T, dO V^T, K Q^T, V dO^T.
template <typename T, int N, int K, int A_STRIDE, int B_STRIDE>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[N / 8][4], const T* a, const T* b, int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "warp products work on 16 x 16 steps");
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    // matrices: rows 0-7 | rows 8-15 at columns k..k+7, then the same at k+8..k+15 = a[0..3]
    uint32_t a_frag[4];
    ldmatrix_x4(a_frag, a + (lane % 16) * A_STRIDE + k + (lane / 16) * 8);
#pragma unroll
    for (int n = 0; n < N; n += 16) {
      // matrices: B rows n..n+7 at k, at k+8 (b0, b1 of column tile n / 8), then rows n+8..n+15
      uint32_t b_frag[4];
      ldmatrix_x4(b_frag, b + (n + (lane / 16) * 8 + lane % 8) * B_STRIDE + k + ((lane / 8) % 2) * 8);
      mma_16816<T>(acc[n / 8], a_frag, b_frag[0], b_frag[1]);
      mma_16816<T>(acc[n / 8 + 1], a_frag, b_frag[2], b_frag[3]);
    }
  }
}

// The mma A fragment (16 rows x columns k..k+15, rounded to T) of a fp32 accumulator tile: tiles
// k/8 and k/8 + 1, element for element (the accumulator and A layouts agree).
template <typename T, int K>
__device__ __forceinline__ void a_fragment(uint32_t (&frag)[4], const float (&acc)[K / 8][4], int k) {
  frag[0] = pack2<T>(acc[k / 8][0], acc[k / 8][1]);
  frag[1] = pack2<T>(acc[k / 8][2], acc[k / 8][3]);
  frag[2] = pack2<T>(acc[k / 8 + 1][0], acc[k / 8 + 1][1]);
  frag[3] = pack2<T>(acc[k / 8 + 1][2], acc[k / 8 + 1][3]);
}

// acc (16 x N) += A (16 x K) B, with A this warp's fp32 accumulator tile (rounded to T here) and B
// row-major (K x N) at `b`, a padded tile. Used for every "probabilities times rows" product:
// P V, dS K, P^T dO, dS^T Q.
template <typename T, int N, int K, int B_STRIDE>
__device__ __forceinline__ void warp_gemm_rb(float (&acc)[N / 8][4], const float (&a)[K / 8][4], const T* b,
                                             int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "warp products work on 16 x 16 steps");
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    uint32_t a_frag[4];
    a_fragment<T, K>(a_frag, a, k);
#pragma unroll
    for (int n = 0; n < N; n += 16) {
      // transposed matrices: B rows k..k+7 | k+8..k+15 at columns n..n+7 (b0, b1 of tile n / 8),
      // then the same at columns n+8..n+15
      uint32_t b_frag[4];
      ldmatrix_x4_trans(b_frag, b + (k + ((lane / 8) % 2) * 8 + lane % 8) * B_STRIDE + n + (lane / 16) * 8);
      mma_16816<T>(acc[n / 8], a_frag, b_frag[0], b_frag[1]);
      mma_16816<T>(acc[n / 8 + 1], a_frag, b_frag[2], b_frag[3]);
    }
  }
}

// Row (within the warp's 16) and column (within the tile) of accumulator element acc[j][e].
__device__ __forceinline__ int acc_row(int lane, int e) { return lane / 4 + (e / 2) * 8; }
__device__ __forceinline__ int acc_col(int lane, int j, int e) { return j * 8 + (lane % 4) * 2 + e % 2; }

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
}

// Write this warp's 16 x COLS accumulator tile, times `scale`, to rows row0.. of `out` (rows
// row_stride apart), skipping rows at or past `valid_rows`. Each lane stores pairs of elements.
template <typename T, int COLS>
__device__ __forceinline__ void store_rows(T* out, int64_t row_stride, const float (&acc)[COLS / 8][4],
                                           float scale_row0, float scale_row8, int valid_rows, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = acc_row(lane, 2 * half);
    if (row >= valid_rows) continue;
    const float s = half == 0 ? scale_row0 : scale_row8;
    T* dst = out + row * row_stride;
#pragma unroll
    for (int j = 0; j < COLS / 8; ++j) {
      *reinterpret_cast<uint32_t*>(dst + acc_col(lane, j, 0)) =
          pack2<T>(acc[j][2 * half] * s, acc[j][2 * half + 1] * s);
    }
  }
}

// Calls fn(T{}) for fp16 and bf16; false for any other dtype.
template <typename Fn>
inline bool dispatch_half_types(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: fn(__half{}); return true;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return true;
    default: return false;
  }
}

}  // namespace attention
}  // namespace bigkern
