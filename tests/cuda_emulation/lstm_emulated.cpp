// C entry points that run bigkern's persistent LSTM launchers (csrc/lstm/) on the CPU through the
// emulator. tests/test_lstm_cuda.py compiles one translation unit that includes this file and then
// the production sources (lstm_persistent_forward.cu, lstm_persistent_backward.cu), with include/
// ahead of csrc/ (so common/launch.cuh and <cooperative_groups.h> are the emulator's: every CTA of
// the cooperative launch on an OS thread of its own, grid.sync() a barrier across them).
#include <cstdint>
#include <cstring>
#include <string>

#include "emulator.h"
#include "common/launch.cuh"
#include <cooperative_groups.h>
#include "lstm/lstm.h"

namespace {

// A pretend device: few SMs, so that even small hidden sizes spread over several blocks.
bigkern::DeviceLimits limits_of(int sms) { return {sms, 227 * 1024, true}; }

}  // namespace

extern "C" {

// The plan the binding would make on the pretend device: status, blocks, units per block.
int emulated_lstm_persistent_plan(int dtype, int64_t batch, int64_t hidden, int backward, int sms, int* blocks,
                                  int* units) {
  const bigkern::PersistentPlan plan = bigkern::lstm_persistent_plan(static_cast<bigkern::DType>(dtype), batch, hidden,
                                                                     backward != 0, limits_of(sms));
  *blocks = plan.blocks;
  *units = plan.units_per_block;
  return static_cast<int>(plan.status);
}

int emulated_lstm_persistent_forward(int dtype, int sms, const void* gx, int64_t gx_stride, const void* w_hh,
                                     const float* bias, const void* h0, const void* c0, void* out, float* cells,
                                     float* gates, void* h_n, void* c_n, int64_t steps, int64_t batch, int64_t hidden,
                                     int reverse, unsigned seed, char* error, int error_size) {
  emulation::state().random.seed(seed);
  const auto type = static_cast<bigkern::DType>(dtype);
  const bigkern::PersistentPlan plan = bigkern::lstm_persistent_plan(type, batch, hidden, false, limits_of(sms));
  cudaError_t status = bigkern::lstm_persistent_forward(type, plan, gx, gx_stride, w_hh, bias, h0, c0, out, cells,
                                                        gates, h_n, c_n, steps, batch, hidden, reverse != 0, nullptr);
  return emulation::report(status, error, error_size);
}

int emulated_lstm_persistent_backward(int dtype, int sms, const void* grad_out, const void* grad_h_n,
                                      const void* grad_c_n, const void* w_hh, const float* gates, const float* cells,
                                      const void* c0, void* dz, float* dc, int64_t steps, int64_t batch,
                                      int64_t hidden, int reverse, unsigned seed, char* error, int error_size) {
  emulation::state().random.seed(seed);
  const auto type = static_cast<bigkern::DType>(dtype);
  const bigkern::PersistentPlan plan = bigkern::lstm_persistent_plan(type, batch, hidden, true, limits_of(sms));
  cudaError_t status = bigkern::lstm_persistent_backward(type, plan, grad_out, grad_h_n, grad_c_n, w_hh, gates, cells,
                                                         c0, dz, dc, steps, batch, hidden, reverse != 0, nullptr);
  return emulation::report(status, error, error_size);
}

}  // extern "C"
