// Flash attention backward, head dim 32: fp16 and bf16 instances of flash_backward.cuh.
#include "attention/flash_backward.cuh"

namespace bigkern {
namespace attention {
template cudaError_t backward_for_head_dim<32>(DType, const AttentionProblem&, const AttentionBackwardArgs&,
                                               cudaStream_t);
}  // namespace attention
}  // namespace bigkern
