// Fused bias + activation, backward: grad_x = grad_y * act'(x + bias), recomputing x + bias rather
// than storing it, and the per-channel sums of grad_x for grad_bias in the same pass.
//
// Dense storage is a row-major (n_rows, n_cols) matrix, whose last row may be short (numel need not
// be a multiple of n_cols when the rows are plain chunks):
//   channel_in_rows: channel = row % channels (NCHW-like). One warp per row; one fp32 sum per row.
//   otherwise:       channel = column (channels innermost). One thread per column, walking a block
//                    of rows; one fp32 sum per (row block, column).
// The caller adds the partial sums up: deterministic, no atomics.
#include <algorithm>

#include "common/activation.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "epilogue/bias_act.h"

namespace bigkern {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kColumnThreads = 256;

template <typename T, int ACT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
bias_act_backward_rows_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ bias,
                              T* __restrict__ grad_x, float* __restrict__ partial, int64_t numel, int64_t n_rows,
                              int64_t n_cols, int64_t channels, float negative_slope) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  if (row >= n_rows) return;
  const float b = bias != nullptr ? to_float(bias[row % channels]) : 0.f;
  const int64_t base = row * n_cols;
  const int64_t row_length = std::min(n_cols, numel - base);
  float sum = 0.f;
  for (int64_t col = lane; col < row_length; col += 32) {
    const float grad_z = activation_grad<ACT>(to_float(x[base + col]) + b, to_float(grad_y[base + col]),
                                              negative_slope);
    grad_x[base + col] = from_float<T>(grad_z);
    sum += grad_z;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) partial[row] = sum;
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kColumnThreads)
bias_act_backward_columns_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ bias,
                                 T* __restrict__ grad_x, float* __restrict__ partial, int64_t n_rows,
                                 int64_t n_cols, int64_t rows_per_program, float negative_slope) {
  const int64_t col = blockIdx.y * int64_t(kColumnThreads) + threadIdx.x;
  if (col >= n_cols) return;
  const float b = bias != nullptr ? to_float(bias[col]) : 0.f;
  const int64_t first_row = blockIdx.x * rows_per_program;
  const int64_t last_row = std::min(first_row + rows_per_program, n_rows);
  float sum = 0.f;
  for (int64_t row = first_row; row < last_row; ++row) {
    const int64_t i = row * n_cols + col;
    const float grad_z = activation_grad<ACT>(to_float(x[i]) + b, to_float(grad_y[i]), negative_slope);
    grad_x[i] = from_float<T>(grad_z);
    sum += grad_z;
  }
  partial[blockIdx.x * n_cols + col] = sum;
}

int64_t rows_per_program(int64_t n_rows, int64_t n_cols) {
  // aim for ~2048 blocks in all, each walking at least 16 rows
  const int64_t column_blocks = (n_cols + kColumnThreads - 1) / kColumnThreads;
  const int64_t row_blocks = std::max<int64_t>(1, 2048 / column_blocks);
  return std::max<int64_t>(16, (n_rows + row_blocks - 1) / row_blocks);
}

}  // namespace

int64_t bias_act_backward_row_programs(int64_t n_rows, int64_t n_cols, bool channel_in_rows) {
  if (channel_in_rows) return n_rows;
  const int64_t per = rows_per_program(n_rows, n_cols);
  return (n_rows + per - 1) / per;
}

cudaError_t bias_act_backward(DType dtype, const void* grad_y, const void* x, const void* bias, void* grad_x,
                              float* partial, int64_t numel, int64_t n_rows, int64_t n_cols, int64_t channels,
                              bool channel_in_rows, int activation, float negative_slope, cudaStream_t stream) {
  if (n_rows == 0 || n_cols == 0) return cudaSuccess;
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* gy = static_cast<const T*>(grad_y);
    const T* xx = static_cast<const T*>(x);
    const T* bb = static_cast<const T*>(bias);
    T* gx = static_cast<T*>(grad_x);
    dispatch_activation(activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      if (channel_in_rows) {
        const int64_t blocks = (n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
        error = launch(bias_act_backward_rows_kernel<T, ACT>, dim3(blocks), kWarpsPerBlock * 32, 0, stream, gy, xx,
                       bb, gx, partial, numel, n_rows, n_cols, channels, negative_slope);
      } else {
        const int64_t per = rows_per_program(n_rows, n_cols);
        const dim3 grid((n_rows + per - 1) / per, (n_cols + kColumnThreads - 1) / kColumnThreads);
        error = launch(bias_act_backward_columns_kernel<T, ACT>, grid, kColumnThreads, 0, stream, gy, xx, bb, gx,
                       partial, n_rows, n_cols, per, negative_slope);
      }
    });
  });
  return error;
}

}  // namespace bigkern
