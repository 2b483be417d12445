// torch bindings of the flash-attention kernels: bigkern::attention_{forward,backward}_cuda.
// The Python layer (bigkern/ops/attention_cuda.py) normalizes every call to q (B, Hq, L, D),
// k and v (B, Hkv, S, D) with a contiguous last dimension, allocates the outputs and calls these.
#include <ATen/ops/empty.h>

#include "attention/attention.h"
#include "common/torch_binding.h"

namespace bigkern {
namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 4, "bigkern: attention argument '", name, "' must be 4-d (batch, heads, seq, head_dim), got ",
              t.dim(), "-d");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "bigkern: attention argument '", name, "' must have q's dtype (",
              q.scalar_type(), "), not ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "bigkern: attention argument '", name, "' must be on q's device");
  // the kernels move 16-byte chunks: aligned base, strides in whole chunks, contiguous rows
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "bigkern: attention argument '", name,
              "' must have a contiguous last dimension");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "bigkern: attention argument '", name,
              "' must be 16-byte aligned");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) % 8 == 0, "bigkern: attention argument '", name,
                "' must have strides that are multiples of 8 elements, got stride ", t.stride(d), " in dim ", d);
  }
}

AttentionTensor view(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

AttentionProblem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            bool is_causal) {
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "bigkern: the CUDA attention kernels take float16 or bfloat16, not ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "bigkern: attention arguments 'k' and 'v' must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "bigkern: attention argument 'k' must match q's batch and head_dim, got ", k.sizes(), " for q ",
              q.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "bigkern: attention needs q's heads to be a multiple of k's heads, got ", q.size(1), " and ", k.size(1));
  TORCH_CHECK(attention_head_dim_supported(static_cast<int>(q.size(3))),
              "bigkern: the CUDA attention kernels are not compiled for head_dim ", q.size(3));
  for (const auto* t : {&q, &k}) {
    for (int d = 0; d < 3; ++d) {
      TORCH_CHECK(t->size(d) < (int64_t(1) << 31), "bigkern: attention sizes must fit in 32 bits");
    }
  }
  return {static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
          static_cast<int>(q.size(2)), static_cast<int>(k.size(2)), static_cast<int>(q.size(3)),
          static_cast<float>(scale), is_causal};
}

void check_output(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                  const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == shape, "bigkern: attention output '", name, "' must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "bigkern: attention output '", name, "' must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "bigkern: attention output '", name, "' must be on q's device");
}

void attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                            at::Tensor& lse, double scale, bool is_causal) {
  const AttentionProblem problem = problem_of(q, k, v, scale, is_causal);
  check_output(out, "out", q.sizes(), q.scalar_type(), q);
  check_operand(out, "out", q);
  check_output(lse, "lse", q.sizes().slice(0, 3), at::kFloat, q);
  TORCH_CHECK(lse.is_contiguous(), "bigkern: attention output 'lse' must be contiguous");
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionForwardArgs args{view(q), view(k), view(v), view(out), lse.data_ptr<float>()};
  check_launch(attention_forward(dtype_of(q, "q"), problem, args, current_stream(q)), "attention forward");
}

void attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                             at::Tensor& dk, at::Tensor& dv, double scale, bool is_causal) {
  const AttentionProblem problem = problem_of(q, k, v, scale, is_causal);
  check_output(grad_out, "grad_out", q.sizes(), q.scalar_type(), q);
  check_operand(grad_out, "grad_out", q);
  check_output(out, "out", q.sizes(), q.scalar_type(), q);
  check_operand(out, "out", q);
  check_output(lse, "lse", q.sizes().slice(0, 3), at::kFloat, q);
  TORCH_CHECK(lse.is_contiguous(), "bigkern: attention argument 'lse' must be contiguous");
  check_output(dq, "dq", q.sizes(), q.scalar_type(), q);
  check_operand(dq, "dq", q);
  check_output(dk, "dk", k.sizes(), q.scalar_type(), q);
  check_operand(dk, "dk", q);
  check_output(dv, "dv", v.sizes(), q.scalar_type(), q);
  check_operand(dv, "dv", q);
  if (q.numel() == 0 && k.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const AttentionBackwardArgs args{view(grad_out), view(q),  view(k),  view(v),  view(out), lse.data_ptr<float>(),
                                   view(dq),       view(dk), view(dv), delta.data_ptr<float>()};
  check_launch(attention_backward(dtype_of(q, "q"), problem, args, current_stream(q)), "attention backward");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bigkern, m) {
  m.def("attention_forward_cuda(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, float scale, "
        "bool is_causal) -> ()");
  m.def("attention_backward_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, float scale, bool is_causal) -> ()");
}

TORCH_LIBRARY_IMPL(bigkern, CUDA, m) {
  m.impl("attention_forward_cuda", &attention_forward_cuda);
  m.impl("attention_backward_cuda", &attention_backward_cuda);
}

}  // namespace bigkern
