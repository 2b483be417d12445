// Persistent LSTM forward: one cooperative launch for the whole sequence.
//
// Block k owns hidden units [k*units, (k+1)*units) and loads the 4*units rows of W_hh that feed
// them (gates i, f, g, o) into shared memory once. Each timestep then:
//   1. copies h_{t-1} (B x H, written by every block at the previous step) into shared memory;
//   2. z = W_slice @ h_{t-1}: a block-wide matrix x vectors product out of shared memory (fp32);
//   3. thread (u, b) adds its prefetched x-projection and bias, applies the gates and updates its
//      cell, whose c never leaves a register; it writes h_t (and, for backward, c and the gates);
//   4. grid-wide barrier, so that every block sees all of h_t.
// Only step 1's read of h_{t-1} (a few KB through L2) and the barrier are on the critical path:
// W_hh is read from DRAM once per sequence instead of once per step.
#include <algorithm>

#include "common/activation.cuh"
#include "common/dtype.cuh"
#include "lstm/lstm.h"
#include "lstm/persistent.cuh"

namespace bigkern {
namespace lstm {

struct ForwardParams {
  const void* gx;
  int64_t gx_stride;
  const void* w_hh;
  const float* bias;
  const void* h0;
  const void* c0;
  void* out;
  float* cells;
  float* gates;
  void* h_n;
  void* c_n;
  int64_t steps, batch, hidden;
  int units;
  bool reverse;
};

template <typename T, int MAX_B>
__global__ void __launch_bounds__(kThreads, 1) lstm_persistent_forward_kernel(ForwardParams p) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  BIGKERN_DYNAMIC_SHARED(shared);
  const int64_t H = p.hidden, B = p.batch;
  const int64_t pitch = pitch_of<T>(H);
  const int units = p.units;
  T* w = reinterpret_cast<T*>(shared);                   // 4*units rows of pitch
  T* h = w + 4 * units * pitch;                          // MAX_B rows of pitch
  float* z = reinterpret_cast<float*>(h + MAX_B * pitch);  // 4*units x MAX_B
  const int64_t j0 = int64_t(blockIdx.x) * units;
  const int mine = static_cast<int>(std::min<int64_t>(units, H - j0));  // the last block may own fewer

  // W_hh row q*H + j0 + u becomes shared row q*units + u; rows of units this block lacks, and the
  // padding past H, are zero.
  const T* w_hh = static_cast<const T*>(p.w_hh);
  for (int64_t idx = threadIdx.x; idx < 4 * units * pitch; idx += kThreads) {
    const int64_t r = idx / pitch, k = idx - r * pitch;
    const int64_t q = r / units, u = r - q * units;
    w[idx] = (u < mine && k < H) ? w_hh[(q * H + j0 + u) * H + k] : from_float<T>(0.f);
  }
  for (int64_t idx = threadIdx.x; idx < MAX_B * pitch; idx += kThreads) h[idx] = from_float<T>(0.f);
  // the zeros (kept in the padding past H) land before any thread loads h_0 over the rest: warps
  // that fill and warps that load are not the same ones
  __syncthreads();

  // Thread (u, b) owns the cell of unit j0 + u in sequence b for the whole sequence.
  const bool owner = threadIdx.x < mine * B;
  const int u = owner ? static_cast<int>(threadIdx.x / B) : 0;
  const int b = owner ? static_cast<int>(threadIdx.x % B) : 0;
  const int64_t j = j0 + u;
  const T* gx = static_cast<const T*>(p.gx);
  T* out = static_cast<T*>(p.out);
  float bias[4] = {0.f, 0.f, 0.f, 0.f};
  float c = 0.f;
  if (owner) {
    c = to_float(static_cast<const T*>(p.c0)[b * H + j]);
    if (p.bias != nullptr)
      for (int q = 0; q < 4; ++q) bias[q] = p.bias[q * H + j];
  }
  auto time_of = [&](int64_t s) { return p.reverse ? p.steps - 1 - s : s; };
  // x-projection + bias of the owned cell, loaded a step ahead so its latency hides behind the barrier
  float x[4];
  auto prefetch = [&](int64_t s) {
    const T* row = gx + (time_of(s) * B + b) * p.gx_stride + j;
    for (int q = 0; q < 4; ++q) x[q] = to_float(row[q * H]) + bias[q];
  };
  if (owner) prefetch(0);

  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = time_of(s);
    const T* h_prev = s == 0 ? static_cast<const T*>(p.h0) : out + time_of(s - 1) * B * H;
    load_rows<T>(h, pitch, h_prev, static_cast<int>(B), H);
    __syncthreads();
    block_matvec<T, MAX_B>(w, h, pitch, 4 * units, static_cast<int>(B), z);
    __syncthreads();
    if (owner) {
      const float i = sigmoidf(z[(0 * units + u) * MAX_B + b] + x[0]);
      const float f = sigmoidf(z[(1 * units + u) * MAX_B + b] + x[1]);
      const float g = tanhf(z[(2 * units + u) * MAX_B + b] + x[2]);
      const float o = sigmoidf(z[(3 * units + u) * MAX_B + b] + x[3]);
      c = f * c + i * g;
      const T h_t = from_float<T>(o * tanhf(c));
      const int64_t row = t * B + b;
      out[row * H + j] = h_t;
      if (p.cells != nullptr) p.cells[row * H + j] = c;
      if (p.gates != nullptr) {
        float* gates = p.gates + row * 4 * H + j;
        gates[0] = i;
        gates[H] = f;
        gates[2 * H] = g;
        gates[3 * H] = o;
      }
      if (s + 1 < p.steps) {
        prefetch(s + 1);
      } else {
        static_cast<T*>(p.h_n)[b * H + j] = h_t;
        static_cast<T*>(p.c_n)[b * H + j] = from_float<T>(c);
      }
    }
    if (s + 1 < p.steps) grid.sync();  // h_t complete (and visible) everywhere before anyone reads it
  }
}

}  // namespace lstm

