// C entry points that run bigkern's CUDA flash-attention launchers (csrc/attention/) on the CPU
// through the emulator. tests/test_attention_cuda.py compiles one translation unit that includes
// this file and then the production sources (attention.cu, attention_{forward,backward}_hdim*.cu,
// attention_sm90_forward_hdim*.cu), with include/ ahead of csrc/ on the include path, and calls
// these through ctypes.
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "emulator.h"
// the emulated PTX wrappers and launch, so that every later include of them finds these
#include "common/launch.cuh"
#include "attention/tensor_core.cuh"
#include "attention/tensor_core_sm90.cuh"
#include "attention/attention.h"
// compile the Hopper kernel's sm_90a body (after the CUDA headers, which test this macro too)
#define __CUDA_ARCH_FEAT_SM90_ALL 1
#include "attention/flash_forward_sm90.cuh"

namespace {

// The tensors of one call: data pointers, (batch, head, row) strides in elements, and the bytes a
// tensor spans from its data pointer (for the readable-memory check).
bigkern::AttentionTensor tensor_at(void* const* data, const int64_t* strides, int i) {
  return {data[i], strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
}

void configure(void* const* data, const int64_t* spans, int n_inputs, int deferred, unsigned seed) {
  emulation::State& s = emulation::state();
  s.error.clear();
  s.deferred_copies = deferred != 0;
  s.random.seed(seed);
  s.readable.clear();
  for (int i = 0; i < n_inputs; ++i) {
    const char* begin = static_cast<const char*>(data[i]);
    s.readable.push_back({begin, begin + spans[i]});
  }
}

bigkern::AttentionProblem problem_of(const int64_t* shape, float scale, int causal) {
  return {int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3]), int(shape[4]), int(shape[5]), scale,
          causal != 0};
}

}  // namespace

// The emulator runs the sm_80 kernels only: the Hopper forward always declines.
namespace bigkern {
namespace attention {
cudaError_t forward_sm90(DType, const AttentionProblem&, const AttentionForwardArgs&, cudaStream_t) {
  return cudaErrorNotSupported;
}
bool sm90_forward_required() { return false; }
}  // namespace attention
}  // namespace bigkern

extern "C" {

// shape: B, Hq, Hkv, L, S, D. data/strides: q, k, v, out (strides 3 each), then lse (data only).
// spans: bytes of q, k, v. deferred: run cp.async copies at wait_group (else at issue).
int emulated_attention_forward(int dtype, const int64_t* shape, float scale, int causal, void* const* data,
                               const int64_t* strides, const int64_t* spans, int deferred, unsigned seed,
                               char* error, int error_size) {
  configure(data, spans, 3, deferred, seed);
  const bigkern::AttentionForwardArgs args{tensor_at(data, strides, 0), tensor_at(data, strides, 1),
                                           tensor_at(data, strides, 2), tensor_at(data, strides, 3),
                                           static_cast<float*>(data[4])};
  const cudaError_t status =
      bigkern::attention_forward(static_cast<bigkern::DType>(dtype), problem_of(shape, scale, causal), args, nullptr);
  return emulation::report(status, error, error_size);
}

// The Hopper forward (sm90::forward_for_head_dim), same arguments as emulated_attention_forward.
int emulated_attention_forward_sm90(int dtype, const int64_t* shape, float scale, int causal, void* const* data,
                                    const int64_t* strides, const int64_t* spans, int deferred, unsigned seed,
                                    char* error, int error_size) {
  configure(data, spans, 3, deferred, seed);
  const bigkern::AttentionForwardArgs args{tensor_at(data, strides, 0), tensor_at(data, strides, 1),
                                           tensor_at(data, strides, 2), tensor_at(data, strides, 3),
                                           static_cast<float*>(data[4])};
  const bigkern::AttentionProblem problem = problem_of(shape, scale, causal);
  const bigkern::DType type = static_cast<bigkern::DType>(dtype);
  cudaError_t status = cudaErrorInvalidValue;
  if (problem.head_dim == 64) status = bigkern::attention::sm90::forward_for_head_dim<64>(type, problem, args, nullptr);
  if (problem.head_dim == 128)
    status = bigkern::attention::sm90::forward_for_head_dim<128>(type, problem, args, nullptr);
  return emulation::report(status, error, error_size);
}

// data/strides: grad_out, q, k, v, out, dq, dk, dv (strides 3 each), then lse (data only).
// spans: bytes of grad_out, q, k, v, out.
int emulated_attention_backward(int dtype, const int64_t* shape, float scale, int causal, void* const* data,
                                const int64_t* strides, const int64_t* spans, int deferred, unsigned seed,
                                char* error, int error_size) {
  configure(data, spans, 5, deferred, seed);
  std::vector<float> delta(size_t(shape[0]) * shape[1] * shape[3] + 1);
  const bigkern::AttentionBackwardArgs args{
      tensor_at(data, strides, 0), tensor_at(data, strides, 1), tensor_at(data, strides, 2),
      tensor_at(data, strides, 3), tensor_at(data, strides, 4), static_cast<const float*>(data[8]),
      tensor_at(data, strides, 5), tensor_at(data, strides, 6), tensor_at(data, strides, 7), delta.data()};
  const cudaError_t status =
      bigkern::attention_backward(static_cast<bigkern::DType>(dtype), problem_of(shape, scale, causal), args, nullptr);
  return emulation::report(status, error, error_size);
}

int emulated_attention_head_dim_supported(int head_dim) { return bigkern::attention_head_dim_supported(head_dim); }

// The most dynamic shared memory a launch asked for since the last call (which resets it).
size_t emulated_largest_shared_launch() { return std::exchange(emulation::largest_shared_launch, size_t(0)); }

}  // extern "C"
