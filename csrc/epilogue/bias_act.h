// Launchers for the fused bias + activation kernels (bias_act_forward.cu, bias_act_backward.cu).
// Plain pointers and sizes only, so the torch binding and the kernels compile separately.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"

namespace bigkern {

// y = act(x + bias[(offset / channel_stride) % channels]) over the flat storage of a dense tensor.
// bias may be null. Returns the launch error, if any.
cudaError_t bias_act_forward(DType dtype, const void* x, const void* bias, void* y, int64_t numel,
                             int64_t channel_stride, int64_t channels, int activation, float negative_slope,
                             cudaStream_t stream);

// How many row blocks the backward splits a channels-in-columns tensor into: the partial sums are
// a (bias_act_backward_row_programs(...), n_cols) fp32 matrix. With channels in rows they are (n_rows,).
int64_t bias_act_backward_row_programs(int64_t n_rows, int64_t n_cols, bool channel_in_rows);

// grad_x = grad_y * act'(x + bias) over a dense (n_rows, n_cols) storage matrix of numel elements
// (the last row may be short), and per-row
// (channel_in_rows) or per-column-per-row-block partial sums of grad_x into `partial` (fp32).
cudaError_t bias_act_backward(DType dtype, const void* grad_y, const void* x, const void* bias, void* grad_x,
                              float* partial, int64_t numel, int64_t n_rows, int64_t n_cols, int64_t channels,
                              bool channel_in_rows, int activation, float negative_slope, cudaStream_t stream);

}  // namespace bigkern
