// The emulator's stand-in for csrc/common/launch.cuh: runs every CTA of the grid on the CPU,
// checking the launch configuration the way the GPU would.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "emulator.h"

namespace bigkern {

// What an sm_80 / sm_90 GPU allows: 1024 threads, 227 KiB of shared memory per block (A100: 163 KiB).
constexpr size_t kEmulatedMaxSharedBytes = 227 * 1024;

template <typename Kernel, typename... Args>
inline cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  if (threads > 1024 || threads % 32 || smem_bytes > kEmulatedMaxSharedBytes ||
      smem_bytes > sizeof(attention::shared_raw)) {
    emulation::fail("launch: " + std::to_string(threads) + " threads, " + std::to_string(smem_bytes) +
                    " bytes of shared memory exceed the GPU's limits");
    return cudaErrorInvalidConfiguration;
  }
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emulation::run_block(make_uint3(x, y, z), make_uint3(grid.x, grid.y, grid.z), threads, smem_bytes,
                             [&] { kernel(args...); });
        if (!emulation::state().error.empty()) return cudaErrorLaunchFailure;
      }
  return cudaSuccess;
}

}  // namespace bigkern
