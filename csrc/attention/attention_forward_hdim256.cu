// Flash attention forward, head dim 256: fp16 and bf16 instances of flash_forward.cuh.
#include "attention/flash_forward.cuh"

namespace bigkern {
namespace attention {
template cudaError_t forward_for_head_dim<256>(DType, const AttentionProblem&, const AttentionForwardArgs&, cudaStream_t);
}  // namespace attention
}  // namespace bigkern
