// Persistent LSTM backward: the reverse sweep through time in one cooperative launch.
//
// Block k owns hidden units [k*units, (k+1)*units) and keeps the W_hh columns of those units
// (4H x units, stored as units rows of 4H) in shared memory. Going back from the last processed
// step, each step:
//   1. copies dz of the step after it (B x 4H, written by every block) into shared memory and forms
//      the recurrent gradient of h for its units, dz_next @ W_hh[:, units] (fp32);
//   2. thread (u, b) adds grad_out (or grad_h_n at the last step), and with its saved gates, c and
//      c_prev (prefetched a step ahead) computes
//          dc = dc_next + dh o (1 - tanh(c)^2)
//          dz = [dc g i(1-i),  dc c_prev f(1-f),  dc i (1-g^2),  dh tanh(c) o(1-o)]
//      writes dz, and keeps dc_prev = dc f in a register;
//   3. grid-wide barrier.
// The weight gradients (dz^T @ H_prev and friends) are large GEMMs afterwards, in bigkern/ops/lstm.py.
#include <algorithm>

#include "common/dtype.cuh"
#include "lstm/lstm.h"
#include "lstm/persistent.cuh"

namespace bigkern {
namespace lstm {

struct BackwardParams {
  const void* grad_out;
  const void* grad_h_n;
  const void* grad_c_n;
  const void* w_hh;
  const float* gates;
  const float* cells;
  const void* c0;
  void* dz;
  float* dc;
  int64_t steps, batch, hidden;
  int units;
  bool reverse;
};

// What thread (u, b) reads of one step, loaded a step ahead.
struct SavedStep {
  float i, f, g, o, c, c_prev, grad;
};

template <typename T, int MAX_B>
__global__ void __launch_bounds__(kThreads, 1) lstm_persistent_backward_kernel(BackwardParams p) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  BIGKERN_DYNAMIC_SHARED(shared);
  const int64_t H = p.hidden, B = p.batch, H4 = 4 * p.hidden;
  const int64_t pitch = pitch_of<T>(H4);
  const int units = p.units;
  T* wt = reinterpret_cast<T*>(shared);                    // units rows of pitch: W_hh[:, j0 + u]
  T* v = wt + units * pitch;                               // MAX_B rows of pitch: dz of the next step
  float* z = reinterpret_cast<float*>(v + MAX_B * pitch);  // units x MAX_B
  const int64_t j0 = int64_t(blockIdx.x) * units;
  const int mine = static_cast<int>(std::min<int64_t>(units, H - j0));

  // Column j0 + u of W_hh becomes shared row u. Consecutive threads take consecutive units of one
  // W_hh row, so the global reads are contiguous runs of `units` elements.
  const T* w_hh = static_cast<const T*>(p.w_hh);
  for (int64_t idx = threadIdx.x; idx < units * pitch; idx += kThreads) {
    const int64_t k = idx / units, u = idx - k * units;
    wt[u * pitch + k] = (u < mine && k < H4) ? w_hh[k * H + j0 + u] : from_float<T>(0.f);
  }
  for (int64_t idx = threadIdx.x; idx < MAX_B * pitch; idx += kThreads) v[idx] = from_float<T>(0.f);

  const bool owner = threadIdx.x < mine * B;
  const int u = owner ? static_cast<int>(threadIdx.x / B) : 0;
  const int b = owner ? static_cast<int>(threadIdx.x % B) : 0;
  const int64_t j = j0 + u;
  const T* grad_out = static_cast<const T*>(p.grad_out);
  T* dz = static_cast<T*>(p.dz);
  auto time_of = [&](int64_t s) { return p.reverse ? p.steps - 1 - s : s; };
  auto load_step = [&](int64_t s) {
    const int64_t row = time_of(s) * B + b;
    const float* gates = p.gates + row * H4 + j;
    SavedStep saved;
    saved.i = gates[0];
    saved.f = gates[H];
    saved.g = gates[2 * H];
    saved.o = gates[3 * H];
    saved.c = p.cells[row * H + j];
    saved.c_prev = s > 0 ? p.cells[(time_of(s - 1) * B + b) * H + j]
                         : to_float(static_cast<const T*>(p.c0)[b * H + j]);
    saved.grad = to_float(grad_out[row * H + j]);
    return saved;
  };
  SavedStep cur{};
  float dc = 0.f;  // dc flowing back into the current step from the one after it
  if (owner) {
    cur = load_step(p.steps - 1);
    dc = to_float(static_cast<const T*>(p.grad_c_n)[b * H + j]);
  }

