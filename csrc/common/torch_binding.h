// Helpers for the thin torch bindings (*_op.cpp): the only files that include torch headers.
// Kept to torch/library.h and the ATen core so each binding compiles in seconds, not minutes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/dtype.cuh"

namespace bigkern {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "bigkern: argument '", name, "' must be float32, float16 or bfloat16, not ",
                         t.scalar_type());
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "bigkern: argument '", name, "' must be a CUDA tensor");
}

inline void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "bigkern: ", what, " failed: ", cudaGetErrorString(error));
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace bigkern
