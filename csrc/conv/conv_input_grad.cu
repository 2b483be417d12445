// Convolution input gradient (dgrad): the transposed convolution
//   grad_x[n, c, h, w] = sum_{k, r, s} grad_z[n, k, p, q] * w[k, c, r, s],  h = p*stride_h - pad_h + r*dil_h
// as implicit GEMM per group and per residue class (h mod stride_h, w mod stride_w): within a class
// the taps r that give a whole p = hh + (rh + pad_h - r*dil_h)/stride_h are the same for every pixel
// h = hh*stride_h + rh, an arithmetic progression first_r + i*step_h, so no work goes to the
// (stride^2 - 1)/stride^2 of (pixel, tap) pairs that contribute nothing.
// GEMM view: rows m = (n, hh, ww) pixels of the class, columns c = input channels of the group,
// reduction over (contributing tap, k), k fastest.
#include <numeric>

#include "conv/igemm.cuh"

namespace bigkern {
namespace conv {
namespace {

// Along one dimension: the taps r in [0, R) with (residue + pad - r*dil) a multiple of stride are
// r = first + i*step, i < count, where step = stride/gcd(stride, dil). They exist iff gcd divides
// residue + pad; then first = ((residue + pad)/gcd) * inverse mod step, with inverse that of
// dil/gcd modulo step (computed on the host). All terms are non-negative.
struct TapProgression {
  int gcd, inverse, step;
};

TapProgression tap_progression(int stride, int dil) {
  const int gcd = std::gcd(stride, dil);
  const int step = stride / gcd;
  int inverse = 0;
  for (int candidate = 0; candidate < step; ++candidate)
    if ((int64_t(dil / gcd) * candidate) % step == 1 % step) {
      inverse = candidate;
      break;
    }
  return TapProgression{gcd, inverse, step};
}

__device__ __forceinline__ void contributing_taps(int residue, int pad, int taps, const TapProgression& t, int& first,
                                                  int& count) {
  const int target = residue + pad;
  first = int((int64_t(target / t.gcd) * t.inverse) % t.step);
  count = (target % t.gcd == 0 && first < taps) ? (taps - 1 - first) / t.step + 1 : 0;
}

template <typename T>
struct InputGradProblem {
  static constexpr bool kAColsContiguous = true;  // A's columns run along output channels k
  static constexpr bool kBColsContiguous = true;  // B's columns along input channels c

  const T* grad;
  const T* w;
  T* dx;
  ConvGeometry g;
  Strides4 sg, sw, sd;
  TapProgression th, tw;

  // bound per block
  int group, rh, rw, class_h, class_w, first_r, count_r, first_s, count_s;
  int m_rows, n_cols;
  int64_t k_begin, k_end;
  const T* a_ptr;
  const T* b_ptr;

  __device__ int out_channels() const { return g.K / g.groups; }

  __device__ void bind(int, int z_index) {
    const int classes = g.stride_h * g.stride_w;
    group = z_index / classes;
    rh = (z_index % classes) / g.stride_w;
    rw = (z_index % classes) % g.stride_w;
    class_h = rh < g.H ? (g.H - rh + g.stride_h - 1) / g.stride_h : 0;
    class_w = rw < g.W ? (g.W - rw + g.stride_w - 1) / g.stride_w : 0;
    contributing_taps(rh, g.pad_h, g.R, th, first_r, count_r);
    contributing_taps(rw, g.pad_w, g.S, tw, first_s, count_s);
    m_rows = g.N * class_h * class_w;
    n_cols = g.C / g.groups;
    k_begin = 0;
    k_end = int64_t(count_r) * count_s * out_channels();
    a_ptr = grad;
    b_ptr = w;
  }

  __device__ void tap_of(int64_t k, int& r, int& s, int& channel) const {
    const int tap = int(k / out_channels());
    channel = int(k % out_channels());
    r = first_r + (tap / count_s) * th.step;  // count_s > 0 whenever the reduction is not empty
    s = first_s + (tap % count_s) * tw.step;
  }

  __device__ Gather a_row(int m) const {
    // the class is not empty: the kernel returned before any gather otherwise
    const int n = m / (class_h * class_w);
    const int hh = (m / class_w) % class_h;
    const int ww = m % class_w;
    return Gather{n * sg.n + int64_t(group) * out_channels() * sg.c, hh, ww, m < m_rows};
  }
  __device__ Gather a_col(int64_t k) const {
    int r, s, channel;
    tap_of(k, r, s, channel);
    // exact divisions: the numerators are multiples of the strides for contributing taps
    return Gather{channel * sg.c, (rh + g.pad_h - r * g.dil_h) / g.stride_h, (rw + g.pad_w - s * g.dil_w) / g.stride_w,
                  k < k_end};
  }
  __device__ Window a_window() const { return Window{g.P, g.Q, sg.h, sg.w}; }

  __device__ Gather b_row(int64_t k) const {
    int r, s, channel;
    tap_of(k, r, s, channel);
    return plain((int64_t(group) * out_channels() + channel) * sw.n + r * sw.h + s * sw.w, k < k_end);
  }
  __device__ Gather b_col(int c) const { return plain(c * sw.c, c < n_cols); }
  __device__ Window b_window() const { return no_window(); }

  __device__ void store(int m, int c, float value) const {
    const int n = m / (class_h * class_w);
    const int h = ((m / class_w) % class_h) * g.stride_h + rh;
    const int w_ = (m % class_w) * g.stride_w + rw;
    dx[n * sd.n + (int64_t(group) * n_cols + c) * sd.c + h * sd.h + w_ * sd.w] = from_float<T>(value);
  }

  __device__ bool row_sums() const { return false; }
  __device__ void store_row_sum(int, float) const {}
};

}  // namespace
}  // namespace conv

cudaError_t conv2d_input_grad(DType dtype, bool tf32, const ConvGeometry& g, const void* grad, Strides4 sg,
                              const void* w, Strides4 sw, void* grad_x, Strides4 sd, cudaStream_t stream) {
  using namespace conv;
  // the grid covers the largest residue class; blocks past a smaller class's end return at once
  const int64_t rows = int64_t(g.N) * ((g.H + g.stride_h - 1) / g.stride_h) * ((g.W + g.stride_w - 1) / g.stride_w);
  const int c_per_group = g.C / g.groups;
  const dim3 grid(ceil_div(rows, kBM) * ceil_div(c_per_group, kBN), 1, g.groups * g.stride_h * g.stride_w);
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    InputGradProblem<T> problem{};
    problem.grad = static_cast<const T*>(grad);
    problem.w = static_cast<const T*>(w);
    problem.dx = static_cast<T*>(grad_x);
    problem.g = g;
    problem.sg = sg;
    problem.sw = sw;
    problem.sd = sd;
    problem.th = tap_progression(g.stride_h, g.dil_h);
    problem.tw = tap_progression(g.stride_w, g.dil_w);
    error = launch_problem(problem, grid, tf32, stream);
  });
  return error;
}

}  // namespace bigkern