int lstm_persistent_forward_blocks_per_sm(DType dtype, int max_batch, int64_t shared_memory) {
  int blocks = 0;
  lstm::dispatch_instance(dtype, max_batch, [&](auto zero, auto mb) {
    const auto kernel = lstm::lstm_persistent_forward_kernel<decltype(zero), decltype(mb)::value>;
    blocks = resident_blocks_per_sm(kernel, lstm::kThreads, static_cast<size_t>(shared_memory));
  });
  return blocks;
}

PersistentPlan lstm_persistent_plan(DType dtype, int64_t batch, int64_t hidden, bool backward,
                                    const DeviceLimits& limits) {
  PersistentPlan plan;
  plan.max_batch = lstm::kMaxBatch;
  plan.shared_memory_limit = limits.shared_memory_per_block;
  // matrix rows per unit: the forward kernel's 4 gate rows, the backward kernel's one column
  const int rows_per_unit = backward ? 1 : 4;
  plan.max_units_per_block = lstm::kWarps * lstm::kMaxRowsPerWarp / rows_per_unit;
  // and one thread per (unit, sequence) carries a unit's state from step to step
  plan.max_units_per_block =
      static_cast<int>(std::min<int64_t>(plan.max_units_per_block, lstm::kThreads / std::max<int64_t>(batch, 1)));
  if (!limits.cooperative_launch) {
    plan.status = PlanStatus::kNoCooperativeLaunch;
    return plan;
  }
  if (batch > lstm::kMaxBatch) {
    plan.status = PlanStatus::kBatchTooLarge;
    return plan;
  }
  const int64_t sms = std::max(1, limits.sms);
  plan.units_per_block = static_cast<int>((hidden + sms - 1) / sms);
  plan.blocks = static_cast<int>((hidden + plan.units_per_block - 1) / plan.units_per_block);
  const int max_batch = batch <= 4 ? 4 : 8;
  bool known = dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    plan.shared_memory = backward ? lstm::backward_shared_memory<T>(plan.units_per_block, hidden, max_batch)
                                  : lstm::forward_shared_memory<T>(plan.units_per_block, hidden, max_batch);
  });
  if (!known) {
    plan.status = PlanStatus::kBadDtype;
    return plan;
  }
  if (plan.shared_memory > limits.shared_memory_per_block) {
    plan.status = PlanStatus::kSharedMemory;
    return plan;
  }
  if (plan.units_per_block > plan.max_units_per_block) {
    plan.status = PlanStatus::kTooManyUnits;
    return plan;
  }
  const int per_sm = backward ? lstm_persistent_backward_blocks_per_sm(dtype, max_batch, plan.shared_memory)
                              : lstm_persistent_forward_blocks_per_sm(dtype, max_batch, plan.shared_memory);
  plan.resident_blocks = per_sm * limits.sms;
  if (plan.resident_blocks < plan.blocks) plan.status = PlanStatus::kNotResident;
  return plan;
}

cudaError_t lstm_persistent_forward(DType dtype, const PersistentPlan& plan, const void* gx, int64_t gx_stride,
                                    const void* w_hh, const float* bias, const void* h0, const void* c0, void* out,
                                    float* cells, float* gates, void* h_n, void* c_n, int64_t steps, int64_t batch,
                                    int64_t hidden, bool reverse, cudaStream_t stream) {
  if (steps == 0 || batch == 0 || hidden == 0) return cudaSuccess;
  if (plan.status != PlanStatus::kOk) return cudaErrorInvalidConfiguration;
  lstm::ForwardParams params{gx, gx_stride, w_hh, bias, h0, c0, out, cells, gates, h_n, c_n,
                             steps, batch, hidden, plan.units_per_block, reverse};
  cudaError_t error = cudaErrorInvalidValue;
  lstm::dispatch_instance(dtype, batch, [&](auto zero, auto mb) {
    const auto kernel = lstm::lstm_persistent_forward_kernel<decltype(zero), decltype(mb)::value>;
    error = launch_cooperative(kernel, dim3(plan.blocks), lstm::kThreads, static_cast<size_t>(plan.shared_memory),
                               stream, params);
  });
  return error;
}

}  // namespace bigkern
