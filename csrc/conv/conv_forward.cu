// Convolution forward as implicit GEMM, with the epilogue fused:
//   y = act(z),  z = conv(x, w) + residual + bias (saved for backward if asked: act's own argument)
// GEMM view per group g: rows m = (n, p, q) output pixels, columns k = output channels of the group,
// reduction over (tap, c) = (r, s, input channel), channel fastest (the order NHWC input and
// (K, R, S, C) weights are stored in). A[m, (tap, c)] = x[n, g*Cg + c, p*stride - pad + r*dil, ...]
// is gathered through the window (zero padding by bounds); B[(tap, c), k] = w[g*Kg + k, c, r, s].
#include "conv/igemm.cuh"

namespace bigkern {
namespace conv {
namespace {

template <typename T>
struct ForwardProblem {
  static constexpr bool kAColsContiguous = true;   // A's columns run along input channels
  static constexpr bool kBColsContiguous = false;  // B's rows do

  const T* x;
  const T* w;
  const T* bias;
  const T* residual;
  T* y;
  T* z;
  ConvGeometry g;
  Strides4 sx, sw, sr, sy, sz;
  int activation;
  float negative_slope;

  // bound per block
  int group, m_rows, n_cols;
  int64_t k_begin, k_end;
  const T* a_ptr;
  const T* b_ptr;

  __device__ int channels() const { return g.C / g.groups; }

  __device__ void bind(int, int z_index) {
    group = z_index;
    m_rows = g.N * g.P * g.Q;
    n_cols = g.K / g.groups;
    k_begin = 0;
    k_end = int64_t(channels()) * g.R * g.S;
    a_ptr = x;
    b_ptr = w;
  }

  __device__ Gather a_row(int m) const {
    const int n = m / (g.P * g.Q);
    const int p = (m / g.Q) % g.P;
    const int q = m % g.Q;
    return Gather{n * sx.n + int64_t(group) * channels() * sx.c, p * g.stride_h - g.pad_h, q * g.stride_w - g.pad_w,
                  m < m_rows};
  }
  __device__ Gather a_col(int64_t k) const {
    const int tap = int(k / channels());
    const int c = int(k % channels());
    return Gather{c * sx.c, (tap / g.S) * g.dil_h, (tap % g.S) * g.dil_w, k < k_end};
  }
  __device__ Window a_window() const { return Window{g.H, g.W, sx.h, sx.w}; }

  __device__ Gather b_row(int64_t k) const {
    const int tap = int(k / channels());
    const int c = int(k % channels());
    return plain(c * sw.c + (tap / g.S) * sw.h + (tap % g.S) * sw.w, k < k_end);
  }
  __device__ Gather b_col(int col) const {
    return plain((int64_t(group) * n_cols + col) * sw.n, col < n_cols);
  }
  __device__ Window b_window() const { return no_window(); }

  __device__ void store(int m, int col, float value) const {
    const int n = m / (g.P * g.Q);
    const int p = (m / g.Q) % g.P;
    const int q = m % g.Q;
    const int64_t channel = int64_t(group) * n_cols + col;
    if (residual != nullptr) value += to_float(residual[n * sr.n + channel * sr.c + p * sr.h + q * sr.w]);
    if (bias != nullptr) value += to_float(bias[channel]);
    if (z != nullptr) z[n * sz.n + channel * sz.c + p * sz.h + q * sz.w] = from_float<T>(value);
    y[n * sy.n + channel * sy.c + p * sy.h + q * sy.w] = from_float<T>(activate_code(activation, value, negative_slope));
  }

  __device__ bool row_sums() const { return false; }
  __device__ void store_row_sum(int, float) const {}
};

}  // namespace
}  // namespace conv

cudaError_t conv2d_forward(DType dtype, bool tf32, const ConvGeometry& g, const void* x, Strides4 sx, const void* w,
                           Strides4 sw, const void* bias, const void* residual, Strides4 sr, void* y, Strides4 sy,
                           void* z, Strides4 sz, int activation, float negative_slope, cudaStream_t stream) {
  using namespace conv;
  const int64_t rows = int64_t(g.N) * g.P * g.Q;
  const int k_per_group = g.K / g.groups;
  const dim3 grid(ceil_div(rows, kBM) * ceil_div(k_per_group, kBN), 1, g.groups);
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    ForwardProblem<T> problem{};
    problem.x = static_cast<const T*>(x);
    problem.w = static_cast<const T*>(w);
    problem.bias = static_cast<const T*>(bias);
    problem.residual = static_cast<const T*>(residual);
    problem.y = static_cast<T*>(y);
    problem.z = static_cast<T*>(z);
    problem.g = g;
    problem.sx = sx;
    problem.sw = sw;
    problem.sr = sr;
    problem.sy = sy;
    problem.sz = sz;
    problem.activation = activation;
    problem.negative_slope = negative_slope;
    error = launch_problem(problem, grid, tf32, stream);
  });
  return error;
}

}  // namespace bigkern
