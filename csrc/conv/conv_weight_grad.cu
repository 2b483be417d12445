// Convolution weight gradient (wgrad), a GEMM reduced over every output pixel:
//   grad_w[k, c, r, s] = sum_{n, p, q} grad_z[n, k, p, q] * x[n, c, p*stride_h - pad_h + r*dil_h, ...]
// GEMM view per group: rows = output channels k, columns = (tap, c) pairs (c fastest), reduction
// over pixels j = (n, p, q). The reduction is long and the output small, so it is split (grid y)
// into fp32 partial sums that the caller adds up: deterministic, no atomics. The blocks of the first
// column tile also sum their A rows: the partial sums of grad_bias.
#include "conv/igemm.cuh"

namespace bigkern {
namespace conv {
namespace {

template <typename T>
struct WeightGradProblem {
  static constexpr bool kAColsContiguous = false;  // A's rows run along output channels k
  static constexpr bool kBColsContiguous = true;   // B's columns along input channels c

  const T* grad;
  const T* x;
  float* partial;
  float* bias_partial;
  ConvGeometry g;
  Strides4 sg, sx;
  int64_t pixels_per_split;

  // bound per block
  int group, split, m_rows, n_cols;
  int64_t k_begin, k_end;
  const T* a_ptr;
  const T* b_ptr;

  __device__ int in_channels() const { return g.C / g.groups; }

  __device__ void bind(int split_index, int z_index) {
    group = z_index;
    split = split_index;
    m_rows = g.K / g.groups;
    n_cols = in_channels() * g.R * g.S;
    const int64_t pixels = int64_t(g.N) * g.P * g.Q;
    k_begin = split * pixels_per_split;
    k_end = k_begin + pixels_per_split < pixels ? k_begin + pixels_per_split : pixels;
    a_ptr = grad;
    b_ptr = x;
  }

  __device__ void pixel_of(int64_t j, int& n, int& p, int& q) const {
    n = int(j / (int64_t(g.P) * g.Q));
    p = int((j / g.Q) % g.P);
    q = int(j % g.Q);
  }

  __device__ Gather a_row(int k) const { return plain((int64_t(group) * m_rows + k) * sg.c, k < m_rows); }
  __device__ Gather a_col(int64_t j) const {
    int n, p, q;
    pixel_of(j, n, p, q);
    return plain(n * sg.n + p * sg.h + q * sg.w, j < k_end);
  }
  __device__ Window a_window() const { return no_window(); }

  __device__ Gather b_row(int64_t j) const {
    int n, p, q;
    pixel_of(j, n, p, q);
    return Gather{n * sx.n + int64_t(group) * in_channels() * sx.c, p * g.stride_h - g.pad_h, q * g.stride_w - g.pad_w,
                  j < k_end};
  }
  __device__ Gather b_col(int col) const {
    const int tap = col / in_channels();
    const int c = col % in_channels();
    return Gather{c * sx.c, (tap / g.S) * g.dil_h, (tap % g.S) * g.dil_w, col < n_cols};
  }
  __device__ Window b_window() const { return Window{g.H, g.W, sx.h, sx.w}; }

  // partial is (splits, K, C/groups, R, S): column (tap, c) goes to c*R*S + tap
  __device__ void store(int k, int col, float value) const {
    const int tap = col / in_channels();
    const int c = col % in_channels();
    const int64_t channel = int64_t(group) * m_rows + k;
    partial[((int64_t(split) * g.K + channel) * in_channels() + c) * (g.R * g.S) + tap] = value;
  }

  __device__ bool row_sums() const { return bias_partial != nullptr; }
  __device__ void store_row_sum(int k, float sum) const {
    bias_partial[int64_t(split) * g.K + int64_t(group) * m_rows + k] = sum;
  }
};

}  // namespace
}  // namespace conv

cudaError_t conv2d_weight_grad(DType dtype, bool tf32, const ConvGeometry& g, const void* grad, Strides4 sg,
                               const void* x, Strides4 sx, float* partial, float* bias_partial, int splits,
                               cudaStream_t stream) {
  using namespace conv;
  const int64_t pixels = int64_t(g.N) * g.P * g.Q;
  const int k_per_group = g.K / g.groups;
  const int columns = (g.C / g.groups) * g.R * g.S;
  const dim3 grid(ceil_div(k_per_group, kBM) * ceil_div(columns, kBN), splits, g.groups);
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    WeightGradProblem<T> problem{};
    problem.grad = static_cast<const T*>(grad);
    problem.x = static_cast<const T*>(x);
    problem.partial = partial;
    problem.bias_partial = bias_partial;
    problem.g = g;
    problem.sg = sg;
    problem.sx = sx;
    problem.pixels_per_split = (pixels + splits - 1) / splits;
    error = launch_problem(problem, grid, tf32, stream);
  });
  return error;
}

}  // namespace bigkern
