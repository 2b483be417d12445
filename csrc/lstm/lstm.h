// Launchers for the persistent LSTM kernels (lstm_persistent_forward.cu, lstm_persistent_backward.cu).
// Plain pointers and sizes only, so the torch binding (lstm_op.cpp) and the kernels compile apart.
//
// One cooperative launch runs a whole sequence: each block owns a slice of hidden units and keeps
// its slice of W_hh in shared memory from the first timestep to the last; a grid-wide barrier
// separates timesteps (every block needs all of h_{t-1}). Dense batches (T, B) only, no proj_size.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"

namespace bigkern {

// What the device offers; the binding asks the CUDA runtime (and caches it per device).
struct DeviceLimits {
  int sms = 0;
  int64_t shared_memory_per_block = 0;  // the opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  bool cooperative_launch = false;
};

enum class PlanStatus : int {
  kOk = 0,
  kBatchTooLarge = 1,       // more sequences than the kernel keeps per block (max_batch)
  kTooManyUnits = 2,        // more hidden units per block than its warps hold accumulators for
  kSharedMemory = 3,        // the W_hh slice (and state) does not fit a block's shared memory
  kNoCooperativeLaunch = 4, // the device cannot launch cooperatively
  kNotResident = 5,         // the occupancy calculator cannot keep every block resident at once
  kBadDtype = 6,
};

// How the hidden units are spread over the blocks, and whether it works on this device.
struct PersistentPlan {
  PlanStatus status = PlanStatus::kOk;
  int blocks = 0;                 // cooperative grid size
  int units_per_block = 0;        // hidden units a block owns
  int64_t shared_memory = 0;      // dynamic shared memory a block needs
  int64_t shared_memory_limit = 0;
  int max_batch = 0;
  int max_units_per_block = 0;
  int resident_blocks = 0;        // blocks the device can keep resident with this shared memory
};

// backward=false: the forward kernel (W_hh rows of the block's units); true: the backward kernel
// (W_hh columns of the block's units).
PersistentPlan lstm_persistent_plan(DType dtype, int64_t batch, int64_t hidden, bool backward,
                                    const DeviceLimits& limits);

// Forward over T steps of B sequences (rows t*B + b), in reverse time order when `reverse`.
//   gx (T*B, 4H) rows with stride gx_stride (unit column stride), W_hh (4H, H), bias (4H) fp32 or
//   null, h0/c0 (B, H); out (T*B, H); cells (T*B, H) fp32 and gates (T*B, 4H) fp32 (activated
//   i, f, g, o) are written only when non-null (for backward); h_n/c_n (B, H).
cudaError_t lstm_persistent_forward(DType dtype, const PersistentPlan& plan, const void* gx, int64_t gx_stride,
                                    const void* w_hh, const float* bias, const void* h0, const void* c0, void* out,
                                    float* cells, float* gates, void* h_n, void* c_n, int64_t steps, int64_t batch,
                                    int64_t hidden, bool reverse, cudaStream_t stream);

// The reverse sweep: from grad_out (T*B, H), grad_h_n, grad_c_n (B, H) and the saved gates/cells,
// writes the gate gradients dz (T*B, 4H) and grad c0 (B, H, fp32) into dc.
cudaError_t lstm_persistent_backward(DType dtype, const PersistentPlan& plan, const void* grad_out,
                                     const void* grad_h_n, const void* grad_c_n, const void* w_hh,
                                     const float* gates, const float* cells, const void* c0, void* dz, float* dc,
                                     int64_t steps, int64_t batch, int64_t hidden, bool reverse,
                                     cudaStream_t stream);

}  // namespace bigkern