  for (int64_t s = p.steps - 1; s >= 0; --s) {
    const bool first = s == p.steps - 1;  // the first step of the sweep has no recurrent gradient
    if (!first) {
      load_rows<T>(v, pitch, dz + time_of(s + 1) * B * H4, static_cast<int>(B), H4);
      __syncthreads();
      block_matvec<T, MAX_B>(wt, v, pitch, units, static_cast<int>(B), z);
      __syncthreads();
    }
    if (owner) {
      const float recurrent = first ? to_float(static_cast<const T*>(p.grad_h_n)[b * H + j]) : z[u * MAX_B + b];
      const float dh = cur.grad + recurrent;
      const float tanh_c = tanhf(cur.c);
      const float dcell = dc + dh * cur.o * (1.f - tanh_c * tanh_c);
      T* row = dz + (time_of(s) * B + b) * H4 + j;
      row[0] = from_float<T>(dcell * cur.g * cur.i * (1.f - cur.i));
      row[H] = from_float<T>(dcell * cur.c_prev * cur.f * (1.f - cur.f));
      row[2 * H] = from_float<T>(dcell * cur.i * (1.f - cur.g * cur.g));
      row[3 * H] = from_float<T>(dh * tanh_c * cur.o * (1.f - cur.o));
      dc = dcell * cur.f;
      if (s > 0)
        cur = load_step(s - 1);
      else
        p.dc[b * H + j] = dc;  // grad c0
    }
    if (s > 0) grid.sync();  // dz of this step complete everywhere before the next reads it
  }
}

}  // namespace lstm

int lstm_persistent_backward_blocks_per_sm(DType dtype, int max_batch, int64_t shared_memory) {
  int blocks = 0;
  lstm::dispatch_instance(dtype, max_batch, [&](auto zero, auto mb) {
    const auto kernel = lstm::lstm_persistent_backward_kernel<decltype(zero), decltype(mb)::value>;
    blocks = resident_blocks_per_sm(kernel, lstm::kThreads, static_cast<size_t>(shared_memory));
  });
  return blocks;
}

cudaError_t lstm_persistent_backward(DType dtype, const PersistentPlan& plan, const void* grad_out,
                                     const void* grad_h_n, const void* grad_c_n, const void* w_hh,
                                     const float* gates, const float* cells, const void* c0, void* dz, float* dc,
                                     int64_t steps, int64_t batch, int64_t hidden, bool reverse,
                                     cudaStream_t stream) {
  if (steps == 0 || batch == 0 || hidden == 0) return cudaSuccess;
  if (plan.status != PlanStatus::kOk) return cudaErrorInvalidConfiguration;
  lstm::BackwardParams params{grad_out, grad_h_n, grad_c_n, w_hh, gates, cells, c0, dz, dc,
                              steps, batch, hidden, plan.units_per_block, reverse};
  cudaError_t error = cudaErrorInvalidValue;
  lstm::dispatch_instance(dtype, batch, [&](auto zero, auto mb) {
    const auto kernel = lstm::lstm_persistent_backward_kernel<decltype(zero), decltype(mb)::value>;
    error = launch_cooperative(kernel, dim3(plan.blocks), lstm::kThreads, static_cast<size_t>(plan.shared_memory),
                               stream, params);
  });
  return error;
}

}  // namespace bigkern
