// Fused bias + activation, forward: one read of x, one write of y.
//
// A dense tensor (any dimension order) is walked as flat storage: the element at offset o belongs
// to channel (o / channel_stride) % channels. Each thread moves 16 bytes at a time when the
// pointers are aligned and the element count allows.
#include <algorithm>

#include "common/activation.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "epilogue/bias_act.h"

namespace bigkern {
namespace {

constexpr int kThreads = 256;

template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(kThreads)
bias_act_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int64_t numel,
                        int64_t channel_stride, int64_t channels, float negative_slope) {
  const int64_t n_packs = numel / VEC;
  for (int64_t pack = blockIdx.x * int64_t(kThreads) + threadIdx.x; pack < n_packs;
       pack += int64_t(gridDim.x) * kThreads) {
    const int64_t first = pack * VEC;
    Pack<T, VEC> in = reinterpret_cast<const Pack<T, VEC>*>(x)[pack];
    Pack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float z = to_float(in.v[i]);
      if (bias != nullptr) z += to_float(bias[((first + i) / channel_stride) % channels]);
      out.v[i] = from_float<T>(activate<ACT>(z, negative_slope));
    }
    reinterpret_cast<Pack<T, VEC>*>(y)[pack] = out;
  }
}

template <typename T, int ACT>
cudaError_t launch_forward(const T* x, const T* bias, T* y, int64_t numel, int64_t channel_stride, int64_t channels,
                   float negative_slope, cudaStream_t stream) {
  constexpr int kVec = kPack16<T>;
  const bool vectorize = numel % kVec == 0 && aligned16(x) && aligned16(y);
  const int64_t work = vectorize ? numel / kVec : numel;
  // enough blocks to fill any GPU several times over; the grid-stride loop does the rest
  const int blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, 65536));
  if (vectorize)
    return launch(bias_act_forward_kernel<T, ACT, kVec>, dim3(blocks), kThreads, 0, stream, x, bias, y, numel,
                  channel_stride, channels, negative_slope);
  return launch(bias_act_forward_kernel<T, ACT, 1>, dim3(blocks), kThreads, 0, stream, x, bias, y, numel,
                channel_stride, channels, negative_slope);
}

}  // namespace

cudaError_t bias_act_forward(DType dtype, const void* x, const void* bias, void* y, int64_t numel,
                             int64_t channel_stride, int64_t channels, int activation, float negative_slope,
                             cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  cudaError_t error = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    dispatch_activation(activation, [&](auto act) {
      error = launch_forward<T, decltype(act)::value>(static_cast<const T*>(x), static_cast<const T*>(bias),
                                                      static_cast<T*>(y), numel, channel_stride, channels,
                                                      negative_slope, stream);
    });
  });
  return error;
}

}  // namespace bigkern
