"""conv2d (bigkern/ops/conv.py): every backend against float64, forward and every gradient, over
randomized geometry (stride, padding, dilation, groups, odd sizes), both memory formats and every
epilogue; the drop-in nn.Conv2d; torch.library checks; torch's errors for bad input."""

import math
import random

import numpy as np
import pytest
import torch

import bigkern
from bigkern import dispatch, memory
from bigkern.nn import functional as F
from bigkern.ops import conv, epilogue
from bigkern.testing import make_tensor
from conftest import DEVICE, backend_skip_reason


@pytest.fixture(autouse=True)
def torch_cpu_conv_without_onednn():
    """torch's CPU convolution through oneDNN segfaults on some grouped channels_last fp32 geometries
    (torch 2.11 and 2.14; e.g. x (3, 3, 3, 1) and w (21, 1, 2, 1), both channels_last, stride 2,
    padding (0, 1), dilation (1, 2), groups 3), which the random geometries draw now and then: the
    references and the torch backend take torch's native CPU convolution here instead."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield

ACTIVATIONS = [None if a == "none" else a for a in epilogue.ACTIVATIONS]
LAYOUTS = ["contiguous", "channels_last"]
CPU_DTYPES = [torch.float32, torch.float16]


def assert_all_ok(comparisons, description=""):
    bad = [str(c) for c in comparisons if not c.ok]
    assert not bad, f"{description}: " + "; ".join(bad)


def make_case(x_shape, w_shape, dtype, *, layout="contiguous", weight_layout=None, bias=True, residual_shape=None,
              residual_layout="contiguous", requires_grad=True):
    x = make_tensor(x_shape, dtype, DEVICE, layout=layout, requires_grad=requires_grad)
    # weights scaled like torch's default init, so outputs stay O(1) in fp16
    w = make_tensor(w_shape, dtype, DEVICE, layout=weight_layout or layout,
                    scale=1 / math.sqrt(math.prod(w_shape[1:]) or 1), requires_grad=requires_grad)
    b = make_tensor((w_shape[0],), dtype, DEVICE, requires_grad=requires_grad) if bias else None
    r = None
    if residual_shape is not None:
        r = make_tensor(residual_shape, dtype, DEVICE, layout=residual_layout, requires_grad=requires_grad)
    return x, w, b, r


def output_shape(x_shape, w_shape, stride, padding, dilation, groups):
    x = torch.empty(x_shape, device="meta")
    return tuple(torch.nn.functional.conv2d(x, torch.empty(w_shape, device="meta"), None, stride, padding, dilation,
                                            groups).shape)


def random_case(rng, dtype):
    """A random geometry, layout, epilogue, bias and residual; (description, args for compare)."""
    x_shape, w_shape, stride, padding, dilation, groups = conv.random_geometry(rng)
    if rng.random() < 0.15:  # sometimes more channels than a reduction tile: the per-tap paths
        x_shape = (x_shape[0], 17 * groups) + x_shape[2:]
        w_shape = (17 * groups, 17) + w_shape[2:]
    layout, weight_layout = rng.choice(LAYOUTS), rng.choice(LAYOUTS)
    activation = rng.choice(ACTIVATIONS)
    residual_shape = None
    if rng.random() < 0.4:
        residual_shape = output_shape(x_shape, w_shape, stride, padding, dilation, groups)
    x, w, b, r = make_case(x_shape, w_shape, dtype, layout=layout, weight_layout=weight_layout,
                           bias=rng.random() < 0.7, residual_shape=residual_shape,
                           residual_layout=rng.choice(LAYOUTS))
    description = (f"x{list(x_shape)} {layout} w{list(w_shape)} {weight_layout} stride={stride} padding={padding} "
                   f"dilation={dilation} groups={groups} activation={activation} bias={b is not None} "
                   f"residual={r is not None}")
    return description, (x, w, b, stride, padding, dilation, groups, activation, r)


# ---------------------------------------------------------------------------------------------
# Forward and every gradient against float64.

@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("draw", range(8))
def test_random_geometry_matches_fp64(backend, dtype, draw, fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(2):
        description, args = random_case(rng, dtype)
        assert_all_ok(conv.compare_with_reference(*args), description)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tf32", [True, False])
def test_random_geometry_on_gpu(backend, dtype, tf32, fresh_seed):
    if dtype != torch.float32 and not tf32:
        pytest.skip("the TF32 policy only concerns float32")
    rng = random.Random(fresh_seed)
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        for _ in range(6):
            description, args = random_case(rng, dtype)
            assert_all_ok(conv.compare_with_reference(*args), description)
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [
    ((4, 64, 28, 28), (64, 64, 3, 3), 1, 1, 1),
    ((4, 256, 28, 28), (512, 256, 1, 1), 2, 0, 1),
    ((2, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1),
    ((4, 144, 28, 28), (144, 1, 3, 3), 1, 1, 144),
], ids=["3x3", "1x1s2", "stem7x7", "depthwise"])
def test_resnet_sized_layers_on_gpu(backend, dtype, case):
    x_shape, w_shape, stride, padding, groups = case
    residual_shape = output_shape(x_shape, w_shape, stride, padding, 1, groups)
    x, w, b, r = make_case(x_shape, w_shape, dtype, layout="channels_last", residual_shape=residual_shape,
                           residual_layout="channels_last")
    assert_all_ok(conv.compare_with_reference(x, w, b, stride, padding, 1, groups, "relu", r))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_epilogue(backend, activation):
    layout = LAYOUTS[ACTIVATIONS.index(activation) % 2]  # each layout with half of them; random tests mix the rest
    x_shape, w_shape = (2, 6, 5, 7), (8, 3, 3, 2)
    residual_shape = output_shape(x_shape, w_shape, (2, 1), (1, 0), 1, 2)
    args = make_case(x_shape, w_shape, torch.float32, layout=layout, residual_shape=residual_shape,
                     residual_layout=layout)
    x, w, b, r = args
    assert_all_ok(conv.compare_with_reference(x, w, b, (2, 1), (1, 0), 1, 2, activation, r, negative_slope=0.2))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_many_channels_span_several_tiles(backend, dtype):
    """More pixels, output channels and input channels than one tile holds, in every kernel."""
    x, w, b, r = make_case((2, 20, 9, 8), (18, 20, 2, 2), dtype, layout="channels_last", weight_layout="contiguous",
                           residual_shape=(2, 18, 5, 9))
    assert_all_ok(conv.compare_with_reference(x, w, b, (2, 1), 1, 1, 1, "silu", r))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise(backend, multiplier):
    x, w, b, _ = make_case((2, 5, 7, 6), (5 * multiplier, 1, 3, 3), torch.float32, layout="channels_last")
    assert_all_ok(conv.compare_with_reference(x, w, b, 1, 1, 1, 5, "relu"))
    # the depthwise kernel's own index math along each axis: unequal dilations and paddings (random
    # geometries reached it about one run in six: a height dilation used for the width passed)
    for dilation, padding in (((1, 2), (2, 1)), ((2, 1), (1, 2))):
        x, w, b, _ = make_case((2, 5, 9, 8), (5 * multiplier, 1, 3, 2), torch.float32, layout="channels_last")
        assert_all_ok(conv.compare_with_reference(x, w, b, 1, padding, dilation, 5, "relu"))


def test_stride_larger_than_kernel_and_dilated_dgrad(backend):
    """Input pixels no output reads (gradient exactly 0) and residue classes without taps."""
    x, w, b, _ = make_case((2, 3, 11, 10), (4, 3, 2, 2), torch.float32)
    assert_all_ok(conv.compare_with_reference(x, w, b, (3, 4), (1, 0), (2, 3), 1, "tanh"))


def test_outputs_that_read_only_padding(backend):
    """An axis along which every output's taps all fall in the padding: the output is the bias and
    epilogue alone, and the input and weight gradients are exactly zero (random_geometry avoids
    this geometry: torch's CPU conv2d crashes on it with channels_last and a bias)."""
    assert conv.reads_only_padding(1, 1, 2, 1, 2) and not conv.reads_only_padding(2, 1, 2, 1, 2)
    x, w, b, r = make_case((2, 3, 3, 1), (4, 3, 3, 1), torch.float32, residual_shape=(2, 4, 1, 2))
    assert_all_ok(conv.compare_with_reference(x, w, b, (1, 2), (1, 1), (2, 2), 1, "silu", r))
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0) and torch.all(b.grad != 0)
    # channels_last with a bias: where torch 2.14's CPU conv2d crashes, bigkern's output is the bias
    x, w, b, _ = make_case((2, 2, 3, 1), (1, 2, 3, 1), torch.float32, layout="channels_last", requires_grad=False)
    y = F.conv2d(x, w, b, (1, 2), (1, 1), (2, 2))
    assert y.shape == (2, 1, 1, 2) and torch.equal(y, b.view(1, 1, 1, 1).expand(2, 1, 1, 2))


