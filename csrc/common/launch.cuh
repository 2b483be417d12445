// Kernel launch for every family's kernels: opts into large dynamic shared memory, launches, and
// returns the launch error. tests/cuda_emulation/ replaces this header to run the kernels on a CPU.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace bigkern {

// Opt a kernel into `bytes` of dynamic shared memory (above 48 KiB needs asking) and launch it.
template <typename Kernel, typename... Args>
inline cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream,
                          Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem_bytes));
  if (error != cudaSuccess) return error;
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace bigkern
