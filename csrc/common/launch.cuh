// Kernel launch for every family's kernels: opts into large dynamic shared memory, launches, and
// returns the launch error. tests/cuda_emulation/ replaces this header to run the kernels on a CPU.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

// Declares `name`, the launch's dynamic shared memory (16-byte aligned bytes), in a kernel.
#define BIGKERN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

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

// A cooperative launch (every block resident at once, so grid-wide barriers are allowed) of a
// kernel taking one parameter struct: opts into the dynamic shared memory and launches.
template <typename Kernel, typename Params>
inline cudaError_t launch_cooperative(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream,
                                      Params params) {
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem_bytes));
  if (error != cudaSuccess) return error;
  void* args[] = {&params};
  error = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, dim3(threads), args, smem_bytes,
                                      stream);
  return error == cudaSuccess ? cudaGetLastError() : error;
}

// Blocks of `kernel` one SM keeps resident with this much dynamic shared memory, after raising the
// kernel's limit to it; 0 when the device refuses (an answer here, not a sticky error).
template <typename Kernel>
inline int resident_blocks_per_sm(Kernel kernel, int threads, size_t smem_bytes) {
  int blocks = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes) != cudaSuccess)
    blocks = 0;
  cudaGetLastError();
  return blocks;
}

}  // namespace bigkern
