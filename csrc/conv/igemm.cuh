// The implicit-GEMM main loop shared by the convolution kernels: C[m, n] = sum_k A[m, k] * B[k, n]
// where A and B are never materialised. A "problem" (forward, input gradient, weight gradient)
// says where each element of A and B lives, through a Gather record per tile row and per tile
// column, and what to do with each finished C element (its epilogue).
//
// One block computes a kBM x kBN tile of C with kThreads threads: per kBK-wide step of the
// reduction it gathers the A and B tiles into shared memory (zeros where the gather is out of
// bounds: the padding), then multiplies them on tensor cores through WMMA (fp16, bf16, TF32) or
// with fp32 FMAs. The finished tile goes through shared memory to the problem's epilogue, one
// element per thread in turn, so neighbouring threads write neighbouring output channels.
//
// Written for correctness first: a single-stage pipeline (gather, sync, multiply, sync).
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common/activation.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "conv/conv.h"

namespace bigkern {
namespace conv {

constexpr int kBM = 128;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kThreads = 256;
constexpr int kLdc = kBN + 4;  // fp32 epilogue tile row pitch

// One row or one column of an operand tile. Element (row, col) of the operand lives at
//   base_row + base_col + (top_row + top_col) * window.stride_h + (left_row + left_col) * window.stride_w
// and is zero unless both are ok and the (top, left) sum lies inside the window: that is how the
// zero padding of a convolution costs nothing. Operands without a window use a 1 x 1 one.
struct Gather {
  int64_t base;
  int top;
  int left;
  int ok;
};

struct Window {
  int height, width;
  int64_t stride_h, stride_w;
};

__device__ __forceinline__ Gather plain(int64_t base, bool ok) { return Gather{base, 0, 0, ok ? 1 : 0}; }

__host__ __device__ constexpr Window no_window() { return Window{1, 1, 0, 0}; }

template <typename T>
__device__ __forceinline__ T gather(const T* __restrict__ ptr, const Gather& row, const Gather& col,
                                    const Window& window) {
  const int h = row.top + col.top;
  const int w = row.left + col.left;
  if (row.ok && col.ok && unsigned(h) < unsigned(window.height) && unsigned(w) < unsigned(window.width))
    return ptr[row.base + col.base + h * window.stride_h + w * window.stride_w];
  return from_float<T>(0.f);
}

// act(z) for a run-time activation code: the shared activate<ACT> behind one uniform branch.
__device__ __forceinline__ float activate_code(int code, float z, float negative_slope) {
  switch (code) {
    case kRelu: return activate<kRelu>(z, negative_slope);
    case kGelu: return activate<kGelu>(z, negative_slope);
    case kGeluTanh: return activate<kGeluTanh>(z, negative_slope);
    case kSilu: return activate<kSilu>(z, negative_slope);
    case kSigmoid: return activate<kSigmoid>(z, negative_slope);
    case kTanh: return activate<kTanh>(z, negative_slope);
    case kLeakyRelu: return activate<kLeakyRelu>(z, negative_slope);
    default: return z;
  }
}

// Shared-memory row pitches, padded against bank conflicts and kept multiples of 16 bytes (WMMA).
template <typename T>
struct Pitch {
  static constexpr int kPad = sizeof(T) == 2 ? 8 : 4;
  static constexpr int kA = kBK + kPad;
  static constexpr int kB = kBN + kPad;
};

// Tensor cores through WMMA: 8 warps as 4 (rows) x 2 (columns), each a 32 x 32 tile of 2 x 2
// 16 x 16 fragments. fp16/bf16 fragments are k = 16; fp32 data runs as TF32 with k = 8.
template <typename T>
struct WmmaMath {
  static constexpr bool kTf32 = std::is_same<T, float>::value;
  static constexpr int kK = kTf32 ? 8 : 16;
  using In = typename std::conditional<kTf32, nvcuda::wmma::precision::tf32, T>::type;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kK, In, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kK, In, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float>;
  struct Acc {
    FragC f[2][2];
  };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.f);
  }

  template <typename Frag>
  __device__ static void to_tf32(Frag& frag) {
    if constexpr (kTf32) {
#pragma unroll
      for (int t = 0; t < frag.num_elements; ++t) frag.x[t] = nvcuda::wmma::__float_to_tf32(frag.x[t]);
    }
  }

  __device__ static void mma(const T* As, const T* Bs, Acc& acc) {
    const int warp = threadIdx.x / 32;
    const int row = (warp / 2) * 32;
    const int col = (warp % 2) * 32;
#pragma unroll
    for (int k = 0; k < kBK; k += kK) {
      FragA a[2];
      FragB b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        nvcuda::wmma::load_matrix_sync(a[i], As + (row + 16 * i) * Pitch<T>::kA + k, Pitch<T>::kA);
        to_tf32(a[i]);
        nvcuda::wmma::load_matrix_sync(b[i], Bs + k * Pitch<T>::kB + col + 16 * i, Pitch<T>::kB);
        to_tf32(b[i]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
    }
  }

  __device__ static void store(const Acc& acc, float* Cs) {
    const int warp = threadIdx.x / 32;
    const int row = (warp / 2) * 32;
    const int col = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (row + 16 * i) * kLdc + col + 16 * j, acc.f[i][j], kLdc,
                                        nvcuda::wmma::mem_row_major);
  }
};