@pytest.mark.parametrize("padding", ["same", "valid", 0, (2, 1)])
def test_padding_forms(backend, padding):
    x, w, b, _ = make_case((1, 3, 6, 7), (4, 3, 4, 3), torch.float32)
    assert_all_ok(conv.compare_with_reference(x, w, b, 1, padding, (1, 2), 1, "gelu"))


def test_unbatched_input(backend):
    x, w, b, r = make_case((3, 5, 6), (4, 3, 3, 3), torch.float32, residual_shape=(4, 3, 4))
    assert_all_ok(conv.compare_with_reference(x, w, b, 1, 0, 1, 1, "relu", r))


def test_non_contiguous_views_and_broadcast_residual(backend):
    big = make_tensor((2, 8, 9, 14), requires_grad=True)
    x = big[:, 1:6:2, :, ::2]  # (2, 3, 9, 7), neither contiguous nor dense
    w = make_tensor((4, 7, 3, 3), requires_grad=True)
    weight = w[:, 2:5]  # a slice along input channels
    bias = make_tensor((8,), requires_grad=True)[::2]
    residual = make_tensor((4, 1, 1), requires_grad=True)  # broadcast over batch and pixels
    y = F.conv2d(x, weight, bias, padding=1, activation="leaky_relu", residual=residual)
    assert y.shape == (2, 4, 9, 7)
    comparisons = conv.compare_with_reference(x.detach().requires_grad_(), weight.detach().requires_grad_(),
                                              bias.detach().requires_grad_(), 1, 1, 1, 1, "leaky_relu",
                                              residual.detach().requires_grad_())
    assert_all_ok(comparisons)
    assert residual.grad is None  # the copy above took the gradient, not the original leaf
    y.sum().backward()
    assert residual.grad.shape == (4, 1, 1) and big.grad is not None


