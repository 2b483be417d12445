// Launchers for the flash-attention kernels (attention_*.cu). Plain pointers and sizes only, so the
// torch binding (attention_op.cpp) and the kernels compile separately.
//
// Layout: q (B, Hq, L, D), k and v (B, Hkv, S, D), each with its own batch/head/row strides (the
// last dimension is contiguous); query head h reads kv head h / (Hq / Hkv). Every pointer is 16-byte
// aligned and every stride a multiple of 8 elements (the kernels move 16 bytes at a time).
// out (B, Hq, L, D) in q's dtype; lse (B, Hq, L) fp32, contiguous: the natural-log logsumexp of the
// scaled scores of each query row (-inf, with out = 0, for a row that sees no key).
// Causal masking is torch's top-left alignment: query i sees key j iff j <= i (also when L != S).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"

namespace bigkern {

struct AttentionTensor {
  void* data;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t row_stride;
};

struct AttentionProblem {
  int batch;
  int heads_q;
  int heads_kv;
  int len_q;   // L
  int len_kv;  // S
  int head_dim;
  float scale;  // applied to q k^T before the softmax
  bool causal;
};

struct AttentionForwardArgs {
  AttentionTensor q, k, v, out;
  float* lse;
};

struct AttentionBackwardArgs {
  AttentionTensor grad_out, q, k, v, out;
  const float* lse;
  AttentionTensor dq, dk, dv;  // dk, dv: (B, Hkv, S, D), summed over each kv head's query heads
  float* delta;                // scratch (B, Hq, L) fp32: rowsum(grad_out * out)
};

// Head dims the kernels are compiled for (a multiple of 16).
bool attention_head_dim_supported(int head_dim);

// fp16 and bf16 only; returns the first launch error (cudaErrorInvalidValue for an unsupported
// dtype or head dim, cudaErrorInvalidConfiguration for a grid beyond the hardware's limits).
cudaError_t attention_forward(DType dtype, const AttentionProblem& problem, const AttentionForwardArgs& args,
                              cudaStream_t stream);

// Deterministic: dq from one kernel per query block, dk and dv from one kernel per key block that
// walks every query head of its kv head. No atomics.
cudaError_t attention_backward(DType dtype, const AttentionProblem& problem, const AttentionBackwardArgs& args,
                               cudaStream_t stream);

}  // namespace bigkern
