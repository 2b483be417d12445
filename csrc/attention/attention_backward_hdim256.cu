// Flash attention backward, head dim 256: fp16 and bf16 instances of flash_backward.cuh.
#include "attention/flash_backward.cuh"

namespace bigkern {
namespace attention {
template cudaError_t backward_for_head_dim<256>(DType, const AttentionProblem&, const AttentionBackwardArgs&,
                                               cudaStream_t);
}  // namespace attention
}  // namespace bigkern
