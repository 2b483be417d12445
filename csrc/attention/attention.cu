// Flash attention: the head-dim dispatch, and the small kernel the backward starts with
// (delta = rowsum(grad_out * out)). The kernels themselves are in flash_forward.cuh and
// flash_backward.cuh, instantiated per head dim in attention_{forward,backward}_hdim*.cu; the
// Hopper forward (flash_forward_sm90.cuh) is tried first and declines what it does not serve.
#include "attention/attention.h"
#include "attention/flash_tiles.cuh"

namespace bigkern {
namespace attention {

// Defined (explicitly instantiated) in attention_{forward,backward}_hdim<D>.cu.
template <int HEAD_DIM>
cudaError_t forward_for_head_dim(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                                 cudaStream_t stream);
template <int HEAD_DIM>
cudaError_t backward_for_head_dim(DType dtype, const AttentionProblem& problem, const AttentionBackwardArgs& args,
                                  cudaStream_t stream);
// The Hopper forward (attention_sm90.cu): cudaErrorNotSupported when it does not serve the call;
// sm90_forward_required() when BIGKERN_ATTENTION_SM90=only asks it to serve every call (tests).
cudaError_t forward_sm90(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                         cudaStream_t stream);
bool sm90_forward_required();

namespace {

constexpr int kDeltaWarps = 8;

// delta[b, h, i] = sum_d grad_out[b, h, i, d] * out[b, h, i, d] in fp32: one warp per row.
template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32)
attention_delta_kernel(const AttentionProblem problem, const AttentionTensor grad_out, const AttentionTensor out,
                       float* delta) {
  const int64_t row = int64_t(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
  const int64_t rows = int64_t(problem.batch) * problem.heads_q * problem.len_q;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int i = static_cast<int>(row % problem.len_q);
  const int head = static_cast<int>((row / problem.len_q) % problem.heads_q);
  const int batch = static_cast<int>(row / (int64_t(problem.len_q) * problem.heads_q));
  const T* g = head_pointer<T>(grad_out, batch, head) + i * grad_out.row_stride;
  const T* o = head_pointer<T>(out, batch, head) + i * out.row_stride;
  float sum = 0.f;
  for (int d = lane; d < problem.head_dim; d += 32) sum += to_float(g[d]) * to_float(o[d]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) delta[row] = sum;
}

}  // namespace
}  // namespace attention

bool attention_head_dim_supported(int head_dim) {
  switch (head_dim) {
    case 32: case 64: case 96: case 128: case 256: return true;
    default: return false;
  }
}

cudaError_t attention_forward(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                              cudaStream_t stream) {
  const cudaError_t hopper = attention::forward_sm90(dtype, problem, args, stream);
  if (hopper != cudaErrorNotSupported || attention::sm90_forward_required()) return hopper;
  switch (problem.head_dim) {
    case 32: return attention::forward_for_head_dim<32>(dtype, problem, args, stream);
    case 64: return attention::forward_for_head_dim<64>(dtype, problem, args, stream);
    case 96: return attention::forward_for_head_dim<96>(dtype, problem, args, stream);
    case 128: return attention::forward_for_head_dim<128>(dtype, problem, args, stream);
    case 256: return attention::forward_for_head_dim<256>(dtype, problem, args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_backward(DType dtype, const AttentionProblem& problem, const AttentionBackwardArgs& args,
                               cudaStream_t stream) {
  if (!attention_head_dim_supported(problem.head_dim)) return cudaErrorInvalidValue;
  const int64_t rows = int64_t(problem.batch) * problem.heads_q * problem.len_q;
  if (rows > 0) {
    cudaError_t error = cudaErrorInvalidValue;
    attention::dispatch_half_types(dtype, [&](auto element) {
      using T = decltype(element);
      const dim3 grid(static_cast<unsigned>((rows + attention::kDeltaWarps - 1) / attention::kDeltaWarps));
      error = bigkern::launch(attention::attention_delta_kernel<T>, grid, attention::kDeltaWarps * 32, 0, stream,
                                problem, args.grad_out, args.out, args.delta);
    });
    if (error != cudaSuccess) return error;
  }
  switch (problem.head_dim) {
    case 32: return attention::backward_for_head_dim<32>(dtype, problem, args, stream);
    case 64: return attention::backward_for_head_dim<64>(dtype, problem, args, stream);
    case 96: return attention::backward_for_head_dim<96>(dtype, problem, args, stream);
    case 128: return attention::backward_for_head_dim<128>(dtype, problem, args, stream);
    case 256: return attention::backward_for_head_dim<256>(dtype, problem, args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace bigkern
