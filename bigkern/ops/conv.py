"""conv2d with a fused epilogue: y = act(conv2d(x, w) + bias + residual), forward and backward.

Registered ops (torch.library, with fake implementations and autograd), each dispatching at run
time to the Triton kernels (kernels/conv.py), the CUDA kernels (csrc/conv/) or a pure-PyTorch
reference:

  bigkern::conv2d(input, weight, bias?, residual?, stride, padding, dilation, groups, activation,
                  negative_slope, save_z) -> (y, z)
  bigkern::conv2d_input_grad(grad_z, input, weight, stride, padding, dilation, groups) -> grad_input
  bigkern::conv2d_weight_grad(grad_z, input, weight, stride, padding, dilation, groups, bias_grad)
                  -> (grad_weight, grad_bias)

`padding` in the ops is (top, left, bottom, right): padding='same' with an even kernel pads one
more at the end, as torch does, and the kernels need only the top/left offsets (the far side is a
mask). `residual` arrives already broadcast to the output's shape (stride 0 where it was 1), so
autograd's expand reduces its gradient.

Backward through the activation needs z = conv + bias + residual. The forward kernel writes z as a
second output when a gradient will be needed and the activation is not the identity: one extra
store of the output's size from registers, where recomputing would cost a whole second
convolution. z is stored as the activation saw it, bias included: rounded to fp16/bf16 it stays on
the side of relu's kink the output came from (z without the bias, rounded, plus the bias could
cross it). `bigkern::bias_act_backward` (the shared epilogue, given a zero bias) then turns grad_y
and z into grad_z = grad_y * act'(z) and grad_bias in one pass; grad_residual is
grad_z. With no activation grad_z is grad_y itself, and grad_bias rides along in the weight-gradient
kernel. (If z was not saved -- a backward the forward did not expect -- it is recomputed.)
"""

import math
from typing import Optional

import torch
from torch import Tensor

from bigkern import amp, dispatch, memory
from bigkern.ops.checks import as_int, check_negative_slope, check_same_device, check_tensor, type_name
from bigkern.ops import epilogue
from bigkern.ops.epilogue import activation_code, torch_activation

# ---------------------------------------------------------------------------------------------
# Geometry and memory formats.


