// Launchers of the implicit-GEMM convolution kernels (conv_forward.cu, conv_input_grad.cu,
// conv_weight_grad.cu). Plain pointers, strides and sizes only, so the torch binding (conv_op.cpp)
// and the kernels compile separately. Every tensor is addressed through its four strides: NCHW,
// channels_last and other strided views are all read in place.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"

namespace bigkern {

// input (N, C, H, W), weight (K, C/groups, R, S), output (N, K, P, Q); padding is the top/left
// offset (a larger bottom/right padding only shows in P and Q).
struct ConvGeometry {
  int N, C, H, W, K, R, S, P, Q;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
};

struct Strides4 {
  int64_t n, c, h, w;  // for a weight: (k, c, r, s)
};

// y = act(conv(x, w) + residual + bias); z = conv(x, w) + residual + bias when z is not null (what the
// backward pass needs). bias, residual and z may be null. `tf32`: fp32 inputs on TF32 tensor
// cores (torch's cudnn.allow_tf32), else fp32 FMA.
cudaError_t conv2d_forward(DType dtype, bool tf32, const ConvGeometry& g, const void* x, Strides4 sx, const void* w,
                           Strides4 sw, const void* bias, const void* residual, Strides4 sr, void* y, Strides4 sy,
                           void* z, Strides4 sz, int activation, float negative_slope, cudaStream_t stream);

// grad_x = the transposed convolution of grad_z with w, every element of grad_x written.
cudaError_t conv2d_input_grad(DType dtype, bool tf32, const ConvGeometry& g, const void* grad, Strides4 sg,
                              const void* w, Strides4 sw, void* grad_x, Strides4 sd, cudaStream_t stream);

// fp32 partial sums of grad_w over `splits` slices of the N*P*Q pixels: partial is a dense
// (splits, K, C/groups, R, S) array, bias_partial (splits, K) or null (then no grad_bias).
cudaError_t conv2d_weight_grad(DType dtype, bool tf32, const ConvGeometry& g, const void* grad, Strides4 sg,
                               const void* x, Strides4 sx, float* partial, float* bias_partial, int splits,
                               cudaStream_t stream);

}  // namespace bigkern