// fp32 FMA, for fp32 when TF32 is not allowed: 16 x 16 threads, each 8 rows x 4 columns strided
// by 16 (so a warp reads shared memory without conflicts).
struct SimtMath {
  struct Acc {
    float v[8][4];
  };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc.v[i][j] = 0.f;
  }

  __device__ static void mma(const float* As, const float* Bs, Acc& acc) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = As[(ty + 16 * i) * Pitch<float>::kA + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[k * Pitch<float>::kB + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }

  __device__ static void store(const Acc& acc, float* Cs) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * kLdc + tx + 16 * j] = acc.v[i][j];
  }
};

// The kernel. Grid: x = (row tiles) x (column tiles), y and z as the problem binds them (split,
// group, residue class). Problem interface:
//   bind(y, z)                sets m_rows, n_cols, k_begin, k_end, a_ptr, b_ptr for this block
//   a_row(m), a_col(k), b_row(k), b_col(n) -> Gather;  a_window(), b_window() -> Window
//   kAColsContiguous, kBColsContiguous: which way consecutive threads walk each tile when loading
//   store(m, n, value)        the epilogue of one C element
//   row_sums(), store_row_sum(m, sum): sums of A's rows over the reduction (grad_bias), if wanted
template <typename T, class Math, class Problem>
__global__ void __launch_bounds__(kThreads) igemm_kernel(Problem problem_arg) {
  constexpr int kOperandBytes = (kBM * Pitch<T>::kA + kBK * Pitch<T>::kB) * int(sizeof(T));
  constexpr int kEpilogueBytes = kBM * kLdc * int(sizeof(float));
  __shared__ __align__(128) unsigned char smem[kOperandBytes > kEpilogueBytes ? kOperandBytes : kEpilogueBytes];
  __shared__ Gather a_rows[kBM], a_cols[kBK], b_rows[kBK], b_cols[kBN];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + kBM * Pitch<T>::kA;
  float* Cs = reinterpret_cast<float*>(smem);

  Problem problem = problem_arg;
  problem.bind(blockIdx.y, blockIdx.z);
  const int column_tiles = (problem.n_cols + kBN - 1) / kBN;
  const int row0 = (blockIdx.x / column_tiles) * kBM;
  const int col0 = (blockIdx.x % column_tiles) * kBN;
  if (row0 >= problem.m_rows) return;  // the grid is sized for the largest z slice

  const int tid = threadIdx.x;
  for (int i = tid; i < kBM; i += kThreads) a_rows[i] = problem.a_row(row0 + i);
  for (int i = tid; i < kBN; i += kThreads) b_cols[i] = problem.b_col(col0 + i);
  const Window a_window = problem.a_window();
  const Window b_window = problem.b_window();
  const bool sums = problem.row_sums() && col0 == 0;
  float row_sum = 0.f;

  typename Math::Acc acc;
  Math::zero(acc);
  for (int64_t k0 = problem.k_begin; k0 < problem.k_end; k0 += kBK) {
    if (tid < kBK) a_cols[tid] = problem.a_col(k0 + tid);
    else if (tid < 2 * kBK) b_rows[tid - kBK] = problem.b_row(k0 + tid - kBK);
    __syncthreads();
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int r = Problem::kAColsContiguous ? e / kBK : e % kBM;
      const int c = Problem::kAColsContiguous ? e % kBK : e / kBM;
      As[r * Pitch<T>::kA + c] = gather(problem.a_ptr, a_rows[r], a_cols[c], a_window);
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int r = Problem::kBColsContiguous ? e / kBN : e % kBK;
      const int c = Problem::kBColsContiguous ? e % kBN : e / kBK;
      Bs[r * Pitch<T>::kB + c] = gather(problem.b_ptr, b_rows[r], b_cols[c], b_window);
    }
    __syncthreads();
    Math::mma(As, Bs, acc);
    if (sums && tid < kBM) {
      for (int c = 0; c < kBK; ++c) row_sum += to_float(As[tid * Pitch<T>::kA + c]);
    }
    __syncthreads();
  }

  Math::store(acc, Cs);
  __syncthreads();
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN;
    const int c = e % kBN;
    if (row0 + r < problem.m_rows && col0 + c < problem.n_cols) problem.store(row0 + r, col0 + c, Cs[r * kLdc + c]);
  }
  if (sums && tid < kBM && row0 + tid < problem.m_rows) problem.store_row_sum(row0 + tid, row_sum);
}

// Launch `problem` with the math its dtype and the TF32 policy ask for.
template <template <typename> class Problem, typename T>
cudaError_t launch_problem(const Problem<T>& problem, dim3 grid, bool tf32, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    if (!tf32) return launch(igemm_kernel<T, SimtMath, Problem<T>>, grid, kThreads, 0, stream, problem);
    return launch(igemm_kernel<T, WmmaMath<float>, Problem<T>>, grid, kThreads, 0, stream, problem);
  } else {
    return launch(igemm_kernel<T, WmmaMath<T>, Problem<T>>, grid, kThreads, 0, stream, problem);
  }
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace conv
}  // namespace bigkern