@pytest.mark.parametrize("which", ["input", "weight", "bias", "residual"])
def test_each_gradient_alone(backend, which):
    """Only one operand requires grad: the others' kernels are skipped, the result still right."""
    x, w, b, r = make_case((2, 4, 6, 5), (6, 4, 3, 3), torch.float32, residual_shape=(2, 6, 4, 3),
                           requires_grad=False)
    dict(input=x, weight=w, bias=b, residual=r)[which].requires_grad_()
    for activation in (None, "relu"):
        for t in (x, w, b, r):
            t.grad = None
        assert_all_ok(conv.compare_with_reference(x, w, b, 1, 0, 1, 1, activation, r), f"{which} {activation}")


def test_backward_recomputes_z_when_not_saved(backend):
    """An autograd call the forward did not prepare for (save_z=False) recomputes conv + residual + bias."""
    x, w, b, r = make_case((2, 3, 5, 6), (4, 3, 3, 3), torch.float32, residual_shape=(2, 4, 3, 4))
    args = (x, w, b, r, [1, 1], [0, 0, 0, 0], [1, 1], 1, epilogue.activation_code("gelu"), 0.01)
    y = conv.conv2d_op(*args, False)[0]
    grad = make_tensor(y.shape)
    y.backward(grad)
    grads = [t.grad for t in (x, w, b, r)]
    for t in (x, w, b, r):
        t.grad = None
    conv.conv2d_op(*args, True)[0].backward(grad)
    for a, b_ in zip(grads, (x.grad, w.grad, b.grad, r.grad)):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_fp16_gradient_is_taken_where_the_output_was(backend, activation):
    """fp16, z = conv + bias just above relu's kink while conv alone rounds to -bias: the output is
    positive, and so must be the derivative backward takes (it once rebuilt z from the rounded
    conv plus the bias, landing on 0: gradient 0 under a positive output)."""
    x = torch.ones((1, 2, 1, 1), dtype=torch.float16, device=DEVICE)
    w = torch.tensor([0.5, 2.0 ** -13], dtype=torch.float16, device=DEVICE).view(1, 2, 1, 1).requires_grad_()
    b = torch.tensor([-0.5], dtype=torch.float16, device=DEVICE).requires_grad_()
    y = F.conv2d(x, w, b, activation=activation)
    assert y.item() == 2.0 ** -13  # torch's own fp16 conv2d(x, w, b) too
    y.backward(torch.ones_like(y))
    assert b.grad.item() == 1.0 and w.grad.flatten().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", None])
