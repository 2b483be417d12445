// The emulator's stand-in for csrc/common/launch.cuh: runs every CTA of the grid on the CPU,
// checking the launch configuration the way the GPU would.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "emulator.h"

// A kernel's dynamic shared memory: its CTA's, that is its OS thread's (see launch_cooperative).
#define BIGKERN_DYNAMIC_SHARED(name) unsigned char* name = ::emulation::cta_shared_memory()

namespace bigkern {

// What an sm_80 / sm_90 GPU allows: 1024 threads, 227 KiB of shared memory per block (A100: 163 KiB).
constexpr size_t kEmulatedMaxSharedBytes = 227 * 1024;

template <typename Kernel, typename... Args>
inline cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  emulation::largest_shared_launch = std::max(emulation::largest_shared_launch, smem_bytes);
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

// A cooperative launch: every CTA runs at once, each on an OS thread of its own (with its own
// emulator state and fibers), so that grid.sync() -- include/cooperative_groups.h -- can hold each
// CTA until all have arrived. A CTA that ends leaves the barrier, so the others never wait for it.
template <typename Kernel, typename Params>
inline cudaError_t launch_cooperative(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t,
                                      Params params) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  emulation::largest_shared_launch = std::max(emulation::largest_shared_launch, smem_bytes);
  if (threads > 1024 || threads % 32 || smem_bytes > kEmulatedMaxSharedBytes) {
    emulation::fail("cooperative launch: " + std::to_string(threads) + " threads, " + std::to_string(smem_bytes) +
                    " bytes of shared memory exceed the GPU's limits");
    return cudaErrorInvalidConfiguration;
  }
  const unsigned blocks = grid.x * grid.y * grid.z;
  std::barrier<> grid_barrier(blocks);
  emulation::GridBarrier::current = &grid_barrier;
  const unsigned seed = emulation::state().random();
  std::vector<std::string> errors(blocks);
  std::vector<std::thread> ctas;
  for (unsigned i = 0; i < blocks; ++i)
    ctas.emplace_back([&, i] {
      emulation::State& s = emulation::state();
      s.error.clear();
      s.random.seed(seed + i);
      const uint3 block = make_uint3(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
      emulation::run_block(block, make_uint3(grid.x, grid.y, grid.z), threads, smem_bytes, [&] { kernel(params); });
      errors[i] = s.error;
      grid_barrier.arrive_and_drop();
    });
  for (std::thread& cta : ctas) cta.join();
  emulation::GridBarrier::current = nullptr;
  for (const std::string& error : errors)
    if (!error.empty()) {
      emulation::fail(error);
      return cudaErrorLaunchFailure;
    }
  return cudaSuccess;
}

// Every emulated CTA fits as long as the shared memory does.
template <typename Kernel>
inline int resident_blocks_per_sm(Kernel, int threads, size_t smem_bytes) {
  return threads <= 1024 && smem_bytes <= kEmulatedMaxSharedBytes ? 1 : 0;
}

}  // namespace bigkern
