// When the Hopper forward (flash_forward_sm90.cuh) serves a call: a GPU of compute capability 9.0,
// head dim 64 or 128, non-empty sequences, and, until it has been verified on a GPU, only when
// BIGKERN_ATTENTION_SM90=1 (or =only, for tests: then a call it cannot serve fails instead), and
// only in a build for sm_90a (without it the kernel's body is a trap, which kills the context).
// Otherwise, or when TMA cannot describe the operands, it answers cudaErrorNotSupported and the
// sm_80 kernels serve.
#include <cstdlib>
#include <cstring>

#include "attention/attention.h"

namespace bigkern {
namespace attention {
namespace sm90 {

template <int HEAD_DIM>
cudaError_t forward_for_head_dim(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                                 cudaStream_t stream);

}  // namespace sm90

bool sm90_forward_required() {
  const char* flag = std::getenv("BIGKERN_ATTENTION_SM90");
  return flag != nullptr && std::strcmp(flag, "only") == 0;
}

bool sm90_forward_enabled() {
#ifndef BIGKERN_SM90A_BUILT
  return false;  // built without sm_90a (setup.py arch_flags): the Hopper kernel is a trap there
#endif
  const char* flag = std::getenv("BIGKERN_ATTENTION_SM90");
  if (flag == nullptr || (std::strcmp(flag, "1") != 0 && std::strcmp(flag, "only") != 0)) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

cudaError_t forward_sm90(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                         cudaStream_t stream) {
  if (problem.len_q == 0 || problem.len_kv == 0 || !sm90_forward_enabled()) return cudaErrorNotSupported;
  switch (problem.head_dim) {
    case 64: return sm90::forward_for_head_dim<64>(dtype, problem, args, stream);
    case 128: return sm90::forward_for_head_dim<128>(dtype, problem, args, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace attention
}  // namespace bigkern