def test_nan_and_inf_propagate_as_in_torch(backend, activation):
    x, w, b, _ = make_case((2, 3, 6, 5), (4, 3, 3, 3), torch.float32)
    with torch.no_grad():
        x[0, 1, 2, 2] = float("nan")
        x[1, 0, 4, 1] = float("inf")
    assert_all_ok(conv.compare_with_reference(x, w, b, 1, 1, 1, 1, activation))


def test_empty_batch_and_no_input_channels(backend):
    x, w, b, _ = make_case((0, 3, 5, 5), (4, 3, 3, 3), torch.float32)
    y = F.conv2d(x, w, b, activation="relu")
    assert y.shape == (0, 4, 3, 3)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))



def test_output_memory_format_follows_torch():
    for x_layout in LAYOUTS:
        for w_layout in LAYOUTS:
            x = make_tensor((2, 3, 5, 6), layout=x_layout)
            w = make_tensor((4, 3, 3, 3), layout=w_layout)
            expected = torch.nn.functional.conv2d(x, w)
            assert conv.same_storage_order(F.conv2d(x, w), expected), (x_layout, w_layout)
            assert conv.output_channels_last(x, w) == expected.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_rule_matches_torch_on_ambiguous_strides():
    from torch._prims_common import suggest_memory_format

    shapes = [(2, 3, 5, 6), (1, 3, 1, 1), (2, 1, 4, 4), (3, 5, 1, 7), (1, 1, 1, 1), (2, 4, 3, 1)]
    for shape in shapes:
        for t in (torch.empty(shape), torch.empty(shape).contiguous(memory_format=torch.channels_last),
                  torch.empty(shape).transpose(2, 3), torch.empty(shape)[:, :, ::2]):
            assert conv.suggests_channels_last(t) == (suggest_memory_format(t) == torch.channels_last), \
                (t.shape, t.stride())


# ---------------------------------------------------------------------------------------------
# Drop-in module.

@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_is_a_drop_in(backend, padding_mode):
    kwargs = dict(stride=(1, 2), padding=(1, 2), dilation=1, groups=2, bias=True, padding_mode=padding_mode)
    ours = bigkern.nn.Conv2d(4, 6, (3, 2), **kwargs)
    theirs = torch.nn.Conv2d(4, 6, (3, 2), **kwargs)
    assert isinstance(ours, torch.nn.Conv2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = make_tensor((2, 4, 7, 9), requires_grad=True)
    x_torch = x.detach().clone().requires_grad_()
    y, y_torch = ours(x), theirs(x_torch)
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_torch.sum().backward()
    torch.testing.assert_close(x.grad, x_torch.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)


def test_class_swap_protocol():
    assert bigkern.nn.DROP_INS[torch.nn.Conv2d] is bigkern.nn.Conv2d
    module = torch.nn.Conv2d(3, 5, 3, padding="same", bias=False)
    x = make_tensor((2, 3, 6, 5))
    expected = module(x)
    keys = list(module.state_dict())
    module.__class__ = bigkern.nn.Conv2d
    torch.testing.assert_close(module(x), expected)
    assert list(module.state_dict()) == keys
    assert bigkern.explain(module, x).backend is not None


def test_fused_module_folds_batch_norm():
    conv_module = torch.nn.Conv2d(3, 6, 3, padding=1).double()
    bn = torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    fused = bigkern.nn.FusedConv2d.from_conv(conv_module, bn, "silu")
    x = make_tensor((2, 3, 5, 5), torch.float64)
    torch.testing.assert_close(fused(x), torch.nn.functional.silu(bn(conv_module(x))))
    residual = make_tensor((2, 6, 5, 5), torch.float64)
    torch.testing.assert_close(fused(x, residual), torch.nn.functional.silu(bn(conv_module(x)) + residual))
    # a residual the output would be broadcast up to takes the unfused path, like torch's add
    bigger = make_tensor((3, 2, 6, 5, 5), torch.float64)
    torch.testing.assert_close(fused(x, bigger), torch.nn.functional.silu(bn(conv_module(x)) + bigger))
    with pytest.raises(ValueError, match="eval"):
        bigkern.nn.FusedConv2d.from_conv(conv_module, bn.train())


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile without graph breaks, export.

@pytest.mark.parametrize("op_backend", ["triton", "torch"])
def test_opcheck(op_backend):
    if backend_skip_reason(op_backend):
        pytest.skip(backend_skip_reason(op_backend))
    x, w, b, r = make_case((2, 4, 5, 6), (6, 2, 3, 2), torch.float32, layout="channels_last",
                           residual_shape=(2, 6, 4, 3))
    geometry = ([1, 2], [1, 0, 0, 1], [1, 1], 2)  # padding: top 1, right 1
    grad = make_tensor((2, 6, 4, 3))
    with bigkern.use_backend(op_backend), memory.poisoned_outputs(False):
        for save_z in (False, True):
            torch.library.opcheck(torch.ops.bigkern.conv2d.default, (x, w, b, r, *geometry, 2, 0.01, save_z))
        torch.library.opcheck(torch.ops.bigkern.conv2d_input_grad.default, (grad, x.detach(), w.detach(), *geometry))
        torch.library.opcheck(torch.ops.bigkern.conv2d_weight_grad.default,
                              (grad, x.detach(), w.detach(), *geometry, True))


def test_torch_compile_fullgraph_and_export():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = bigkern.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1, activation="relu", residual=x)
            return self.conv(y).sum(dim=1)

    model = Block()
    x = make_tensor((2, 4, 5, 5), requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    expected_grad = x.grad
    x.grad = None
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    result = compiled(x)
    torch.testing.assert_close(result, expected)
    result.sum().backward()
    torch.testing.assert_close(x.grad, expected_grad)
    exported = torch.export.export(model, (x.detach(),))
    assert any("bigkern.conv2d" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x.detach()), expected.detach())


