// Flash attention forward for Hopper, head dim 64: fp16 and bf16 instances of flash_forward_sm90.cuh.
#include "attention/flash_forward_sm90.cuh"

namespace bigkern {
namespace attention {
namespace sm90 {
template cudaError_t forward_for_head_dim<64>(DType, const AttentionProblem&, const AttentionForwardArgs&,
                                              cudaStream_t);
}  // namespace sm90
}  // namespace attention
}  // namespace bigkern