def output_size(in_hw, kernel_hw, stride, padding, dilation):
    """(P, Q) for an input (H, W), a kernel (R, S) and padding (top, left, bottom, right)."""
    return tuple((in_hw[i] + padding[i] + padding[i + 2] - dilation[i] * (kernel_hw[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def _strides_like_channels_last(sizes, strides) -> bool:
    """torch's own test (suggest_memory_format) for NHWC-ordered strides of a 4-d tensor: walk the
    dimensions C, W, H, N and require non-decreasing strides; ambiguous cases are NCHW."""
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:  # N111 and sliced N11W tensors stay NCHW
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def suggests_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.layout == torch.strided and _strides_like_channels_last(t.shape, t.stride())


def output_channels_last(input: Tensor, weight: Tensor) -> bool:
    """torch's rule for a convolution's output (and gradients): channels_last when the input or the
    weight suggests it (cuDNN on GPUs, oneDNN and the fallback on CPUs agree)."""
    return suggests_channels_last(input) or suggests_channels_last(weight)


def same_storage_order(a: Tensor, b: Tensor) -> bool:
    """Whether a and b lay out their elements alike: equal strides wherever the size is not 1
    (a size-1 dimension's stride never addresses anything)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def dense_strides(shape, channels_last: bool):
    N, C, H, W = shape
    if channels_last:
        return (H * W * C, 1, W * C, C) if C else (H * W, 1, W, 1)
    return (C * H * W, H * W, W, 1)


def _empty(shape, channels_last, like):
    shape = tuple(int(s) for s in shape)
    return memory.empty_strided(shape, dense_strides(shape, channels_last), dtype=like.dtype, device=like.device)


def _conv_output_shape(input, weight, stride, padding, dilation):
    return (input.shape[0], weight.shape[0]) + output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)


def _dot_precision(x: Tensor) -> str:
    """torch's TF32 policy for convolutions: fp32 on a GPU may use TF32 when cuDNN may."""
    if x.dtype == torch.float32 and x.is_cuda and amp.tf32_allowed("conv"):
        return "tf32"
    return "ieee"


def _channels_innermost(t: Tensor) -> Tensor:
    """On a GPU the kernels read every operand tile along channels, so they take NHWC (for a
    weight, (K, R, S, C)) storage: a tensor whose channels are not innermost is copied to it first
    (one pass over it, against tiles of scattered 2-byte reads). On the CPU (the interpreter, where
    the tests run every layout through the strided addressing) tensors are taken as they are."""
    if t.is_cuda and t.dim() == 4 and t.stride(1) != 1 and t.shape[1] > 1:
        return t.contiguous(memory_format=torch.channels_last)
    return t


# ---------------------------------------------------------------------------------------------
# The pure-PyTorch reference.

def torch_conv(x, w, stride, padding, dilation, groups, bias=None):
    """torch's conv2d with (top, left, bottom, right) padding."""
    top, left, bottom, right = padding
    if (top, left) != (bottom, right):
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        top = left = 0
    # torch.conv2d is F.conv2d itself, and what bigkern.enable() leaves in place (F.conv2d is
    # bigkern's inside its block: calling that from here would recurse)
    return torch.conv2d(x, w, bias, stride, (top, left), dilation, groups)


def _channel_view(bias):
    return bias.view(1, -1, 1, 1)


def _always(*args):
    return None


def _kernel_dtype_reason(*tensors):
    for t in tensors:
        if isinstance(t, Tensor) and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"the kernels take float16, bfloat16 or float32, not {t.dtype}"
    return None


def _triton_unsupported(*args):
    tensors = [a for a in args if isinstance(a, Tensor)]
    return (dispatch.triton_unsupported(*tensors) or dispatch.triton_dot_unsupported(*tensors)
            or _kernel_dtype_reason(*tensors) or _triton_size_reason(tensors))


# The Triton kernels compute element offsets within a tensor, and pixel indices, in int32 (as the
# CUDA binding's check says for its pixel indices); they put groups (times the strides' phases, for
# dgrad) along a grid dimension of at most 65535 programs (dispatch.grid_reason).
TRITON_MAX_SPAN = 2**31 - 1


def _span(t: Tensor) -> int:
    """How many elements lie between a tensor's first and last element, both included."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _triton_size_reason(tensors, output_shape=None):
    spans = [_span(t) for t in tensors] + ([math.prod(output_shape)] if output_shape is not None else [])
    if max(spans, default=0) > TRITON_MAX_SPAN:
        return (f"a tensor spanning {max(spans)} elements: the Triton kernels index within a tensor in 32 bits "
                f"(up to 2^31 - 1)")
    return None


def _triton_forward_unsupported(input, weight, bias, residual, stride, padding, dilation, groups, *rest):
    return (_triton_unsupported(input, weight, bias, residual)
            or _triton_size_reason([], _conv_output_shape(input, weight, stride, padding, dilation))
            or (dispatch.grid_reason(groups, "groups") if weight.shape[1] > 1 else None))


def _triton_input_grad_unsupported(grad, input, weight, stride, padding, dilation, groups):
    return (_triton_unsupported(grad, input, weight)
            or dispatch.grid_reason(groups * stride[0] * stride[1], "groups x stride phases"))


def _triton_weight_grad_unsupported(grad, input, weight, stride, padding, dilation, groups, bias_grad):
    return _triton_unsupported(grad, input, weight) or dispatch.grid_reason(groups, "groups")


CUDA_KERNELS = dispatch.CompiledKernels()  # conv2d_forward, conv2d_input_grad, conv2d_weight_grad


def _cuda_unsupported(*args):
    tensors = [a for a in args if isinstance(a, Tensor)]
    return CUDA_KERNELS.unsupported(tensors) or _kernel_dtype_reason(*tensors)


def _nothing(like):
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# Forward.

def forward_splits(n_pixels, k_per_group, groups, reduction, device):
    """How many ways the forward's reduction is split: only when there are too few output tiles
    (of 64 x 64) to fill the GPU -- batch-1 layers, the last ResNet stages -- and the reduction is
    long enough (>= 4 blocks of 64 per split). In the interpreter, two for small outputs with a
    reduction of some length, so the tests cover the split path and its epilogue."""
    if device.type != "cuda":
        return 2 if n_pixels <= 64 and reduction >= 32 else 1
    tiles = -(-n_pixels // 64) * -(-k_per_group // 64) * groups
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if tiles >= sms:
        return 1
    return max(1, min(-(-sms // tiles), reduction // 256, 32))

CONV2D = dispatch.Op("conv2d")


def _forward_outputs(input, weight, stride, padding, dilation, save_z):
    """(output shape, y, z or None): y and the pre-activation z in the layout torch would give."""
    channels_last = output_channels_last(input, weight)
    shape = _conv_output_shape(input, weight, stride, padding, dilation)
    y = _empty(shape, channels_last, input)
    return shape, y, (_empty(shape, channels_last, input) if save_z else None)


@CONV2D.register("triton", _triton_forward_unsupported)
def _conv2d_triton(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope,
                   save_z):
    from bigkern.kernels import conv as kernels

    shape, y, z = _forward_outputs(input, weight, stride, padding, dilation, save_z)
    if y.numel():
        x, w = _channels_innermost(input), _channels_innermost(weight)
        K, C_g, R, S = weight.shape
        splits = forward_splits(shape[0] * shape[2] * shape[3], K // groups, groups, C_g * R * S, input.device)
        kernels.conv2d_forward(x, w, None if bias is None else bias.contiguous(), residual, y, z, stride, padding,
                               dilation, groups, activation, negative_slope, _dot_precision(input), splits,
                               lambda shape: memory.empty(shape, dtype=torch.float32, device=input.device))
    return y, (z if save_z else _nothing(input))


@CONV2D.register("cuda", _cuda_unsupported, auto=False)
def _conv2d_cuda(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope,
                 save_z):
    shape, y, z = _forward_outputs(input, weight, stride, padding, dilation, save_z)
    if y.numel():
        x, w = _channels_innermost(input), _channels_innermost(weight)
        CUDA_KERNELS.conv2d_forward(
            x, w, None if bias is None else bias.contiguous(), residual, y, z, list(stride), list(padding[:2]),
            list(dilation), groups, activation, negative_slope, _dot_precision(input) == "tf32")
    return y, (z if save_z else _nothing(input))


@CONV2D.register("torch", _always)
def _conv2d_torch(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope,
                  save_z):
    channels_last = output_channels_last(input, weight)
    conv = torch_conv(input, weight, stride, padding, dilation, groups, bias)  # the bias added as torch adds it
    z = conv if residual is None else conv + residual
    y = torch_activation(z, activation, negative_slope)
    y_out = _empty(y.shape, channels_last, input).copy_(y)
    return y_out, (_empty(z.shape, channels_last, input).copy_(z) if save_z else _nothing(input))


# ---------------------------------------------------------------------------------------------
# Input gradient (dgrad).

CONV2D_INPUT_GRAD = dispatch.Op("conv2d_input_grad")


@CONV2D_INPUT_GRAD.register("triton", _triton_input_grad_unsupported)
def _input_grad_triton(grad, input, weight, stride, padding, dilation, groups):
    from bigkern.kernels import conv as kernels

    dx = _empty(input.shape, output_channels_last(input, weight), input)
    if dx.numel():
        g, w = _channels_innermost(grad), _channels_innermost(weight)
        kernels.conv2d_input_grad(g, w, dx, stride, padding, dilation, groups, _dot_precision(input))
    return dx


@CONV2D_INPUT_GRAD.register("cuda", _cuda_unsupported, auto=False)
def _input_grad_cuda(grad, input, weight, stride, padding, dilation, groups):
    dx = _empty(input.shape, output_channels_last(input, weight), input)
    if dx.numel():
        g, w = _channels_innermost(grad), _channels_innermost(weight)
        CUDA_KERNELS.conv2d_input_grad(g, w, dx, list(stride), list(padding[:2]), list(dilation), groups,
                                       _dot_precision(input) == "tf32")
    return dx


@CONV2D_INPUT_GRAD.register("torch", _always)
def _input_grad_torch(grad, input, weight, stride, padding, dilation, groups):
    top, left, bottom, right = padding
    N, C, H, W = input.shape
    padded = (N, C, H + top + bottom, W + left + right)
    dx = torch.ops.aten.convolution_backward(
        grad, input.new_empty(padded), weight, None, list(stride), [0, 0], list(dilation), False, [0, 0], groups,
        [True, False, False])[0]
    dx = dx[:, :, top:top + H, left:left + W]
    return _empty(input.shape, output_channels_last(input, weight), input).copy_(dx)


# ---------------------------------------------------------------------------------------------
# Weight gradient (wgrad), and grad_bias when asked.

CONV2D_WEIGHT_GRAD = dispatch.Op("conv2d_weight_grad")


def wgrad_splits(n_pixels, tiles, device):
    """How many slices the N*P*Q reduction of the weight gradient is split into: enough programs to
    fill the GPU a few times over, each reducing at least a few hundred pixels. In the interpreter,
    two (when there are pixels enough), so the tests cover the sum of partials."""
    if device.type != "cuda":
        return 2 if n_pixels >= 32 else 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-programs // max(tiles, 1)), n_pixels // 512, 64))


def _weight_grad_outputs(grad, input, weight, bias_grad):
    """(grad_w, grad_b, pixels reduced over); with nothing to reduce over, both gradients are zero."""
    grad_w = memory.empty_strided(tuple(weight.shape), dense_strides(weight.shape, output_channels_last(input, weight)),
                                  dtype=weight.dtype, device=weight.device)
    grad_b = memory.empty((weight.shape[0] if bias_grad else 0,), dtype=weight.dtype, device=weight.device)
    n_pixels = grad.shape[0] * grad.shape[2] * grad.shape[3]
    if n_pixels == 0 or input.shape[1] == 0:
        grad_w.zero_()
        grad_b.zero_()
    return grad_w, grad_b, n_pixels * input.shape[1]


def _reduce_partials(partial, out):
    return out.copy_(partial[0] if partial.shape[0] == 1 else partial.sum(0))


def _weight_grad_from_partials(grad, input, weight, groups, bias_grad, tile, partials):
    """grad_w and grad_b from a backend's fp32 partial sums over slices of the N*P*Q pixels:
    `partials(grad, input, splits)` -> (partial (splits, K, C_g, R, S), bias_partial (splits, K));
    `tile`, the backend's tile edge, sizes the split."""
    grad_w, grad_b, work = _weight_grad_outputs(grad, input, weight, bias_grad)
    if work == 0:
        return grad_w, grad_b
    n_pixels = grad.shape[0] * grad.shape[2] * grad.shape[3]
    K, C_g, R, S = weight.shape
    tiles = -(-K // groups // tile) * -(-C_g // tile) * R * S * groups
    partial, bias_partial = partials(_channels_innermost(grad), _channels_innermost(input),
                                     wgrad_splits(n_pixels, tiles, input.device))
    _reduce_partials(partial, grad_w)
    if bias_grad:
        _reduce_partials(bias_partial, grad_b)
    return grad_w, grad_b


@CONV2D_WEIGHT_GRAD.register("triton", _triton_weight_grad_unsupported)
def _weight_grad_triton(grad, input, weight, stride, padding, dilation, groups, bias_grad):
    from bigkern.kernels import conv as kernels

    def partials(g, x, splits):
        return kernels.conv2d_weight_grad_partials(
            g, x, tuple(weight.shape), stride, padding, dilation, groups, splits, bias_grad, _dot_precision(input),
            lambda shape: memory.empty(shape, dtype=torch.float32, device=input.device))
    return _weight_grad_from_partials(grad, input, weight, groups, bias_grad, 128, partials)


@CONV2D_WEIGHT_GRAD.register("cuda", _cuda_unsupported, auto=False)
def _weight_grad_cuda(grad, input, weight, stride, padding, dilation, groups, bias_grad):
    def partials(g, x, splits):
        K, C_g, R, S = weight.shape
        partial = memory.empty((splits, K, C_g, R, S), dtype=torch.float32, device=input.device)
        bias_partial = memory.empty((splits, K if bias_grad else 0), dtype=torch.float32, device=input.device)
        CUDA_KERNELS.conv2d_weight_grad(g, x, partial, bias_partial, list(weight.shape), list(stride),
                                        list(padding[:2]), list(dilation), groups, bias_grad,
                                        _dot_precision(input) == "tf32")
        return partial, bias_partial
    return _weight_grad_from_partials(grad, input, weight, groups, bias_grad, 64, partials)


@CONV2D_WEIGHT_GRAD.register("torch", _always)
def _weight_grad_torch(grad, input, weight, stride, padding, dilation, groups, bias_grad):
    top, left, bottom, right = padding
    padded = torch.nn.functional.pad(input, (left, right, top, bottom)) if any(padding) else input
    grad_w_t = torch.ops.aten.convolution_backward(
        grad, padded, weight, None, list(stride), [0, 0], list(dilation), False, [0, 0], groups,
        [False, True, False])[1]
    grad_w, grad_b, _ = _weight_grad_outputs(grad, input, weight, bias_grad)
    grad_w.copy_(grad_w_t)
    if bias_grad:
        grad_b.copy_(grad.sum((0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32)))  # fp64 stays fp64
    return grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# Registered ops: what torch.compile, torch.export and autograd see.

@torch.library.custom_op("bigkern::conv2d", mutates_args=())
def conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: list[int],
              padding: list[int], dilation: list[int], groups: int, activation: int, negative_slope: float,
              save_z: bool) -> tuple[Tensor, Tensor]:
    return CONV2D(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope,
                  save_z)


@conv2d_op.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope, save_z):
    shape = _conv_output_shape(input, weight, stride, padding, dilation)
    strides = dense_strides(shape, output_channels_last(input, weight))
    y = input.new_empty_strided(shape, strides)
    return y, (input.new_empty_strided(shape, strides) if save_z else input.new_empty((0,)))


@torch.library.custom_op("bigkern::conv2d_input_grad", mutates_args=())
def conv2d_input_grad_op(grad: Tensor, input: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                         dilation: list[int], groups: int) -> Tensor:
    return CONV2D_INPUT_GRAD(grad, input, weight, stride, padding, dilation, groups)


@conv2d_input_grad_op.register_fake
def _(grad, input, weight, stride, padding, dilation, groups):
    return input.new_empty_strided(input.shape, dense_strides(input.shape, output_channels_last(input, weight)))


@torch.library.custom_op("bigkern::conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad_op(grad: Tensor, input: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                          dilation: list[int], groups: int, bias_grad: bool) -> tuple[Tensor, Tensor]:
    return CONV2D_WEIGHT_GRAD(grad, input, weight, stride, padding, dilation, groups, bias_grad)


@conv2d_weight_grad_op.register_fake
def _(grad, input, weight, stride, padding, dilation, groups, bias_grad):
    grad_w = weight.new_empty_strided(weight.shape, dense_strides(weight.shape, output_channels_last(input, weight)))
    return grad_w, weight.new_empty((weight.shape[0] if bias_grad else 0,))


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope, save_z = inputs
    z = output[1]
    saved_z = activation != 0 and z.numel() == output[0].numel()
    # torch's conv and `+` keep neither the bias nor the residual, so changing them in place before
    # backward is fine there: keep them only where backward recomputes z (no z saved: a graph traced
    # without grad), else just their shapes -- their gradients never depend on their values
    recompute = activation != 0 and not saved_z
    ctx.save_for_backward(input, weight, bias if recompute else None, z if saved_z else None,
                          residual if recompute else None)
    ctx.like = {name: None if t is None else (t.shape, t.dtype, t.device) for name, t in
                (("bias", bias), ("residual", residual))}
    # a backward with create_graph=True needs its graph to reach the bias and residual themselves:
    # referenced, not saved (no version check -- the values come from the saved z)
    ctx.graph_leaves = None if recompute else tuple(
        t if t is not None and t.requires_grad else None for t in (bias, residual))
    ctx.saved_z = saved_z
    ctx.has_residual = residual is not None
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.activation = (activation, negative_slope)


def _stand_in(like):
    """Zeros shaped as a bias or residual that was not kept (None for none): what backward needs of
    them is their shape, for their gradients do not depend on their values."""
    if like is None:
        return None
    shape, dtype, device = like
    return torch.zeros(shape, dtype=dtype, device=device)


def _backward(ctx, grad_y, _grad_z_output):
    input, weight, bias, z, residual = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    activation, negative_slope = ctx.activation
    differentiated = dispatch.backward_is_differentiated()
    if differentiated and ctx.graph_leaves is not None:
        bias, residual = ctx.graph_leaves
    if bias is None:
        bias = _stand_in(ctx.like["bias"])
    if residual is None:
        residual = _stand_in(ctx.like["residual"])
    if differentiated:
        def forward(input, weight, bias, residual):
            # act(conv + bias + residual) in torch's ops; with stand-ins for bias and residual, the
            # saved z gives the activation its argument's values (the graph runs through the inputs)
            z_graph = reference(input, weight, bias, stride, padding, dilation, groups)
            if residual is not None:
                z_graph = z_graph + residual
            if ctx.saved_z:
                z_graph = z_graph + (z - z_graph).detach()
            return torch_activation(z_graph, activation, negative_slope)

        grads = dispatch.gradients_by_torch("conv2d", forward, (input, weight, bias, residual), (grad_y,),
                                            ctx.needs_input_grad[:4])
        return tuple(grads) + (None,) * 7
    need_input, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
    need_bias = need_bias and bias is not None
    bias = None if bias is None else bias.contiguous()
    grad_bias = None
    if activation != 0:
        if not ctx.saved_z:
            z = conv2d_op(input, weight, bias, residual, stride, padding, dilation, groups, 0, 0.0, False)[0]
        # z holds the bias already (the activation's argument itself, so its rounding cannot put it
        # on the other side of relu's kink from the output): a zero bias only asks for its gradient
        zero_bias = None if bias is None else torch.zeros_like(bias)
        grad_z, grad_bias = epilogue.bias_act_backward_op(grad_y, z, zero_bias, activation, 1, negative_slope)
    else:
        grad_z = grad_y
        if need_bias and not need_weight:
            grad_bias = epilogue.bias_act_backward_op(grad_y, grad_y, bias, 0, 1, 0.0)[1]
    grad_input = grad_weight = None
    if need_input:
        grad_input = conv2d_input_grad_op(grad_z, input, weight, stride, padding, dilation, groups)
    if need_weight:
        bias_in_wgrad = need_bias and grad_bias is None
        grad_weight, wgrad_bias = conv2d_weight_grad_op(grad_z, input, weight, stride, padding, dilation, groups,
                                                        bias_in_wgrad)
        if bias_in_wgrad:
            grad_bias = wgrad_bias
    return (grad_input, grad_weight, grad_bias if need_bias else None,
            grad_z if (need_residual and ctx.has_residual) else None) + (None,) * 7


conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The Python entry point: validates like torch, then calls the registered op.

def _int_tuple(value, name, allow_string=False):
    """stride/padding/dilation as a pair of ints, as torch's argument parser accepts them."""
    if isinstance(value, bool):
        raise TypeError(f"conv2d(): argument '{name}' must be tuple of ints, not bool")
    if as_int(value) is not None:
        return (as_int(value),) * 2
    if isinstance(value, (tuple, list, torch.Size)):
        ints = [as_int(v) for v in value]
        for v, integer in zip(value, ints):
            if integer is None:
                raise TypeError(f"conv2d(): argument '{name}' must be tuple of ints, but found element of type "
                                f"{type_name(v)}")
        if len(ints) == 1:
            return (ints[0], ints[0])
        if len(ints) != 2:
            raise RuntimeError(f"conv2d(): argument '{name}': expected {name} to be a single integer value or a list "
                               f"of 2 values to match the convolution dimensions, but got {name}={ints}")
        return tuple(ints)
    expected = "tuple of ints or str" if allow_string else "tuple of ints"
    raise TypeError(f"conv2d(): argument '{name}' must be {expected}, not {type_name(value)}")


def _resolve_padding(padding, kernel_hw, stride, dilation):
    """(top, left, bottom, right) from an int, a pair, 'same' or 'valid'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise RuntimeError(f"conv2d(): argument 'padding': Invalid padding string: {padding!r} "
                               f"(expected 'same' or 'valid')")
        if any(s != 1 for s in stride):
            raise RuntimeError("conv2d(): argument 'padding': padding='same' is not supported for strided "
                               "convolutions")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_hw)]
        return (totals[0] // 2, totals[1] // 2, totals[0] - totals[0] // 2, totals[1] - totals[1] // 2)
    ph, pw = _int_tuple(padding, "padding", allow_string=True)
    return (ph, pw, ph, pw)


def _check_weight_dims(input, weight):
    """Before an unbatched input is unsqueezed, so the message names the input the user passed."""
    if weight.dim() == 4:
        return
    if input.dim() != weight.dim():
        # torch's wording, for the weight of a conv of another dimensionality
        raise RuntimeError(f"conv2d(): argument 'weight': Expected {weight.dim()}-dimensional input for "
                           f"{weight.dim()}-dimensional weight {list(weight.shape)}, but got {input.dim()}-dimensional "
                           f"input of size {list(input.shape)} instead (conv2d's weight is 4-dimensional: "
                           f"out_channels, in_channels/groups, kH, kW)")
    raise RuntimeError(f"conv2d(): argument 'weight' must be 4-dimensional (out_channels, in_channels/groups, "
                       f"kH, kW), but got weight of size {list(weight.shape)}")


def check_conv2d_args(input, weight, bias, stride, padding, dilation, groups, residual=None):
    """Raise what torch raises for bad input, naming the argument. Returns (stride, padding as
    (top, left, bottom, right), dilation, groups) for batched input."""
    check_tensor(input, "input", "conv2d()")
    check_tensor(weight, "weight", "conv2d()")
    check_tensor(bias, "bias", "conv2d()", optional=True)
    check_tensor(residual, "residual", "conv2d()", optional=True)
    if as_int(groups) is None:
        raise TypeError(f"conv2d(): argument 'groups' must be int, not {type_name(groups)}")
    groups = as_int(groups)
    stride = _int_tuple(stride, "stride")
    dilation = _int_tuple(dilation, "dilation")
    if input.dim() != 4:
        raise RuntimeError(f"conv2d(): argument 'input': expected 3D (unbatched) or 4D (batched) input to conv2d, "
                           f"but got input of size: {list(input.shape)}")
    _check_weight_dims(input, weight)
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        check_same_device(t, name, input, "input", "conv2d()")
        if t.dtype != input.dtype:  # torch's own wording, which its tests pin
            raise RuntimeError(f"conv2d(): Input type ({input.dtype}) and {name} type ({t.dtype}) should be the same "
                               f"(argument '{name}')")
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"conv2d(): argument 'stride': non-positive stride is not supported, got {list(stride)}")
    if any(d < 0 for d in dilation):
        raise RuntimeError(f"conv2d(): argument 'dilation': dilation should be greater than zero, got "
                           f"{list(dilation)}")
    if any(d == 0 for d in dilation):
        raise RuntimeError(f"conv2d(): argument 'dilation': non-positive dilation is not supported, got "
                           f"{list(dilation)}")
    if groups <= 0:
        raise RuntimeError(f"conv2d(): argument 'groups': non-positive groups is not supported, got {groups}")
    padding = _resolve_padding(padding, tuple(weight.shape[2:]), stride, dilation)
    if any(p < 0 for p in padding):
        raise RuntimeError(f"conv2d(): argument 'padding': negative padding is not supported, got {padding[:2]}")
    if input.numel() == 0 and input.shape[0] and input.shape[1] and any(padding):  # torch's wording
        raise RuntimeError(f"conv2d(): argument 'input': Only zero batch or zero channel inputs are supported, but "
                           f"got input shape: {list(input.shape)}")
    K = weight.shape[0]
    if K < groups:
        raise RuntimeError(f"conv2d(): argument 'weight': Given groups={groups}, expected weight to be at least "
                           f"{groups} at dimension 0, but got weight of size {list(weight.shape)} instead")
    if K % groups:
        raise RuntimeError(f"conv2d(): argument 'weight': Given groups={groups}, expected weight to be divisible by "
                           f"{groups} at dimension 0, but got weight of size {list(weight.shape)} instead")
    if input.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"conv2d(): argument 'input': Given groups={groups}, weight of size {list(weight.shape)}, "
                           f"expected input{list(input.shape)} to have {weight.shape[1] * groups} channels, but got "
                           f"{input.shape[1]} channels instead")
    if 0 in weight.shape[2:]:  # torch's kernels refuse it (an output of bias alone would be a wrong answer)
        raise RuntimeError(f"conv2d(): argument 'weight': kernel size should be greater than zero, but got "
                           f"kernel_height: {weight.shape[2]} kernel_width: {weight.shape[3]}")
    padded = [input.shape[2 + i] + padding[i] + padding[i + 2] for i in range(2)]
    dilated = [dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)]
    if any(d > p for d, p in zip(dilated, padded)):
        raise RuntimeError(f"conv2d(): argument 'weight': Calculated padded input size per channel: "
                           f"({padded[0]} x {padded[1]}). Kernel size: ({dilated[0]} x {dilated[1]}). Kernel size "
                           f"can't be greater than actual input size")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != K):
        raise RuntimeError(f"conv2d(): argument 'bias': Given weight of size {list(weight.shape)}, expected bias to "
                           f"be 1-dimensional with {K} elements, but got bias of size {list(bias.shape)} instead")
    return stride, padding, dilation, groups


def _prepare(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None,
             residual=None, negative_slope=0.01):
    """(op args, {}) for a batched call; unbatched input must be unsqueezed by the caller."""
    code = activation_code(activation)
    negative_slope = check_negative_slope(negative_slope, "conv2d()")
    stride, padding, dilation, groups = check_conv2d_args(input, weight, bias, stride, padding, dilation, groups,
                                                          residual)
    if residual is not None:
        shape = _conv_output_shape(input, weight, stride, padding, dilation)
        try:
            residual = residual.expand(shape)
        except RuntimeError:
            raise RuntimeError(f"conv2d(): argument 'residual' of size {list(residual.shape)} must broadcast to the "
                               f"output's size {list(shape)}") from None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias, residual))
    save_z = needs_grad and code != 0
    return (input, weight, bias, residual, list(stride), list(padding), list(dilation), groups, code,
            negative_slope, save_z), {}


@dispatch.entry_point
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, activation: Optional[str] = None, residual: Optional[Tensor] = None,
           negative_slope: float = 0.01) -> Tensor:
    """torch.nn.functional.conv2d, plus a fused epilogue: act(conv2d(input, weight) + bias + residual).

    activation: None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh" or "leaky_relu" (with
    negative_slope). residual: a tensor broadcastable to the output, added before the activation.
    Input may be batched (N, C, H, W) or unbatched (C, H, W), NCHW or channels_last; the output has
    the memory format torch's conv2d would give.
    """
    check_tensor(input, "input", "conv2d()")
    check_tensor(weight, "weight", "conv2d()")
    layout_reason = dispatch.layout_reason(input, weight, bias, residual)
    if layout_reason:  # oneDNN (to_mkldnn), sparse: torch's own conv
        return dispatch.served_by_torch("conv2d", layout_reason, reference, input, weight, bias, stride, padding,
                                        dilation, groups, activation, residual, negative_slope)
    _check_weight_dims(input, weight)
    autocast_dtype = _autocast_dtype(input)
    if autocast_dtype is not None:
        # torch's autocast runs conv2d in its lower precision: cast as it would
        input, weight, bias = (_autocast(t, autocast_dtype) for t in (input, weight, bias))
        if isinstance(residual, Tensor) and residual.dtype != autocast_dtype:
            # act(conv(x) + residual) in torch promotes to the residual's dtype: compose as torch would
            with torch.autocast(input.device.type, enabled=False):
                y = conv2d(input, weight, bias, stride, padding, dilation, groups)
            return torch_activation(y + residual, activation_code(activation), negative_slope)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
        if isinstance(residual, Tensor) and residual.dim() > 3:
            # it would broadcast the 3-d output up (a batched call refuses that too): never drop its dim
            raise RuntimeError(f"conv2d(): argument 'residual' of size {list(residual.shape)} must broadcast to the "
                               f"output of an unbatched input, which is 3-d (C, H, W)")
        if isinstance(residual, Tensor) and residual.dim() == 3:
            residual = residual.unsqueeze(0)
    args, _ = _prepare(input, weight, bias, stride, padding, dilation, groups, activation=activation,
                       residual=residual, negative_slope=negative_slope)
    reason = dispatch.autodiff_transform_reason(input, weight, bias, residual)
    if reason is not None:
        y = dispatch.served_by_torch("conv2d", reason, reference, input, weight, bias, *args[4:8], activation, residual,
                                     negative_slope)
    elif input.shape[1] == 0:
        # no input channels: nothing for a kernel to compute; whatever torch's conv2d returns (a bias too)
        y = dispatch.served_by_torch("conv2d", "no input channels: nothing for bigkern's kernels to compute",
                                     reference, input, weight, bias, stride, padding, dilation, groups, activation,
                                     residual, args[9])
    else:
        y = conv2d_op(*args)[0]
    return y.squeeze(0) if unbatched else y


def _autocast_dtype(input):
    """The dtype torch's autocast would run conv2d in for this input, or None."""
    if not isinstance(input, Tensor) or not input.is_floating_point() or input.dtype == torch.float64:
        return None
    device_type = input.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(t, dtype):
    return t.to(dtype) if amp.is_castable(t) else t


# ---------------------------------------------------------------------------------------------
# Verification against float64, shared by tests/test_conv.py and `bigkern verify`.

def reference(input, weight, bias, stride, padding, dilation, groups, activation=None, residual=None,
              negative_slope=0.01):
    """torch's own composition act(conv2d(input, weight, bias) + residual) (padding as 4 values or
    torch's), in whatever dtype the input has."""
    if isinstance(padding, (list, tuple)) and len(padding) == 4:
        y = torch_conv(input, weight, stride, padding, dilation, groups)
        if bias is not None:
            y = y + _channel_view(bias)
    else:
        y = torch.conv2d(input, weight, bias, stride, padding, dilation, groups)  # (see torch_conv)
    if residual is not None:
        y = y + residual
    return torch_activation(y, activation_code(activation), negative_slope)


_KINKED = ("relu", "leaky_relu")  # activations whose derivative jumps (at 0)


def compare_with_reference(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None,
                           residual=None, negative_slope=0.01, backward=True):
    """Run conv2d forward (and backward) on leaf tensors with whatever backend is requested; returns
    the Comparisons of the output and each gradient against float64 (and torch's same-dtype error)."""
    from bigkern import testing

    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = conv2d(input, weight, bias, activation=activation, residual=residual, negative_slope=negative_slope,
               **kwargs)
    leaves = [("input", input), ("weight", weight), ("bias", bias), ("residual", residual)]
    copies64 = {name: testing.fp64_copy(t) for name, t in leaves}
    copies = {name: testing.same_dtype_copy(t) for name, t in leaves}

    def run_reference(c):
        return reference(c["input"], c["weight"], c["bias"], activation=activation, residual=c["residual"],
                         negative_slope=negative_slope, **kwargs)

    y64, yt = run_reference(copies64), run_reference(copies)
    # a convolution sums C*R*S products: its rounding scales with the sum of |terms|
    terms = reference(_finite_abs(copies64["input"]), _finite_abs(copies64["weight"]), None, **kwargs)
    scale = max(terms.max().item(), _finite_abs(y64).max().item()) if y64.numel() else None
    floor_ulps = tf32_floor_ulps(input)
    results = [testing.compare(y, y64, yt, scale=scale, floor_ulps=floor_ulps)]
    if not same_storage_order(y, yt):
        results.append(testing.Comparison("layout", 0, 0, 0, False, f"strides {y.stride()}, torch {yt.stride()}"))
    if not backward or not any(t is not None and t.requires_grad for _, t in leaves):
        return results

    grad_y = testing.make_tensor(y.shape, y.dtype, y.device)
    if activation in _KINKED:
        # relu'(z) jumps at 0: where the pre-activation is within the forward's rounding of the kink,
        # the kernel and float64 may rightly take different sides. No gradient flows there.
        with torch.no_grad():
            z64 = reference(copies64["input"], copies64["weight"], copies64["bias"], residual=copies64["residual"],
                            **kwargs)
            near_kink = z64.abs() <= 2 * results[0].bound
        grad_y = grad_y.masked_fill(near_kink.to(grad_y.device), 0)
    y.backward(grad_y)
    y64.backward(grad_y.double().cpu())
    yt.backward(grad_y)
    # every gradient is a sum of products of grad_y with one operand: measure rounding against the
    # same sums over |values|
    g_abs = _finite_abs(grad_y.double().cpu())
    for name, t in leaves:
        if t is None or not t.requires_grad:
            continue
        scale = _gradient_scale(name, g_abs, copies64, activation, kwargs)
        results.append(testing.compare(t.grad, copies64[name].grad, copies[name].grad, name=f"grad {name}",
                                       factor=testing.GRADIENT_FACTOR, scale=scale, floor_ulps=floor_ulps))
    return results


def tf32_floor_ulps(input):
    """The error floor (in fp32 ulps at the magnitude of the summed terms) when fp32 may run as TF32:
    one TF32 ulp (10 mantissa bits: 2^13 fp32 ulps), since both factors of every product are rounded
    to TF32 (each by up to half an ulp, so the product by up to one) and a short sum does not average
    that out. torch's own error is no yardstick there -- cuDNN may pick a full-fp32 algorithm even
    where TF32 is allowed. None (the default) otherwise."""
    if input.dtype == torch.float32 and _dot_precision(input) == "tf32":
        return 2.0 ** 13
    return None


def _finite_abs(t):
    """|t| with NaN and Inf as 0: the magnitude of the finite terms a sum adds up."""
    t = t.detach().abs()
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _gradient_scale(name, g_abs, copies64, activation, kwargs):
    """The magnitude of the terms each gradient sums (|grad_y| stands in for |grad_z|: act' <= ~1.1)."""
    x_abs, w_abs = _finite_abs(copies64["input"]), _finite_abs(copies64["weight"])
    stride, padding, dilation, groups = (kwargs[k] for k in ("stride", "padding", "dilation", "groups"))
    batched = x_abs.dim() == 4
    if not batched:
        x_abs, g_abs = x_abs.unsqueeze(0), g_abs.unsqueeze(0)
    if name in ("residual",):
        return g_abs.max().item() if g_abs.numel() else None
    stride, dilation = _int_tuple(stride, "stride"), _int_tuple(dilation, "dilation")
    padding = _resolve_padding(padding, tuple(w_abs.shape[2:]), stride, dilation)
    geometry = (list(stride), list(padding), list(dilation), groups)
    if name == "input":
        t = _input_grad_torch(g_abs, x_abs, w_abs, *geometry)
    elif name == "weight":
        t = _weight_grad_torch(g_abs, x_abs, w_abs, *geometry, False)[0]
    else:
        t = g_abs.sum((0, 2, 3))
    return t.max().item() if t.numel() else None


def random_geometry(rng, device="cpu", max_hw=9):
    """A random conv2d case with odd sizes: (input shape, weight shape, stride, padding, dilation, groups)."""
    groups = rng.choice([1, 1, 1, 2, 3])
    c_g = rng.choice([1, 2, 3, 5, 8])
    k_g = rng.choice([1, 3, 4, 7, 12])
    R, S = rng.choice([1, 2, 3]), rng.choice([1, 3, 4])
    stride = (rng.choice([1, 1, 2, 3]), rng.choice([1, 2]))
    dilation = (rng.choice([1, 1, 2]), rng.choice([1, 2]))
    if rng.random() < 0.2 and stride == (1, 1):
        padding = rng.choice(["same", "valid"])
    else:
        padding = (rng.choice([0, 1, 2]), rng.choice([0, 1]))
    pad = (0, 0) if isinstance(padding, str) else padding
    min_h = max(1, dilation[0] * (R - 1) + 1 - 2 * pad[0])
    min_w = max(1, dilation[1] * (S - 1) + 1 - 2 * pad[1])
    H = rng.randint(min_h, max(min_h, max_hw))
    W = rng.randint(min_w, max(min_w, max_hw))
    # No axis whose every output reads only padding (the output all bias): torch 2.14's CPU conv2d
    # crashes on some of those with a bias and channels_last, killing the test run (a fixed case in
    # tests/test_conv.py covers the geometry, contiguous).
    while reads_only_padding(H, R, stride[0], pad[0], dilation[0]):
        H += 1
    while reads_only_padding(W, S, stride[1], pad[1], dilation[1]):
        W += 1
    N = rng.choice([1, 2, 3])
    return (N, groups * c_g, H, W), (groups * k_g, c_g, R, S), stride, padding, dilation, groups


def reads_only_padding(size, kernel, stride, padding, dilation):
    """Whether every output position along an axis takes all its taps from the zero padding."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return out > 0 and not any(0 <= o * stride - padding + t * dilation < size
                               for o in range(out) for t in range(kernel))


def verification_cases(device, dtype):
    """(description, thunk returning Comparisons) on fresh random inputs: what `bigkern verify` runs.
    None for bfloat16 on a CPU: the Triton 3.8 interpreter's tl.dot returns garbage for bf16."""
    from bigkern import testing

    if device == "cpu" and dtype == torch.bfloat16:
        return
    cases = [
        ((2, 3, 7, 9), (8, 3, 3, 3), 1, 1, 1, 1, "relu", False, "contiguous"),
        ((2, 8, 6, 5), (12, 4, 3, 1), (2, 1), (1, 0), 1, 2, "gelu", True, "channels_last"),
        ((1, 6, 7, 7), (6, 1, 3, 3), 1, "same", 2, 6, "silu", True, "channels_last"),
        ((3, 5, 5, 7), (7, 5, 1, 1), 2, 0, 1, 1, None, True, "contiguous"),
    ]
    if device != "cpu":
        cases += [
            ((4, 64, 28, 28), (64, 64, 3, 3), 1, 1, 1, 1, "relu", True, "channels_last"),
            ((4, 256, 14, 14), (512, 256, 1, 1), 2, 0, 1, 1, "relu", False, "channels_last"),
            ((2, 128, 15, 15), (128, 128, 3, 3), 2, 1, 1, 1, "leaky_relu", True, "contiguous"),
        ]
    for x_shape, w_shape, stride, padding, dilation, groups, activation, with_residual, layout in cases:
        def run(x_shape=x_shape, w_shape=w_shape, stride=stride, padding=padding, dilation=dilation,
                groups=groups, activation=activation, with_residual=with_residual, layout=layout):
            x = testing.make_tensor(x_shape, dtype, device, layout=layout, requires_grad=True)
            w = testing.make_tensor(w_shape, dtype, device, layout=layout, scale=1 / math.sqrt(math.prod(w_shape[1:])),
                                    requires_grad=True)
            b = testing.make_tensor((w_shape[0],), dtype, device, requires_grad=True)
            residual = None
            if with_residual:
                shape = reference(x.detach(), w.detach(), None, stride, padding, dilation, groups).shape
                residual = testing.make_tensor(shape, dtype, device, layout=layout, requires_grad=True)
            return compare_with_reference(x, w, b, stride, padding, dilation, groups, activation, residual)
        yield (f"{activation} x{list(x_shape)} w{list(w_shape)} stride={stride} padding={padding} "
               f"dilation={dilation} groups={groups} {layout}{' +residual' if with_residual else ''}"), run
