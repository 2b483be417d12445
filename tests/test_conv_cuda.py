"""The CUDA implicit-GEMM convolution (csrc/conv/) and the fused bias + activation its backward
uses (csrc/epilogue/) on the CPU, through the emulator (tests/cuda_emulation/): the production
sources compiled by g++ with WMMA and the launch replaced by C++ of the same semantics, every thread
of a block a fiber. The registered "cuda" implementations of bigkern/ops/conv.py and
bigkern/ops/epilogue.py run unchanged, their launchers swapped for the emulated ones (each family's
CUDA_KERNELS), and the outputs and every gradient are compared with float64 by the FlashAttention
rule, as the Triton kernels are in tests/test_conv.py and tests/test_epilogue.py. On a GPU the same
cases run there with the real kernels."""

import ctypes
import random

import pytest
import torch

import bigkern
from bigkern import dispatch, testing
from bigkern.ops import conv, epilogue
from cuda_emulation import emulation
from cuda_emulation.emulation import array, dtype_code, pointer
from conftest import DEVICE
from test_epilogue import CASES as EPILOGUE_CASES



@pytest.fixture(scope="session")
def emulated_library(request):
    sources = ["conv/conv_forward.cu", "conv/conv_input_grad.cu", "conv/conv_weight_grad.cu",
               "epilogue/bias_act_forward.cu", "epilogue/bias_act_backward.cu"]
    return emulation.library_for_tests(request, "conv_emulated.cpp", sources)


def _strides(t):
    return array(ctypes.c_int64, list(t.stride()) if t is not None else [0, 0, 0, 0])


class EmulatedKernels(dispatch.CompiledKernels):
    """The CPU emulation of the conv and bias_act CUDA sources, with the signatures of
    torch.ops.bigkern.conv2d_*_cuda and bias_act_*_cuda, checked as csrc/*/..._op.cpp checks them."""

    def __init__(self, library, seed):
        self.library = library
        self.seed = seed

    def unsupported(self, tensors):
        if any(t.device.type != "cpu" for t in tensors):
            return "the CUDA emulator takes CPU tensors"
        return None

    def _run(self, entry, *args):
        error = ctypes.create_string_buffer(1024)
        status = entry(*args, ctypes.c_uint(self.seed), error, len(error))
        assert status == 0, f"emulated conv kernel: {error.value.decode()}"

    @staticmethod
    def _geometry(x, weight_shape, out_hw, stride, padding, dilation, groups):
        values = [*x.shape, weight_shape[0], weight_shape[2], weight_shape[3], *out_hw, *stride, *padding, *dilation,
                  groups]
        return array(ctypes.c_int, values)

    def conv2d_forward(self, x, w, bias, residual, y, z, stride, padding, dilation, groups, activation, negative_slope,
                       tf32):
        assert bias is None or (bias.is_contiguous() and bias.numel() == w.shape[0])
        for t in (residual, z):
            assert t is None or t.shape == y.shape
        self._run(self.library.emulated_conv2d_forward, dtype_code(x.dtype), int(tf32),
                  self._geometry(x, w.shape, y.shape[2:], stride, padding, dilation, groups),
                  pointer(x), _strides(x), pointer(w), _strides(w), pointer(bias), pointer(residual),
                  _strides(residual), pointer(y), _strides(y), pointer(z), _strides(z), int(activation),
                  ctypes.c_float(negative_slope))

    def conv2d_input_grad(self, grad, w, dx, stride, padding, dilation, groups, tf32):
        self._run(self.library.emulated_conv2d_input_grad, dtype_code(grad.dtype), int(tf32),
                  self._geometry(dx, w.shape, grad.shape[2:], stride, padding, dilation, groups),
                  pointer(grad), _strides(grad), pointer(w), _strides(w), pointer(dx), _strides(dx))

    def conv2d_weight_grad(self, grad, x, partial, bias_partial, weight_shape, stride, padding, dilation, groups,
                           bias_grad, tf32):
        assert partial.dtype == torch.float32 and partial.is_contiguous() and partial.shape[1] == weight_shape[0]
        splits = partial.shape[0]
        assert not bias_grad or (bias_partial.is_contiguous() and bias_partial.numel() == splits * weight_shape[0])
        self._run(self.library.emulated_conv2d_weight_grad, dtype_code(grad.dtype), int(tf32),
                  self._geometry(x, weight_shape, grad.shape[2:], stride, padding, dilation, groups),
                  pointer(grad), _strides(grad), pointer(x), _strides(x), pointer(partial),
                  pointer(bias_partial if bias_grad else None), int(splits))

    def bias_act_forward(self, x, bias, y, activation, channel_stride, channels, negative_slope):
        assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
        assert bias is None or (bias.is_contiguous() and bias.dtype == x.dtype)
        self._run(self.library.emulated_bias_act_forward, dtype_code(x.dtype), pointer(x), pointer(bias), pointer(y),
                  ctypes.c_int64(x.numel()), ctypes.c_int64(channel_stride), ctypes.c_int64(channels),
                  int(activation), ctypes.c_float(negative_slope))

    def bias_act_backward(self, grad_y, x, bias, grad_x, n_rows, n_cols, channels, channel_in_rows, activation,
                          negative_slope):
        assert grad_y.stride() == x.stride() and grad_x.stride() == x.stride()
        programs = self.library.emulated_bias_act_backward_row_programs
        programs.restype = ctypes.c_int64
        rows = programs(ctypes.c_int64(n_rows), ctypes.c_int64(n_cols), int(channel_in_rows))
        partial = torch.empty(rows if channel_in_rows else rows * n_cols, dtype=torch.float32)
        self._run(self.library.emulated_bias_act_backward, dtype_code(x.dtype), pointer(grad_y),
                  pointer(x), pointer(bias), pointer(grad_x), pointer(partial), ctypes.c_int64(x.numel()),
                  ctypes.c_int64(n_rows), ctypes.c_int64(n_cols), ctypes.c_int64(channels), int(channel_in_rows),
                  int(activation), ctypes.c_float(negative_slope))
        return partial