def test_explain_and_forced_backends():
    x, w, b, _ = make_case((1, 3, 5, 5), (2, 3, 3, 3), torch.float32)
    assert "conv2d" in str(bigkern.explain(F.conv2d, x, w, b, activation="relu"))
    assert bigkern.explain(F.conv2d, x[0], w).backend is not None  # unbatched
    with bigkern.use_backend("cuda"):
        if dispatch.cuda_unsupported(x):
            with pytest.raises(bigkern.UnsupportedError, match="conv2d"):
                F.conv2d(x, w, b)
    with bigkern.use_backend("triton"):
        with pytest.raises(bigkern.UnsupportedError, match="float64"):
            F.conv2d(x.double(), w.double())


def test_cuda_ops_are_registered():
    from bigkern import _ext

    if _ext.extension() is None:
        pytest.skip(f"bigkern._C: {_ext.unavailable_reason()}")
    for name in ("conv2d_forward_cuda", "conv2d_input_grad_cuda", "conv2d_weight_grad_cuda"):
        assert hasattr(torch.ops.bigkern, name), name


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception types, naming the argument.

def _bad_calls():
    x, w = make_tensor((2, 4, 5, 7)), make_tensor((6, 4, 3, 3))
    return [
        ("input", (x, make_tensor((6, 3, 3, 3))), {}),  # channels
        ("weight", (x, make_tensor((5, 2, 3, 3))), dict(groups=2)),  # K not divisible by groups
        ("input", (make_tensor((2, 5, 5, 7)), make_tensor((6, 2, 3, 3))), dict(groups=2)),  # C != Cg * groups
        ("groups", (x, w), dict(groups=0)),
        ("weight", (x, make_tensor((6, 4, 6, 3))), {}),  # kernel larger than the padded input
        ("weight", (x, w), dict(dilation=3)),
        ("weight", (x, w.double()), {}),  # dtype
        ("bias", (x, w, make_tensor((6,), torch.float64)), {}),
        ("bias", (x, w, make_tensor((5,))), {}),
        ("bias", (x, w, make_tensor((6, 1))), {}),
        ("stride", (x, w), dict(stride=0)),
        ("padding", (x, w), dict(padding=-1)),
        ("dilation", (x, w), dict(dilation=0)),
        ("padding", (x, w), dict(stride=2, padding="same")),
        ("padding", (x, w), dict(padding="full")),
        ("stride", (x, w), dict(stride=(1, 1, 1))),
        ("input", (x[None], w), {}),
        ("input", (x[0, 0], w), {}),
        ("input", ([1.0], w), {}),
        ("weight", (x, 3), {}),
        ("stride", (x, w), dict(stride=1.5)),
        ("groups", (x, w), dict(groups=1.0)),
        ("padding", (x, w), dict(padding=torch.tensor([1, 1]))),  # a tensor is an int only when 0-d
        ("input", (make_tensor((2, 4, 0, 7)), w), dict(padding=2)),  # empty spatial dims, though padded
        ("weight", (x, make_tensor((6, 4, 0, 3))), {}),  # an empty kernel (Triton returned the bias)
    ]


