"""bias_act: y = act(x + bias), bias broadcast along one dimension; the epilogue of every family.

Registered as torch.library ops `bigkern::bias_act` and `bigkern::bias_act_backward` (with fake
implementations and autograd), each dispatching at run time to the Triton kernels
(kernels/epilogue.py), the CUDA kernels (csrc/epilogue/) or a pure-PyTorch reference.
"""

from typing import Optional

import torch
from torch import Tensor

from bigkern import dispatch, memory
from bigkern.ops.checks import as_int, check_negative_slope, check_same_device, check_tensor, type_name

# name -> code shared with kernels/epilogue.py and csrc/common/activation.cuh
ACTIVATIONS = {
    "none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "sigmoid": 5, "tanh": 6, "leaky_relu": 7,
}
ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}


def activation_code(activation) -> int:
    """The code of an activation given by name ("relu", "gelu", "gelu_tanh", ...) or None."""
    if activation is None:
        return ACTIVATIONS["none"]
    if isinstance(activation, str) and activation.lower() in ACTIVATIONS:
        return ACTIVATIONS[activation.lower()]
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} or None, not {activation!r}")


# ---------------------------------------------------------------------------------------------
# The pure-PyTorch reference: torch's own forward and backward functions.

def torch_activation(z: Tensor, code: int, negative_slope: float) -> Tensor:
    F = torch.nn.functional
    return {
        0: lambda: z,
        1: lambda: F.relu(z),
        2: lambda: F.gelu(z),
        3: lambda: F.gelu(z, approximate="tanh"),
        4: lambda: F.silu(z),
        5: lambda: torch.sigmoid(z),
        6: lambda: torch.tanh(z),
        7: lambda: F.leaky_relu(z, negative_slope),
    }[code]()


def exact_activation(z: Tensor, code: int, negative_slope: float) -> Tensor:
    """act(z) for the float64 references: torch's own, except the GELUs, whose 1 + erf(.) and
    1 + tanh(.) cancel to exactly 0 below z ~ -7.5 even in float64 while the true values (~1e-18,
    what a float32 kernel computes) are not: there the same functions in forms that do not cancel,
    z/2 erfc(-z/sqrt 2) and z sigmoid(2 sqrt(2/pi) (z + 0.044715 z^3))."""
    if code == 2:
        return 0.5 * z * torch.special.erfc(-z * 0.7071067811865476)
    if code == 3:
        return z * torch.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    return torch_activation(z, code, negative_slope)


def torch_activation_backward(grad: Tensor, z: Tensor, code: int, negative_slope: float) -> Tensor:
    aten = torch.ops.aten
    if code == 0:
        return grad.clone()
    if code == 1:
        return aten.threshold_backward(grad, z, 0)
    if code in (2, 3):
        return aten.gelu_backward(grad, z, approximate="none" if code == 2 else "tanh")
    if code == 4:
        return aten.silu_backward(grad, z)
    if code == 5:
        return aten.sigmoid_backward(grad, torch.sigmoid(z))
    if code == 6:
        return aten.tanh_backward(grad, torch.tanh(z))
    return aten.leaky_relu_backward(grad, z, negative_slope, False)


def _broadcast_bias(bias, x, dim):
    shape = [1] * x.dim()
    shape[dim] = -1
    return bias.view(shape)


# ---------------------------------------------------------------------------------------------
# How the kernels walk a dense tensor (shared by the Triton and CUDA launchers).