@pytest.fixture
def emulated(emulated_library, monkeypatch, fresh_seed):
    """Forcing "cuda" runs the conv and bias_act ops' CUDA implementations through the emulation."""
    if DEVICE == "cuda":
        pytest.skip("on a GPU tests/test_conv.py and tests/test_epilogue.py run the real CUDA kernels")
    kernels = EmulatedKernels(emulated_library, fresh_seed)
    monkeypatch.setattr(conv, "CUDA_KERNELS", kernels)
    monkeypatch.setattr(epilogue, "CUDA_KERNELS", kernels)


def check(results):
    failures = [str(r) for r in results if not r.ok]
    assert not failures, "; ".join(failures)


# (dtype, math): fp32 runs fp32 FMAs (TF32 not allowed) or TF32 WMMA (allowed); 16-bit runs WMMA.
MATH = [(torch.float32, "fma"), (torch.float32, "tf32"), (torch.float16, "wmma"), (torch.bfloat16, "wmma")]
ACTIVATIONS = [None, "relu", "gelu", "silu", "leaky_relu", "sigmoid"]


@pytest.mark.parametrize("dtype,math", MATH, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("draw", range(4))
def test_random_geometries_forward_and_every_gradient(emulated, monkeypatch, dtype, math, draw):
    if math == "tf32":  # what torch.backends.cudnn.allow_tf32 decides on a GPU
        monkeypatch.setattr(conv, "_dot_precision", lambda x: "tf32" if x.dtype == torch.float32 else "ieee")
    rng = random.Random(f"{dtype}-{math}-{draw}")
    x_shape, w_shape, stride, padding, dilation, groups = conv.random_geometry(rng, max_hw=8)
    layout = rng.choice(["contiguous", "channels_last", "strided"])
    x = testing.make_tensor(x_shape, dtype, layout=layout, requires_grad=True)
    w = testing.make_tensor(w_shape, dtype, layout=rng.choice(["contiguous", "channels_last"]),
                            scale=w_shape[1] ** -0.5, requires_grad=True)
    bias = testing.make_tensor((w_shape[0],), dtype, requires_grad=True) if rng.random() < 0.7 else None
    residual = None
    if rng.random() < 0.4:
        shape = conv.reference(x.detach(), w.detach(), None, stride, padding, dilation, groups).shape
        residual = testing.make_tensor(shape, dtype, layout=layout, requires_grad=True)
    with bigkern.use_backend("cuda"), bigkern.record() as calls:
        check(conv.compare_with_reference(x, w, bias, stride, padding, dilation, groups, rng.choice(ACTIVATIONS),
                                          residual))
    served = {op for op, backend in calls if backend == "cuda"}
    assert {"conv2d", "conv2d_input_grad", "conv2d_weight_grad"} <= served, calls
    assert all(backend == "cuda" for _, backend in calls), calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_outputs_that_read_only_padding(emulated, dtype):
    """Every output column's taps all in the padding (random_geometry never draws this)."""
    x = testing.make_tensor((2, 3, 3, 1), dtype, requires_grad=True)
    w = testing.make_tensor((4, 3, 3, 1), dtype, scale=0.3, requires_grad=True)
    b = testing.make_tensor((4,), dtype, requires_grad=True)
    with bigkern.use_backend("cuda"):
        check(conv.compare_with_reference(x, w, b, (1, 2), (1, 1), (2, 2), 1, "relu"))
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_resnet_sized_layer_spans_several_tiles(emulated, dtype):
    """More than one 128 x 64 output tile, a reduction of several 32-wide steps and a weight
    gradient split over pixels: the tiling and accumulation across blocks, not just one block."""
    x = testing.make_tensor((2, 40, 9, 9), dtype, layout="channels_last", requires_grad=True)
    w = testing.make_tensor((70, 40, 3, 3), dtype, layout="channels_last", scale=(40 * 9) ** -0.5,
                            requires_grad=True)
    bias = testing.make_tensor((70,), dtype, requires_grad=True)
    with bigkern.use_backend("cuda"):
        check(conv.compare_with_reference(x, w, bias, 1, 1, 1, 1, "relu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "leaky_relu", "none"])
@pytest.mark.parametrize("shape,dim,layout", EPILOGUE_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_bias_act_forward_and_backward(emulated, dtype, activation, shape, dim, layout):
    """bias_act's CUDA kernels (16-byte packed forward, row and column backward reductions) over
    the storage walks tests/test_epilogue.py gives the Triton kernels."""
    x = testing.make_tensor(shape, dtype, layout=layout, scale=2.0, requires_grad=True)
    bias = testing.make_tensor((shape[dim],), dtype, requires_grad=True)
    with bigkern.use_backend("cuda"), bigkern.record() as calls:
        check(epilogue.compare_with_reference(x, bias, activation, dim))
    assert calls[("bias_act", "cuda")] and calls[("bias_act_backward", "cuda")], calls