def test_integers_torch_accepts():
    """stride/padding/dilation/groups as numpy integers or 0-d integer tensors, as torch's argument
    parser takes them (configs read through numpy), for the function and the module."""
    x, w, b = make_tensor((2, 4, 5, 7)), make_tensor((6, 2, 3, 3)), make_tensor((6,))
    expected = torch.nn.functional.conv2d(x, w, b, 2, 1, 1, 2)
    for stride, padding, dilation, groups in ((np.int64(2), np.int32(1), np.int64(1), np.int64(2)),
                                              ((torch.tensor(2), 2), torch.tensor(1), [np.int8(1)], torch.tensor(2))):
        got = F.conv2d(x, w, b, stride, padding, dilation, groups)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    module = bigkern.nn.Conv2d(4, 6, np.int64(3), stride=np.int64(2), padding=np.int64(1), groups=np.int64(2))
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)
    meta = bigkern.nn.Conv2d(4, 6, 3).to("meta")
    assert meta(torch.empty((2, 4, 5, 7), device="meta")).shape == (2, 6, 3, 5)


def test_bad_input_raises_torchs_exception_naming_the_argument():
    for argument, args, kwargs in _bad_calls():
        with pytest.raises(Exception) as theirs:
            torch.nn.functional.conv2d(*args, **kwargs)
        with pytest.raises(theirs.type, match=f"'{argument}'"):
            F.conv2d(*args, **kwargs)


def test_bad_epilogue_arguments():
    x, w = make_tensor((2, 4, 5, 7)), make_tensor((6, 4, 3, 3))
    with pytest.raises(ValueError, match="activation"):
        F.conv2d(x, w, activation="swish")
    with pytest.raises(RuntimeError, match="'residual'"):
        F.conv2d(x, w, residual=make_tensor((2, 6, 4, 4)))
    with pytest.raises(RuntimeError, match="'residual'"):
        F.conv2d(x, w, residual=make_tensor((2, 6, 3, 5), torch.float64))
    with pytest.raises(TypeError, match="'residual'"):
        F.conv2d(x, w, residual=1.0)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'weight'"):
            F.conv2d(x, w.cuda())


