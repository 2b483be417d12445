// The emulator's stand-in for CUDA's <cooperative_groups.h>: this_grid().sync() for the kernels of a
// cooperative launch (include/common/launch.cuh runs each CTA on an OS thread of its own).
#pragma once

#include "emulator.h"

namespace cooperative_groups {

struct grid_group {
  // Every thread of every block arrives before any leaves: this CTA's threads meet first, then its
  // thread 0 waits for the other CTAs (blocking its OS thread, while the others of its CTA wait at
  // the second meeting), and the memory written before the barrier is visible after it.
  void sync() const {
    __syncthreads();
    if (emulation::linear_thread() == 0) {
      if (emulation::GridBarrier::current == nullptr)
        emulation::fail("grid.sync() outside a cooperative launch");
      else
        emulation::GridBarrier::current->arrive_and_wait();
    }
    __syncthreads();
  }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
