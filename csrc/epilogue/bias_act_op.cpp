// torch bindings of the fused bias + activation kernels: bigkern::bias_act_{forward,backward}_cuda.
// The Python op bigkern::bias_act (bigkern/ops/epilogue.py) allocates outputs and calls these.
#include <ATen/ops/empty.h>

#include "common/torch_binding.h"
#include "epilogue/bias_act.h"

namespace bigkern {
namespace {

void bias_act_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, at::Tensor& y,
                           int64_t activation, int64_t channel_stride, int64_t channels, double negative_slope) {
  check_cuda(x, "x");
  check_cuda(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.strides() == x.strides() && y.dtype() == x.dtype(),
              "bigkern: 'y' must have the shape, strides and dtype of 'x'");
  const c10::cuda::CUDAGuard guard(x.device());
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_cuda(*bias, "bias");
    TORCH_CHECK(bias->is_contiguous() && bias->dtype() == x.dtype(), "bigkern: 'bias' must be contiguous, of x's dtype");
    bias_ptr = bias->data_ptr();
  }
  check_launch(bias_act_forward(dtype_of(x, "x"), x.data_ptr(), bias_ptr, y.data_ptr(), x.numel(), channel_stride,
                                channels, static_cast<int>(activation), static_cast<float>(negative_slope),
                                current_stream(x)),
               "bias_act forward");
}

at::Tensor bias_act_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                  at::Tensor& grad_x, int64_t n_rows, int64_t n_cols, int64_t channels,
                                  bool channel_in_rows, int64_t activation, double negative_slope) {
  check_cuda(grad_y, "grad_y");
  check_cuda(x, "x");
  TORCH_CHECK(grad_y.strides() == x.strides() && grad_x.strides() == x.strides(),
              "bigkern: 'grad_y' and 'grad_x' must have the strides of 'x'");
  const c10::cuda::CUDAGuard guard(x.device());
  const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  const int64_t partial_rows = bias_act_backward_row_programs(n_rows, n_cols, channel_in_rows);
  at::Tensor partial = at::empty({channel_in_rows ? partial_rows : partial_rows * n_cols},
                                 x.options().dtype(at::kFloat));
  check_launch(bias_act_backward(dtype_of(x, "x"), grad_y.data_ptr(), x.data_ptr(), bias_ptr, grad_x.data_ptr(),
                                 partial.data_ptr<float>(), x.numel(), n_rows, n_cols, channels, channel_in_rows,
                                 static_cast<int>(activation), static_cast<float>(negative_slope),
                                 current_stream(x)),
               "bias_act backward");
  return partial;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bigkern, m) {
  m.def("bias_act_forward_cuda(Tensor x, Tensor? bias, Tensor(a!) y, int activation, int channel_stride, "
        "int channels, float negative_slope) -> ()");
  m.def("bias_act_backward_cuda(Tensor grad_y, Tensor x, Tensor? bias, Tensor(a!) grad_x, int n_rows, int n_cols, "
        "int channels, bool channel_in_rows, int activation, float negative_slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(bigkern, CUDA, m) {
  m.impl("bias_act_forward_cuda", &bias_act_forward_cuda);
  m.impl("bias_act_backward_cuda", &bias_act_backward_cuda);
}

}  // namespace bigkern