def test_benchmark_suite_runs_end_to_end_on_cpu(tmp_path):
    import json

    from bigkern import benchmark

    layer = dict(name="l1.1x1b", in_channels=3, out_channels=4, kernel=1, stride=1, padding=0, in_hw=5,
                 residual=True, quick=True)
    shapes = {"conv": {"batches": [2], "resnet50": [layer], "other": []}}
    shapes_path = tmp_path / "shapes.json"
    shapes_path.write_text(json.dumps(shapes))
    rc = benchmark.main(["--cpu", "--quick", "--family", "conv", "--shapes", str(shapes_path), "--results",
                         str(tmp_path / "results"), "--provider", "bigkern-triton", "bigkern-cuda", "torch-eager"])
    assert rc == 0
    [path] = (tmp_path / "results").glob("*/*.json")
    rows = json.loads(path.read_text())["rows"]
    statuses = {(r["mode"], r["provider"]): r["status"] for r in rows}
    expected_triton = "ok" if backend_skip_reason("triton", "cpu") is None else "unavailable"  # timed on the CPU
    assert statuses[("forward", "bigkern-triton")] == expected_triton
    assert statuses[("forward+backward", "torch-eager")] == "ok"
    assert statuses[("forward", "bigkern-cuda")] == "unavailable"
    assert all(r["flops"] == 2 * 2 * 4 * 5 * 5 * 3 * (1 if r["mode"] == "forward" else 3) for r in rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_casts_like_torch(dtype):
    """Under autocast conv2d runs in the lower precision, as torch's does; a residual of another
    dtype is added after the conv, with torch's type promotion."""
    x, w, b, r = make_case((2, 3, 5, 6), (4, 3, 3, 3), torch.float32, residual_shape=(2, 4, 3, 4))
    with torch.autocast(DEVICE, dtype=dtype):
        y = F.conv2d(x, w, b, activation="relu")
        expected = torch.relu(torch.nn.functional.conv2d(x, w, b))
        assert y.dtype == expected.dtype == dtype
        torch.testing.assert_close(y, expected, rtol=1e-2, atol=2e-2)
        y = F.conv2d(x, w, b, activation="relu", residual=r)
        expected = torch.relu(torch.nn.functional.conv2d(x, w, b) + r)
        assert y.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(y, expected, rtol=1e-2, atol=2e-2)
        y.sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_unbatched_input_with_a_batched_residual_is_refused(backend):
    """An unbatched call's output is (K, P, Q): a 4-d residual would broadcast it up, which conv2d's
    fused residual refuses (as for batched input) -- it returned a 3-d result, dropping the dim."""
    x, w = make_tensor((3, 6, 6), device=DEVICE), make_tensor((4, 3, 3, 3), device=DEVICE)
    with pytest.raises(RuntimeError, match="'residual'.*unbatched"):
        F.conv2d(x, w, padding=1, residual=make_tensor((1, 4, 6, 6), device=DEVICE))
    y = F.conv2d(x, w, padding=1, residual=make_tensor((4, 6, 6), device=DEVICE))
    assert y.shape == (4, 6, 6)


def test_no_input_channels_is_torchs_result(backend):
    """Nothing for a kernel to compute: torch's conv2d serves (a forced triton/cuda says so)."""
    x, w, b = torch.randn(2, 0, 5, 5, device=DEVICE), torch.randn(4, 0, 3, 3, device=DEVICE), torch.randn(4, device=DEVICE)
    if backend != "torch":
        with pytest.raises(bigkern.UnsupportedError, match="no input channels"):
            F.conv2d(x, w, b)
        return
    for bias in (None, b):
        expected = torch.relu(torch.nn.functional.conv2d(x, w, bias))
        with bigkern.record() as calls:
            y = F.conv2d(x, w, bias, activation="relu")
        torch.testing.assert_close(y, expected)
        assert calls == {("conv2d", "torch"): 1}


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_bias_and_residual_may_change_in_place_before_backward(backend, activation):
    """torch's conv and `+` keep neither the bias nor the residual for backward: changing them in
    place after the forward is fine there, and gives the same gradients here."""
    x, w = make_tensor((2, 3, 6, 6), requires_grad=True), make_tensor((4, 3, 3, 3), requires_grad=True)
    b, r = make_tensor((4,), requires_grad=True), make_tensor((1, 4, 4, 4), requires_grad=True)
    grads = []
    for change in (False, True):
        bias, residual = b * 1, r * 1
        y = F.conv2d(x, w, bias, activation=activation, residual=residual)
        if change:
            with torch.no_grad():
                bias.add_(1.0)
                residual.mul_(2.0)
        grads.append(torch.autograd.grad(y.sum(), (x, w, b, r)))
    for unchanged, changed in zip(*grads):
        torch.testing.assert_close(changed, unchanged)


def test_fused_conv_takes_int_attributes_as_torchs_conv_does(backend):
    """torch's Conv2d runs with `conv.padding = 1` (or stride, dilation) set after construction;
    FusedConv2d's residual path read them as pairs (TypeError)."""
    x, r = make_tensor((2, 3, 6, 6)), make_tensor((2, 4, 3, 3))
    for attr in ("padding", "stride", "dilation"):
        fused = bigkern.nn.FusedConv2d(3, 4, 3, padding=1, stride=2, activation="relu")
        setattr(fused, attr, 2 if attr == "stride" else 1)
        expected = torch.relu(torch.nn.Conv2d._conv_forward(fused, x, fused.weight, fused.bias) + r)
        torch.testing.assert_close(fused(x, r), expected, msg=attr)


def test_complex_inputs_are_torchs_own():
    """torch's CPU conv2d computes in complex64; so does bigkern's auto (torch's path), poisoned
    outputs included (the poison of a complex dtype crashed: torch.iinfo)."""
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.complex64), torch.randn(3, 2, 3, 3, dtype=torch.complex64)
    with memory.poisoned_outputs():
        torch.testing.assert_close(F.conv2d(x, w, padding=1), torch.nn.functional.conv2d(x, w, padding=1))


