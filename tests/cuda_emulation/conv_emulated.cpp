// C entry points that run bigkern's CUDA implicit-GEMM convolution launchers (csrc/conv/) and the
// fused bias + activation launchers its backward uses (csrc/epilogue/) on the CPU through the
// emulator. tests/test_conv_cuda.py compiles one translation unit that includes this file and then
// the production sources (conv_{forward,input_grad,weight_grad}.cu, bias_act_{forward,backward}.cu),
// with include/ ahead of csrc/ (so <mma.h> and common/launch.cuh are the emulator's), and calls
// these through ctypes.
#include <cstdint>
#include <cstring>
#include <string>

#include "emulator.h"
#include "common/launch.cuh"
#include <mma.h>
#include "conv/conv.h"
#include "epilogue/bias_act.h"

// The conv kernels declare their shared memory statically inside the kernel. CTAs run one after
// another here, so one function-level static per kernel is exactly one CTA's shared memory, seen
// by all of its threads.
#undef __shared__
#define __shared__ static

namespace {

bigkern::Strides4 strides_of(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }

bigkern::ConvGeometry geometry_of(const int* g) {
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]};
}

void configure(unsigned seed) {
  emulation::State& s = emulation::state();
  s.error.clear();
  s.deferred_copies = false;
  s.random.seed(seed);
  s.readable.clear();
}

}  // namespace

extern "C" {

// geometry: N, C, H, W, K, R, S, P, Q, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
// every stride array: four element strides.
int emulated_conv2d_forward(int dtype, int tf32, const int* geometry, const void* x, const int64_t* sx,
                            const void* w, const int64_t* sw, const void* bias, const void* residual,
                            const int64_t* sr, void* y, const int64_t* sy, void* z, const int64_t* sz, int activation,
                            float negative_slope, unsigned seed, char* error, int error_size) {
  configure(seed);
  cudaError_t status = bigkern::conv2d_forward(
      static_cast<bigkern::DType>(dtype), tf32 != 0, geometry_of(geometry), x, strides_of(sx), w, strides_of(sw),
      bias, residual, strides_of(sr), y, strides_of(sy), z, strides_of(sz), activation, negative_slope, nullptr);
  return emulation::report(status, error, error_size);
}

int emulated_conv2d_input_grad(int dtype, int tf32, const int* geometry, const void* grad, const int64_t* sg,
                               const void* w, const int64_t* sw, void* grad_x, const int64_t* sd, unsigned seed,
                               char* error, int error_size) {
  configure(seed);
  cudaError_t status = bigkern::conv2d_input_grad(static_cast<bigkern::DType>(dtype), tf32 != 0,
                                                  geometry_of(geometry), grad, strides_of(sg), w, strides_of(sw),
                                                  grad_x, strides_of(sd), nullptr);
  return emulation::report(status, error, error_size);
}

int emulated_conv2d_weight_grad(int dtype, int tf32, const int* geometry, const void* grad, const int64_t* sg,
                                const void* x, const int64_t* sx, float* partial, float* bias_partial, int splits,
                                unsigned seed, char* error, int error_size) {
  configure(seed);
  cudaError_t status = bigkern::conv2d_weight_grad(static_cast<bigkern::DType>(dtype), tf32 != 0,
                                                   geometry_of(geometry), grad, strides_of(sg), x, strides_of(sx),
                                                   partial, bias_partial, splits, nullptr);
  return emulation::report(status, error, error_size);
}

// bias_act: the launchers of csrc/epilogue/bias_act.h, the partial sums into `partial`
// (bias_act_backward_row_programs rows, times n_cols unless the channel is in the rows).
int emulated_bias_act_forward(int dtype, const void* x, const void* bias, void* y, int64_t numel,
                              int64_t channel_stride, int64_t channels, int activation, float negative_slope,
                              unsigned seed, char* error, int error_size) {
  configure(seed);
  cudaError_t status = bigkern::bias_act_forward(static_cast<bigkern::DType>(dtype), x, bias, y, numel, channel_stride,
                                                 channels, activation, negative_slope, nullptr);
  return emulation::report(status, error, error_size);
}

int64_t emulated_bias_act_backward_row_programs(int64_t n_rows, int64_t n_cols, int channel_in_rows) {
  return bigkern::bias_act_backward_row_programs(n_rows, n_cols, channel_in_rows != 0);
}

int emulated_bias_act_backward(int dtype, const void* grad_y, const void* x, const void* bias, void* grad_x,
                               float* partial, int64_t numel, int64_t n_rows, int64_t n_cols, int64_t channels,
                               int channel_in_rows, int activation, float negative_slope, unsigned seed, char* error,
                               int error_size) {
  configure(seed);
  cudaError_t status = bigkern::bias_act_backward(static_cast<bigkern::DType>(dtype), grad_y, x, bias, grad_x, partial,
                                                  numel, n_rows, n_cols, channels, channel_in_rows != 0, activation,
                                                  negative_slope, nullptr);
  return emulation::report(status, error, error_size);
}

}  // extern "C"
