// torch bindings of the implicit-GEMM convolution kernels: bigkern::conv2d_{forward,input_grad,
// weight_grad}_cuda. The Python ops (bigkern/ops/conv.py) validate, allocate outputs and call these.
#include <algorithm>

#include "common/torch_binding.h"
#include "conv/conv.h"

namespace bigkern {
namespace {

Strides4 strides_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "bigkern: '", name, "' must be 4-dimensional");
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

int int_of(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= INT32_MAX, "bigkern: ", name, " (", value, ") does not fit the kernels' int32");
  return static_cast<int>(value);
}

ConvGeometry geometry(const at::Tensor& x, at::IntArrayRef weight_size, at::IntArrayRef out_hw, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(weight_size.size() == 4 && out_hw.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "bigkern: conv2d takes a 4-d weight and pairs of stride, padding and dilation");
  // pixel indices (n, p, q) and (n, h, w) are int32 in the kernels; element offsets are int64
  TORCH_CHECK(x.size(0) * std::max<int64_t>(x.size(2) * x.size(3), out_hw[0] * out_hw[1]) < INT32_MAX,
              "bigkern: conv2d with more than 2^31 pixels per batch is not supported");
  return ConvGeometry{int_of(x.size(0), "N"), int_of(x.size(1), "C"), int_of(x.size(2), "H"), int_of(x.size(3), "W"),
                      int_of(weight_size[0], "K"), int_of(weight_size[2], "R"), int_of(weight_size[3], "S"),
                      int_of(out_hw[0], "P"), int_of(out_hw[1], "Q"), int_of(stride[0], "stride"),
                      int_of(stride[1], "stride"), int_of(padding[0], "padding"), int_of(padding[1], "padding"),
                      int_of(dilation[0], "dilation"), int_of(dilation[1], "dilation"), int_of(groups, "groups")};
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), "bigkern: '", name,
              "' must have the dtype and device of 'x'");
}

void conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, at::Tensor& y, const std::optional<at::Tensor>& z,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         int64_t activation, double negative_slope, bool tf32) {
  check_cuda(x, "x");
  check_same(w, x, "w");
  check_same(y, x, "y");
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvGeometry g = geometry(x, w.sizes(), y.sizes().slice(2), stride, padding, dilation, groups);
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_same(*bias, x, "bias");
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == g.K, "bigkern: 'bias' must be contiguous, (K,)");
    bias_ptr = bias->data_ptr();
  }
  Strides4 sr{}, sz{};
  const void* residual_ptr = nullptr;
  void* z_ptr = nullptr;
  if (residual.has_value()) {
    check_same(*residual, x, "residual");
    TORCH_CHECK(residual->sizes() == y.sizes(), "bigkern: 'residual' must have the output's shape");
    sr = strides_of(*residual, "residual");
    residual_ptr = residual->data_ptr();
  }
  if (z.has_value()) {
    check_same(*z, x, "z");
    TORCH_CHECK(z->sizes() == y.sizes(), "bigkern: 'z' must have the output's shape");
    sz = strides_of(*z, "z");
    z_ptr = z->data_ptr();
  }
  check_launch(conv2d_forward(dtype_of(x, "x"), tf32, g, x.data_ptr(), strides_of(x, "x"), w.data_ptr(),
                              strides_of(w, "w"), bias_ptr, residual_ptr, sr, y.data_ptr(), strides_of(y, "y"), z_ptr,
                              sz, static_cast<int>(activation), static_cast<float>(negative_slope), current_stream(x)),
               "conv2d forward");
}

void conv2d_input_grad_cuda(const at::Tensor& grad, const at::Tensor& w, at::Tensor& dx, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool tf32) {
  check_cuda(grad, "grad");
  check_same(w, grad, "w");
  check_same(dx, grad, "dx");
  const c10::cuda::CUDAGuard guard(grad.device());
  const ConvGeometry g = geometry(dx, w.sizes(), grad.sizes().slice(2), stride, padding, dilation, groups);
  check_launch(conv2d_input_grad(dtype_of(grad, "grad"), tf32, g, grad.data_ptr(), strides_of(grad, "grad"),
                                 w.data_ptr(), strides_of(w, "w"), dx.data_ptr(), strides_of(dx, "dx"),
                                 current_stream(grad)),
               "conv2d input gradient");
}

void conv2d_weight_grad_cuda(const at::Tensor& grad, const at::Tensor& x, at::Tensor& partial,
                             at::Tensor& bias_partial, at::IntArrayRef weight_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias_grad,
                             bool tf32) {
  check_cuda(grad, "grad");
  check_same(x, grad, "x");
  check_cuda(partial, "partial");
  const c10::cuda::CUDAGuard guard(grad.device());
  const ConvGeometry g = geometry(x, weight_size, grad.sizes().slice(2), stride, padding, dilation, groups);
  TORCH_CHECK(partial.scalar_type() == at::kFloat && partial.is_contiguous() && partial.dim() == 5 &&
                  partial.size(1) == g.K,
              "bigkern: 'partial' must be a contiguous fp32 (splits, K, C/groups, R, S) tensor");
  const int64_t splits = partial.size(0);
  float* bias_ptr = nullptr;
  if (bias_grad) {
    TORCH_CHECK(bias_partial.scalar_type() == at::kFloat && bias_partial.is_contiguous() &&
                    bias_partial.numel() == splits * g.K,
                "bigkern: 'bias_partial' must be a contiguous fp32 (splits, K) tensor");
    bias_ptr = bias_partial.data_ptr<float>();
  }
  check_launch(conv2d_weight_grad(dtype_of(grad, "grad"), tf32, g, grad.data_ptr(), strides_of(grad, "grad"),
                                  x.data_ptr(), strides_of(x, "x"), partial.data_ptr<float>(), bias_ptr,
                                  int_of(splits, "splits"), current_stream(grad)),
               "conv2d weight gradient");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bigkern, m) {
  m.def("conv2d_forward_cuda(Tensor x, Tensor w, Tensor? bias, Tensor? residual, Tensor(a!) y, Tensor(b!)? z, "
        "int[] stride, int[] padding, int[] dilation, int groups, int activation, float negative_slope, bool tf32) -> ()");
  m.def("conv2d_input_grad_cuda(Tensor grad, Tensor w, Tensor(a!) dx, int[] stride, int[] padding, int[] dilation, "
        "int groups, bool tf32) -> ()");
  m.def("conv2d_weight_grad_cuda(Tensor grad, Tensor x, Tensor(a!) partial, Tensor(b!) bias_partial, "
        "int[] weight_size, int[] stride, int[] padding, int[] dilation, int groups, bool bias_grad, bool tf32) -> ()");
}

TORCH_LIBRARY_IMPL(bigkern, CUDA, m) {
  m.impl("conv2d_forward_cuda", &conv2d_forward_cuda);
  m.impl("conv2d_input_grad_cuda", &conv2d_input_grad_cuda);
  m.impl("conv2d_weight_grad_cuda", &conv2d_weight_grad_cuda);
}

}  // namespace bigkern