def channel_layout(x: Tensor, dim: int, has_bias: bool):
    """(channel_stride, n_channels, n_rows, n_cols, channel_in_rows) for dense x.

    Storage is seen as a row-major (n_rows, n_cols) matrix. With the channel innermost in storage,
    columns are channels; otherwise a row is the run of elements that share one channel and the
    channel is row % n_channels. Without a bias (or with one channel) the rows are plain chunks.
    """
    numel = x.numel()
    n_channels = x.shape[dim] if (has_bias and x.dim()) else 1
    if n_channels == 1:
        n_cols = max(1, min(numel, 2048))
        return 1, 1, -(-numel // n_cols), n_cols, True
    channel_stride = x.stride(dim)
    if channel_stride == 1:
        return 1, n_channels, numel // n_channels, n_channels, False
    return channel_stride, n_channels, numel // channel_stride, channel_stride, True


def _same_layout(grad: Tensor, like: Tensor) -> Tensor:
    """grad with exactly like's strides, so one set of storage offsets serves both."""
    if grad.stride() == like.stride():
        return grad
    return torch.empty_like(like).copy_(grad)


# ---------------------------------------------------------------------------------------------
# Implementations.

def _kernel_dtypes_reason(x, bias):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernels take float16, bfloat16 or float32, not {x.dtype}"
    return None


def _triton_unsupported(x, bias, *rest):
    return dispatch.triton_unsupported(x, bias) or _kernel_dtypes_reason(x, bias)


CUDA_KERNELS = dispatch.CompiledKernels()  # bias_act_forward, bias_act_backward


def _cuda_unsupported(x, bias, *rest):
    return CUDA_KERNELS.unsupported([t for t in (x, bias) if t is not None]) or _kernel_dtypes_reason(x, bias)


def _always(*args):
    return None


BIAS_ACT = dispatch.Op("bias_act")
BIAS_ACT_BACKWARD = dispatch.Op("bias_act_backward")


@BIAS_ACT.register("triton", _triton_unsupported)
def _bias_act_triton(x, bias, activation, dim, negative_slope):
    from bigkern.kernels import epilogue as kernels

    x = memory.dense(x)
    bias = None if bias is None else bias.contiguous()  # the kernels index bias[c] densely
    y = memory.empty_like(x)
    if x.numel():
        channel_stride, n_channels, *_ = channel_layout(x, dim, bias is not None)
        kernels.bias_act_forward(x, bias, y, channel_stride, n_channels, activation, negative_slope)
    return y


@BIAS_ACT.register("cuda", _cuda_unsupported, auto=False)
def _bias_act_cuda(x, bias, activation, dim, negative_slope):
    x = memory.dense(x)
    bias = None if bias is None else bias.contiguous()  # the kernels index bias[c] densely
    y = memory.empty_like(x)
    if x.numel():
        channel_stride, n_channels, *_ = channel_layout(x, dim, bias is not None)
        CUDA_KERNELS.bias_act_forward(x, bias, y, activation, channel_stride, n_channels, negative_slope)
    return y


@BIAS_ACT.register("torch", _always)
def _bias_act_torch(x, bias, activation, dim, negative_slope):
    x = memory.dense(x)
    bias = None if bias is None else bias.contiguous()  # the kernels index bias[c] densely
    z = x if bias is None else x + _broadcast_bias(bias, x, dim)
    y = torch_activation(z, activation, negative_slope)
    # same layout as the kernels give; `clone` also keeps the identity activation from aliasing x
    return torch.empty_like(x).copy_(y)


def _partials_to_grad_bias(partial, n_channels, bias):
    return partial.view(-1, n_channels).sum(0).to(bias.dtype)


def _bias_act_backward_by_partials(partials, grad_y, x, bias, activation, dim, negative_slope):
    """grad_x, and grad_bias summed from the per-block partial sums `partials(...)` writes (either
    kernel backend: they share the layout and differ only in the kernel)."""
    x = memory.dense(x)
    bias = None if bias is None else bias.contiguous()  # the kernels index bias[c] densely
    grad_y = _same_layout(grad_y, x)
    grad_x = memory.empty_like(x)
    grad_bias = memory.empty((0 if bias is None else bias.numel(),), dtype=x.dtype if bias is None else bias.dtype,
                             device=x.device)
    if x.numel():
        _, n_channels, n_rows, n_cols, channel_in_rows = channel_layout(x, dim, bias is not None)
        partial = partials(grad_y, x, bias, grad_x, n_rows, n_cols, n_channels, channel_in_rows, activation,
                           negative_slope)
        if bias is not None:
            grad_bias = _partials_to_grad_bias(partial, n_channels, bias)
    elif bias is not None:
        grad_bias.zero_()
    return grad_x, grad_bias


@BIAS_ACT_BACKWARD.register("triton", _triton_unsupported)
def _bias_act_backward_triton(grad_y, x, bias, activation, dim, negative_slope):
    from bigkern.kernels import epilogue as kernels

    def partials(*args):
        return kernels.bias_act_backward_partials(
            *args, lambda shape: memory.empty(shape, dtype=torch.float32, device=x.device))

    return _bias_act_backward_by_partials(partials, grad_y, x, bias, activation, dim, negative_slope)


@BIAS_ACT_BACKWARD.register("cuda", _cuda_unsupported, auto=False)
def _bias_act_backward_cuda(grad_y, x, bias, activation, dim, negative_slope):
    return _bias_act_backward_by_partials(CUDA_KERNELS.bias_act_backward, grad_y, x, bias, activation, dim,
                                          negative_slope)


@BIAS_ACT_BACKWARD.register("torch", _always)
def _bias_act_backward_torch(grad_y, x, bias, activation, dim, negative_slope):
    x = memory.dense(x)
    bias = None if bias is None else bias.contiguous()  # the kernels index bias[c] densely
    z = x if bias is None else x + _broadcast_bias(bias, x, dim)
    grad_z = torch_activation_backward(grad_y, z, activation, negative_slope)
    grad_x = torch.empty_like(x).copy_(grad_z)
    if bias is None:
        return grad_x, x.new_empty((0,))
    other_dims = [d for d in range(x.dim()) if d != dim % x.dim()]
    accumulate = torch.promote_types(grad_z.dtype, torch.float32)  # fp32 for the half types; fp64 stays fp64
    grad_bias = grad_z.sum(other_dims, dtype=accumulate).to(bias.dtype) if other_dims else grad_z.clone()
    return grad_x, grad_bias


# ---------------------------------------------------------------------------------------------
# Registered ops: what torch.compile, torch.export and autograd see.

@torch.library.custom_op("bigkern::bias_act", mutates_args=())
def bias_act_op(x: Tensor, bias: Optional[Tensor], activation: int, dim: int, negative_slope: float) -> Tensor:
    return BIAS_ACT(x, bias, activation, dim, negative_slope)


@bias_act_op.register_fake
def _(x, bias, activation, dim, negative_slope):
    return torch.empty_like(memory.dense(x))


@torch.library.custom_op("bigkern::bias_act_backward", mutates_args=())
def bias_act_backward_op(grad_y: Tensor, x: Tensor, bias: Optional[Tensor], activation: int, dim: int,
                         negative_slope: float) -> tuple[Tensor, Tensor]:
    return BIAS_ACT_BACKWARD(grad_y, x, bias, activation, dim, negative_slope)


@bias_act_backward_op.register_fake
def _(grad_y, x, bias, activation, dim, negative_slope):
    # grad_bias in bias's dtype, as every implementation gives it
    grad_bias = x.new_empty((0,)) if bias is None else bias.new_empty((bias.numel(),))
    return torch.empty_like(memory.dense(x)), grad_bias


def _setup_context(ctx, inputs, output):
    x, bias, activation, dim, negative_slope = inputs
    ctx.save_for_backward(x, bias)
    ctx.args = (activation, dim, negative_slope)


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    if dispatch.backward_is_differentiated():
        activation, dim, negative_slope = ctx.args
        def forward(x, bias):
            return reference(x, bias, ACTIVATION_NAMES[activation], dim, negative_slope)

        return (*dispatch.gradients_by_torch("bias_act", forward, (x, bias), (grad_y,), ctx.needs_input_grad[:2]),
                None, None, None)
    grad_x, grad_bias = bias_act_backward_op(grad_y, x, bias, *ctx.args)
    return grad_x, (grad_bias if bias is not None else None), None, None, None


bias_act_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The Python entry point: validates like torch, then calls the registered op.

def check_bias_act_args(x, bias, dim, negative_slope=0.01):
    """Raise what torch raises for bad input, naming the argument; returns (dim made non-negative,
    negative_slope as a float, the dtype torch's `x + bias` gives)."""
    check_tensor(x, "input", "bias_act()")
    if x.is_complex():
        raise RuntimeError(f"bias_act(): argument 'input' must be a floating-point tensor, not {x.dtype}")
    index = as_int(dim)
    if index is None:
        raise TypeError(f"bias_act(): argument 'dim' must be int, not {type_name(dim)}")
    slope = check_negative_slope(negative_slope, "bias_act()")
    ndim = max(x.dim(), 1)
    if not -ndim <= index < ndim:
        raise IndexError(f"bias_act(): argument 'dim' is out of range (expected to be in range of "
                         f"[{-ndim}, {ndim - 1}], but got {index})")
    index %= ndim
    dtype = x.dtype
    if bias is not None:
        check_tensor(bias, "bias", "bias_act()")
        check_same_device(bias, "bias", x, "input", "bias_act()")
        if bias.is_complex():
            raise RuntimeError(f"bias_act(): argument 'bias' must be a real tensor, not {bias.dtype}")
        expected = x.shape[index] if x.dim() else 1
        if bias.dim() != 1 or bias.numel() != expected:
            raise RuntimeError(f"bias_act(): argument 'bias' must have shape ({expected},) to match "
                               f"'input' along dim {index}, but got {tuple(bias.shape)}")
        # x + bias promotes as torch does (an fp32 bias on an autocast bf16 activation: fp32 out)
        dtype = torch.promote_types(x.dtype, bias.dtype)
    if not dtype.is_floating_point:  # (an integer input with a floating bias computes in the bias's dtype)
        raise RuntimeError(f"bias_act(): argument 'input' must be a floating-point tensor, not {x.dtype}"
                           + (f" (nor promote to one with 'bias', {bias.dtype})" if bias is not None else ""))
    return index, slope, dtype


def _prepare(x, bias=None, activation="relu", *, dim=-1, negative_slope=0.01):
    dim, negative_slope, dtype = check_bias_act_args(x, bias, dim, negative_slope)
    x, bias = x.to(dtype), (None if bias is None else bias.to(dtype))
    if x.dim() == 0:
        x = x.reshape(1)
    return (x, bias, activation_code(activation), dim, negative_slope), {}


@dispatch.entry_point
def bias_act(x: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "relu", *,
             dim: int = -1, negative_slope: float = 0.01) -> Tensor:
    """act(x + bias) with bias broadcast along `dim`, fused forward and backward.

    activation: "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "leaky_relu" (with
    negative_slope) or None. The result has x's memory layout and the dtype of torch's `x + bias`
    (a float32 bias on a bfloat16 x gives float32, as under autocast the composition would).
    """
    args, _ = _prepare(x, bias, activation, dim=dim, negative_slope=negative_slope)
    reason = dispatch.autodiff_transform_reason(x, bias)
    if reason is not None:
        y = dispatch.served_by_torch("bias_act", reason, reference, *args[:2], activation, *args[3:])
    else:
        y = bias_act_op(*args)
    return y.view(()) if x.dim() == 0 else y


# ---------------------------------------------------------------------------------------------
# Verification against float64, shared by tests/test_epilogue.py and `bigkern verify`.

def reference(x, bias, activation, dim, negative_slope=0.01, activation_fn=torch_activation):
    """torch's own composition act(x + bias), in whatever dtype x has (activation_fn=exact_activation:
    the float64 reference's)."""
    z = x if bias is None else x + _broadcast_bias(bias, x, dim % x.dim())
    return activation_fn(z, activation_code(activation), negative_slope)


def compare_with_reference(x, bias, activation, dim, negative_slope=0.01):
    """Run bias_act forward and backward on leaf tensors x (and bias) with whatever backend is
    requested; returns the Comparisons of output and gradients against float64."""
    from bigkern import testing

    y = bias_act(x, bias, activation, dim=dim, negative_slope=negative_slope)
    grad_y = testing.make_tensor(y.shape, y.dtype, y.device)
    y.backward(grad_y)

    x64, b64 = testing.fp64_copy(x), testing.fp64_copy(bias)
    y64 = reference(x64, b64, activation, dim, negative_slope, activation_fn=exact_activation)
    y64.backward(grad_y.double().cpu())
    xt, bt = testing.same_dtype_copy(x), testing.same_dtype_copy(bias)
    yt = reference(xt, bt, activation, dim, negative_slope)
    yt.backward(grad_y)

    results = [testing.compare(y, y64, yt)]
    if y.stride() != yt.stride():
        results.append(testing.Comparison("layout", 0, 0, 0, False, f"strides {y.stride()}, torch {yt.stride()}"))
    # grad_x = grad_y * act'(z): its rounding scales with grad_y (act' may cancel to near 0)
    grad_scale = grad_y.abs().max().item() if grad_y.numel() else None
    results.append(testing.compare(x.grad, x64.grad, xt.grad, name="grad input",
                                   factor=testing.GRADIENT_FACTOR, scale=grad_scale))
    if bias is not None:
        # grad_bias sums grad_x over every other dim: its rounding scales with the summed terms
        other_dims = [d for d in range(x.dim()) if d != dim % x.dim()]
        finite_terms = torch.where(x64.grad.isfinite(), x64.grad, 0).abs()
        terms = finite_terms.sum(other_dims).max().item() if other_dims else None
        results.append(testing.compare(bias.grad, b64.grad, bt.grad, name="grad bias",
                                       factor=testing.GRADIENT_FACTOR, scale=terms))
    return results


def verification_cases(device, dtype):
    """(description, thunk returning Comparisons) on fresh random inputs: what `bigkern verify` runs."""
    from bigkern import testing

    shapes = [((7, 33), -1, "contiguous"), ((2, 5, 7, 3), 1, "contiguous"), ((2, 5, 7, 3), 1, "channels_last")]
    if device != "cpu":
        shapes += [((8, 64, 56, 56), 1, "channels_last"), ((4096, 1027), -1, "contiguous")]
    for activation in ACTIVATIONS:
        for shape, dim, layout in shapes:
            def run(shape=shape, dim=dim, layout=layout, activation=activation):
                x = testing.make_tensor(shape, dtype, device, layout=layout, scale=2.0, requires_grad=True)
                bias = testing.make_tensor((shape[dim],), dtype, device, requires_grad=True)
                return compare_with_reference(x, bias, activation, dim)
            yield f"{activation} {shape} dim={dim} {layout}", run