def test_non_strided_layouts_are_torchs_own():
    """A oneDNN-layout input (torch.utils.mkldnn's CPU inference) gets torch's conv and its layout
    (bigkern's copied torch's result into a dense tensor and raised); a sparse one torch's error;
    a forced kernel backend says why it cannot serve, instead of failing inside the launch."""
    x, w = make_tensor((1, 2, 5, 5)), make_tensor((3, 2, 3, 3))
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.functional.conv2d(x.to_sparse(), w)
    with pytest.raises(theirs.type):
        F.conv2d(x.to_sparse(), w)
    with bigkern.use_backend("triton"), pytest.raises(bigkern.UnsupportedError, match="strided"):
        F.conv2d(x.to_sparse(), w)
    if torch.backends.mkldnn.is_available():
        with torch.backends.mkldnn.flags(enabled=True):  # (torch's test utilities may have turned it off)
            got, expected = F.conv2d(x.to_mkldnn(), w), torch.nn.functional.conv2d(x.to_mkldnn(), w)
        assert got.layout == expected.layout == torch._mkldnn
        torch.testing.assert_close(got.to_dense(), expected.to_dense())


def test_negative_slope_is_a_number_as_torch_takes_it():
    x, w = make_tensor((1, 3, 5, 5)), make_tensor((4, 3, 3, 3))
    for slope in ("0.1", "nan", torch.tensor([0.1]), True):
        with pytest.raises(TypeError, match="'negative_slope'"):
            F.conv2d(x, w, activation="leaky_relu", negative_slope=slope)
        with pytest.raises(TypeError, match="'negative_slope'"):
            bigkern.nn.FusedConv2d(3, 4, 3, activation="leaky_relu", negative_slope=slope)
    expected = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(x, w), 0.2)
    torch.testing.assert_close(F.conv2d(x, w, activation="leaky_relu", negative_slope=np.float32(0.2)), expected)


def test_weight_gradient_laid_out_as_torchs(backend):
    """torch lays grad_weight out channels_last when the input is (as its output): autograd.grad
    and non-leaf weights see that layout."""
    x = make_tensor((2, 3, 7, 5), device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    w = make_tensor((4, 3, 3, 3), device=DEVICE, requires_grad=True)
    grad_w = torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), w)[0]
    expected = torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1).sum(), w)[0]
    assert grad_w.stride() == expected.stride()
    torch.testing.assert_close(grad_w, expected)


@pytest.mark.parametrize("x_layout,w_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous")])
def test_input_gradient_laid_out_as_torchs(backend, x_layout, w_layout):
    """torch lays grad_input out channels_last when either the input or the weight is: a leaf's .grad
    is restrided to the leaf's layout, which hid the difference; autograd.grad (and a non-leaf input,
    and the fake op under torch.compile) see it."""
    x = make_tensor((2, 3, 7, 5), device=DEVICE, layout=x_layout).requires_grad_()
    w = make_tensor((4, 3, 3, 3), device=DEVICE, layout=w_layout).requires_grad_()
    grad_x = torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), x)[0]
    expected = torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1).sum(), x)[0]
    assert grad_x.stride() == expected.stride()
    torch.testing.assert_close(grad_x, expected)


def test_triton_refuses_what_its_indices_or_grid_cannot_address():
    """Forced Triton refuses (with the reason) a tensor spanning 2^31 elements or more -- its
    offsets are int32 and wrapped -- and a dgrad whose groups x stride phases exceed the 65535
    programs CUDA allows along a grid's second dimension (a GPU launch failed)."""
    reason = backend_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    # rows 2^30 elements apart in a 4 GiB (virtual, barely touched) buffer
    x = torch.empty(2**31 + 64, dtype=torch.float16).as_strided((1, 1, 3, 3), (0, 0, 2**30, 1))
    x.copy_(torch.randn(1, 1, 3, 3))
    w = torch.randn(2, 1, 1, 1, dtype=torch.float16)
    with bigkern.use_backend("triton"):  # (explain stops before any kernel: a regression reads no wrapped address)
        explanation = bigkern.explain(F.conv2d, x, w)
    assert explanation.backend is None and "2^31" in explanation.reasons["triton"]
    assert conv._triton_size_reason([x[:, :, :2]]) is None  # 2^30 + 3: fits
    channels = 16384  # depthwise, stride 2: 16384 x 4 phases
    x = make_tensor((1, channels, 2, 2), requires_grad=True)
    w = make_tensor((channels, 1, 1, 1), requires_grad=True)
    with bigkern.use_backend("triton"):
        y = F.conv2d(x, w, stride=2, groups=channels)  # the forward's grid holds it
        with pytest.raises(bigkern.UnsupportedError, match="65535"):
            y.sum().backward()
