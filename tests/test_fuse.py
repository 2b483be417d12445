"""bigkern.fuse: fused models equal the unfused ones (float64), for ResNet blocks, the example CNN,
functional-style models, models fx cannot trace, and patterns that must not be fused."""

import copy

import pytest
import torch
from torch import nn

import bigkern
from bigkern.nn import FusedConv2d
from bigkern.testing import make_tensor
from conftest import DEVICE

Fn = nn.functional


def randomize_batch_norms(model):
    """Running statistics and affine parameters far from the identity, so folding is tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck block (1x1 -> 3x3 -> 1x1, residual)."""

    def __init__(self, channels, width):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + x)


def example_cnn(in_channels=1, classes=10):
    """The example CNN: conv 3x3 32 -> relu -> maxpool -> conv 64 -> relu -> maxpool -> conv 64 -> relu
    -> dense 64 -> dense 10 (for 28x28 input)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, classes))


def fused_equals_original(model, x, backend="auto", atol=1e-10, expect=None):
    """Fuse `model` (left intact), compare outputs (and, in training mode, input gradients)."""
    original = copy.deepcopy(model)
    fused = bigkern.fuse(model)
    assert_parameters_untouched(model, original)
    with bigkern.use_backend(backend):
        x1 = x.detach().clone().requires_grad_(model.training)
        y = fused(x1)
    x2 = x.detach().clone().requires_grad_(model.training)
    expected = original(x2)
    torch.testing.assert_close(y, expected, atol=atol, rtol=atol)
    if model.training:
        with bigkern.use_backend(backend):
            y.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=atol)
    found = sum(isinstance(m, FusedConv2d) for m in fused.modules())
    if expect is not None:
        assert found == expect, f"expected {expect} fused convolutions, found {found}:\n{fused}"
    return fused


def assert_parameters_untouched(model, original):
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), f"fuse changed the original's {name}"


@pytest.mark.parametrize("stride,in_channels", [(1, 6), (2, 4)])
def test_resnet_basic_block(stride, in_channels):
    block = randomize_batch_norms(BasicBlock(in_channels, 6, stride)).double().eval()
    x = make_tensor((2, in_channels, 9, 7), torch.float64, DEVICE)
    fused = fused_equals_original(block, x, expect=3 if stride == 2 else 2)
    # batch norms are folded away; the convolutions keep their names
    keys = fused.state_dict().keys()
    assert not any("bn" in key for key in keys) and "conv1.weight" in keys and "conv2.bias" in keys


def test_resnet_basic_block_with_triton_kernels():
    from conftest import backend_skip_reason

    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    block = randomize_batch_norms(BasicBlock(4, 6, 2)).eval()
    x = make_tensor((2, 4, 7, 6), torch.float32, DEVICE, layout="channels_last")
    fused_equals_original(block, x, backend="triton", atol=1e-4, expect=3)


def test_resnet_bottleneck_block():
    block = randomize_batch_norms(Bottleneck(8, 4)).double().eval()
    fused_equals_original(block, make_tensor((2, 8, 6, 5), torch.float64, DEVICE), expect=3)


def test_example_cnn():
    model = example_cnn().double().eval()
    fused_equals_original(model, make_tensor((3, 1, 28, 28), torch.float64, DEVICE), expect=3)


def test_training_mode_keeps_batch_norm_and_fuses_the_rest():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.SiLU()).double()
    fused = fused_equals_original(model.train(), make_tensor((2, 3, 8, 8), torch.float64, DEVICE), expect=1)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


class Functional(nn.Module):
    """Activations and residual adds as functionals and tensor methods."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)
                                   for mode in ("zeros", "reflect", "zeros", "circular", "zeros", "zeros", "zeros"))

    def forward(self, x):
        c = self.convs
        x = Fn.gelu(c[0](x), approximate="tanh")
        x = torch.add(x, c[1](x)).sigmoid()
        x = Fn.leaky_relu(c[2](x), 0.3)
        x = torch.tanh(x + c[3](x))
        x = c[4](x).relu()
        x = Fn.silu(c[5](x))
        return Fn.gelu(c[6](x) + 1.0)  # a constant: not a residual, and conv output feeds the add only


def test_functional_activations_and_residuals():
    model = Functional().double()
    fused = fused_equals_original(model, make_tensor((2, 4, 5, 6), torch.float64, DEVICE), expect=6)
    activations = sorted(str(m.activation) for m in fused.modules() if isinstance(m, FusedConv2d))
    assert activations == ["gelu_tanh", "leaky_relu", "relu", "sigmoid", "silu", "tanh"]


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; its other children still fuse."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                      nn.GELU())
        self.head = BasicBlock(4, 4)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x)


def test_untraceable_model_fuses_its_children():
    """Its Sequential is left whole: untraced code may iterate or index it (see the taps test)."""
    model = randomize_batch_norms(Untraceable()).double().eval()
    fused = fused_equals_original(model, make_tensor((2, 3, 7, 7), torch.float64, DEVICE), expect=2)
    assert isinstance(fused, Untraceable) and isinstance(fused.head.conv1, FusedConv2d)
    assert [type(m) for m in fused.features] == [type(m) for m in model.features]


class Taps(nn.Module):
    """A feature extractor iterating its Sequential for pre-activation taps, not traceable."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                      nn.ReLU())

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (0, 2):
                taps.append(x)
        if x.mean() > 100:  # data-dependent: fx cannot trace it
            x = x * 0
        return taps


def test_a_sequential_an_untraced_parent_iterates_is_not_fused():
    """Fused across its children, the Sequential's index 0 would give relu(conv(x)), not conv(x)."""
    fused_equals_original(Taps().double().eval(), make_tensor((1, 3, 6, 6), torch.float64, DEVICE), expect=0)


class NotFusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv1(x)
        z = torch.relu(y) + y  # the conv output is used twice
        shared = self.conv2(z)
        return self.conv2(shared) + shared.relu()  # conv2 is called twice


def test_shared_intermediates_are_not_fused():
    model = NotFusable().double().eval()
    fused_equals_original(model, make_tensor((1, 3, 5, 5), torch.float64, DEVICE), expect=0)


def test_fuse_in_place_and_idempotent():
    model = example_cnn().double().eval()
    x = make_tensor((1, 1, 28, 28), torch.float64, DEVICE)
    expected = model(x)
    fused = bigkern.fuse(model, inplace=True)
    assert fused is model and sum(isinstance(m, FusedConv2d) for m in model.modules()) == 3
    torch.testing.assert_close(bigkern.fuse(fused)(x), expected)


def test_patched_model_fuses_like_the_original_and_traces():
    """bigkern.patch's modules are fx leaves to fuse, as torch's are; traced by fx's own tracer, a
    patched conv is one node calling bigkern's conv2d."""
    block = randomize_batch_norms(BasicBlock(4, 6, 2)).double().eval()
    patched = bigkern.patch(copy.deepcopy(block))
    fused_equals_original(patched, make_tensor((2, 4, 7, 6), torch.float64, DEVICE), expect=3)
    traced = torch.fx.symbolic_trace(bigkern.patch(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())).double())
    x = make_tensor((1, 3, 6, 6), torch.float64, DEVICE)
    with bigkern.record() as calls:
        y = traced(x)
    assert calls[("conv2d", "torch")] == 1, dict(calls)
    torch.testing.assert_close(y, traced.get_submodule("0").weight.new_zeros(()).add(
        Fn.relu(Fn.conv2d(x, traced.get_submodule("0").weight, traced.get_submodule("0").bias))))


class InPlaceIntoIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = x * 1.0
        identity = x
        identity += self.conv(x)  # writes into x as well
        return torch.relu(identity) * x


def test_in_place_add_into_the_identity_is_not_fused():
    model = InPlaceIntoIdentity().double().eval()  # (its backward fails in torch: the conv saved x)
    fused_equals_original(model, make_tensor((2, 3, 6, 6), torch.float64, DEVICE), expect=0)


def test_fusing_keeps_the_convs_own_parameters():
    """Without a batch norm to fold, a fused conv holds the very Parameters it replaced: an optimizer
    built before fusing keeps training the model, and tied weights stay tied."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Tanh(), nn.Conv2d(4, 4, 1),
                          nn.GELU()).double()
    model[4].weight = model[2].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fused = bigkern.fuse(model, inplace=True)
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 3
    assert fused[4].weight is fused[2].weight
    fused(make_tensor((2, 3, 6, 6), torch.float64, DEVICE)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in fused.named_parameters())


def test_frozen_batch_norm_folds_only_when_nothing_in_the_chain_trains():
    """Fine-tuning with frozen statistics (a batch norm in eval mode inside a training model): while
    its scale and shift, or the conv's weights, train, it stays -- folded, the optimizer would step
    W * gamma / sigma instead of W and training would take another course; with all frozen, it folds."""
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).double()
    model.train()
    model[1].eval()
    x = make_tensor((2, 3, 6, 6), torch.float64, DEVICE)
    fused = fused_equals_original(model, x, expect=0)
    assert "1.weight" in dict(fused.named_parameters())
    model[1].requires_grad_(False)
    fused = fused_equals_original(model, x, expect=0)
    assert "1.running_mean" in fused.state_dict()
    # the same SGD steps on fused and original give the same model
    original = copy.deepcopy(model)
    steps = [torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01) for m in (fused, original)]
    for _ in range(3):
        for m, optimizer in zip((fused, original), steps):
            optimizer.zero_grad()
            m(x).square().mean().backward()
            optimizer.step()
    torch.testing.assert_close(fused(x), original(x))
    model[0].requires_grad_(False)
    fused = fused_equals_original(model, x, expect=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    fused(x)  # in training mode, still right: nothing it folded trains


class _Tap(nn.Module):
    """A module other than the fusable ones, holding a conv chain in a child."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.body(x) + 1


@pytest.mark.parametrize("hooked", ["conv", "bn", "act", "conv pre", "container", "sequential conv"])
def test_modules_with_hooks_are_not_fused_away(hooked):
    """A hook on a module fuse would replace or erase must still run (it may change the output);
    a module with hooks elsewhere keeps its identity, its insides fused."""
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _Tap(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))).double().eval()
    calls = []

    def halve(module, inputs, output):
        calls.append(type(module).__name__)
        return output * 0.5

    target = {"conv": model[0], "bn": model[1], "act": model[2], "conv pre": model[0], "container": model[3],
              "sequential conv": model[4][0]}[hooked]
    if hooked == "conv pre":
        target.register_forward_pre_hook(lambda module, inputs: (calls.append("pre"), (inputs[0] * 2,))[1])
    else:
        target.register_forward_hook(halve)
    x = make_tensor((2, 3, 7, 7), torch.float64, DEVICE)
    expected = model(x)
    fused = bigkern.fuse(model)
    calls.clear()
    torch.testing.assert_close(fused(x), expected)
    assert len(calls) == 1, calls
    if hooked == "container":  # the hooked module itself is kept, its children fused
        kept = [m for m in fused.modules() if isinstance(m, _Tap)]
        assert len(kept) == 1 and isinstance(kept[0].body[0], FusedConv2d)


def test_spectral_norm_conv_is_not_fused():
    """spectral_norm computes the conv's weight in a pre-forward hook: fusing it would freeze one
    weight (it crashed: the computed weight is no Parameter)."""
    model = nn.Sequential(torch.nn.utils.spectral_norm(nn.Conv2d(4, 4, 3)), nn.ReLU()).double().eval()
    x = make_tensor((1, 4, 8, 8), torch.float64, DEVICE)
    expected = model(x)
    fused = bigkern.fuse(model, inplace=True)
    assert not any(isinstance(m, FusedConv2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected)


def test_a_frozen_batch_norm_folded_in_training_mode_refuses_a_later_train():
    """After model.eval(); model.train() the original's batch norm normalizes with batch statistics,
    which the folded weights cannot: the fused model raises rather than keep the running ones."""
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).double()
    model.train()
    model[1].eval()
    model.requires_grad_(False)
    x = make_tensor((2, 3, 6, 6), torch.float64, DEVICE)
    fused = fused_equals_original(model, x, expect=1)  # in training mode, untouched: still right
    fused.eval()
    torch.testing.assert_close(fused(x), model.eval()(x))
    fused.train()
    with pytest.raises(RuntimeError, match="BatchNorm2d"):
        fused(x)


def test_a_model_fused_in_eval_mode_refuses_training_mode():
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).double().eval()
    fused = bigkern.fuse(model)
    x = make_tensor((2, 3, 6, 6), torch.float64, DEVICE)
    fused(x)
    fused.train()
    with pytest.raises(RuntimeError, match="BatchNorm2d"):
        fused(x)


class DropoutBlock(nn.Module):
    """A forward that reads self.training (as F.dropout, torchvision's stochastic depth, timm's DropPath)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.features(x)
        return Fn.dropout(torch.relu(self.conv(y)), 0.5, training=self.training) + y


@pytest.mark.parametrize("fused_in", ["train", "eval"])
def test_the_fused_model_follows_train_and_eval_as_the_original(fused_in):
    """A trace would fix `self.training` as a constant: such a forward is kept, its children fused."""
    model = DropoutBlock().double()
    model.train(fused_in == "train")
    fused = bigkern.fuse(model)
    assert any(isinstance(m, FusedConv2d) for m in fused.modules())  # the Sequential inside still fuses
    x = make_tensor((2, 3, 6, 6), torch.float64, DEVICE)
    model.eval(), fused.eval()
    torch.testing.assert_close(fused(x), model(x))
    model.train(), fused.train()
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(fused(x), expected)


def test_fusing_keeps_modules_the_trace_did_not_reach():
    """Only folded batch norms leave the module tree: a head forward does not call (one another
    method uses, a classifier swapped in later) stays, with its state_dict entries."""
    class WithSpareHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.heads = nn.ModuleDict(dict(main=nn.Identity(), spare=nn.Linear(4, 2)))
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            return self.heads["main"](torch.relu(self.bn(self.conv(x))))

    model = randomize_batch_norms(WithSpareHead()).double().eval()
    fused = fused_equals_original(model, make_tensor((2, 3, 6, 6), torch.float64, DEVICE), expect=1)
    assert set(fused.state_dict()) == {k for k in model.state_dict() if not k.startswith("bn.")}


class Counting(nn.Module):
    """A forward that updates a buffer: fx runs `self.calls += 1` while tracing instead of recording it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.conv(x))


class TracedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass (as timm's BatchNormAct2d): fx traces into it, running its updates."""


@pytest.mark.parametrize("inplace", [False, True])
def test_tracing_never_changes_the_models_state(inplace):
    """A forward that updates its own state is not traced: the trace would update it once, at fuse
    time, and the graph never again (wrong running statistics with momentum=None)."""
    counting = Counting().double()
    x = make_tensor((2, 3, 6, 6), torch.float64, DEVICE)
    fused = bigkern.fuse(counting, inplace=inplace)
    assert fused.calls == 0 and counting.calls == 0
    for _ in range(3):
        fused(x)
    assert fused.calls == 3
    model = nn.Sequential(nn.Conv2d(3, 4, 3), TracedBatchNorm(4, momentum=None), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.ReLU()).double()
    original = copy.deepcopy(model)
    fused = bigkern.fuse(model, inplace=inplace)
    assert_parameters_untouched(model, original)
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 1
    for _ in range(3):
        x = make_tensor((4, 3, 6, 6), torch.float64, DEVICE)
        torch.testing.assert_close(fused(x), original(x))
    assert_parameters_untouched(fused, original)


class WriteBetween(nn.Module):
    """The conv's input written in place after the conv ran, before its residual add."""

    def __init__(self, write):
        super().__init__()
        self.conv, self.write = nn.Conv2d(3, 3, 3, padding=1), write
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x * 1.0
        y = self.conv(x)
        if self.write == "method":
            x.mul_(2)
        elif self.write == "module":
            self.act(x)
        else:
            Fn.relu(x, True)
        return torch.relu(y + x)


@pytest.mark.parametrize("write", ["method", "module", "functional"])
def test_in_place_writes_inside_a_chain_are_not_fused(write):
    """The fused conv runs where the chain ends: it would read the input after the write."""
    model = WriteBetween(write).double().eval()
    fused_equals_original(model, make_tensor((1, 3, 5, 5), torch.float64, DEVICE), expect=0)


class ProjectionFirst(nn.Module):
    """torchvision's RegNet block: the projection's chain ends after the residual branch, whose in-place
    ReLUs write into its own batch norms' outputs only."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.f = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                               nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.proj(x) + self.f(x))


def test_in_place_writes_into_another_branch_still_fuse():
    model = randomize_batch_norms(ProjectionFirst()).double().eval()
    fused_equals_original(model, make_tensor((2, 3, 5, 5), torch.float64, DEVICE), expect=3)


class OptionalSkip(nn.Module):
    """A forward with an optional argument: fx passes a proxy for it, so `skip is None` is never true."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if skip is None:
            return torch.relu(y)
        return torch.tanh(y + skip)


def test_a_forward_with_optional_arguments_is_not_traced():
    model = OptionalSkip().double().eval()
    x, skip = make_tensor((1, 3, 5, 5), torch.float64, DEVICE), make_tensor((1, 4, 5, 5), torch.float64, DEVICE)
    fused = fused_equals_original(model, x, expect=0)
    torch.testing.assert_close(fused(x, skip), model(x, skip))


class TanhInto(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, out):
        torch.tanh(self.conv(x), out=out)
        return out * 2


def test_an_activation_writing_into_out_is_not_fused():
    model = TanhInto().double().eval().requires_grad_(False)
    x = make_tensor((1, 3, 5, 5), torch.float64, DEVICE)
    expected = model(x, torch.zeros(1, 3, 5, 5, dtype=torch.float64, device=DEVICE))
    fused = bigkern.fuse(model)
    assert not any(isinstance(m, FusedConv2d) for m in fused.modules())
    torch.testing.assert_close(fused(x, torch.zeros(1, 3, 5, 5, dtype=torch.float64, device=DEVICE)), expected)


class ResidualFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, residual):
        return torch.relu(residual + self.conv(x))


@pytest.mark.parametrize("layouts", ["x", "residual", "weight", "x weight", "x residual weight"])
def test_residual_first_gives_torchs_layout(layouts):
    """torch's `residual + y` follows the residual's layout where the two differ, the fused kernel
    the conv's: fused results must come in torch's layout too."""
    def laid_out(t, name):
        return t.contiguous(memory_format=torch.channels_last if name in layouts.split() else torch.contiguous_format)

    model = ResidualFirst().double().eval()
    model.conv.weight.data = laid_out(model.conv.weight.data, "weight")
    x = laid_out(make_tensor((2, 4, 5, 6), torch.float64, DEVICE), "x")
    residual = laid_out(make_tensor((2, 4, 5, 6), torch.float64, DEVICE), "residual")
    expected = model(x, residual)
    fused = bigkern.fuse(model)
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 1
    y = fused(x, residual)
    torch.testing.assert_close(y, expected)
    assert y.stride() == expected.stride()


# ---------------------------------------------------------------------------------------------
# From the review of the fixes above: what a forward does outside fx's sight.

class _ConvBlock(nn.Sequential):
    """A Sequential subclass (torchvision's Conv2dNormActivation is one)."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


class _WalksItsBlock(nn.Module):
    """Optional arguments (not traced) and a forward that iterates its block for taps."""

    def __init__(self):
        super().__init__()
        self.stem = _ConvBlock()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x, taps=None):
        for layer in self.stem:
            x = layer(x)
            if taps is not None:
                taps.append(x)
        return self.body(x)


def test_children_an_untraced_parent_walks_keep_their_identity_and_the_rest_fuses():
    """The stem is iterated (a traced replacement raised TypeError: not iterable); the body is only
    called, so it still fuses, even though the forward's optional argument keeps it untraced."""
    model = randomize_batch_norms(_WalksItsBlock()).double().eval()
    fused = fused_equals_original(model, make_tensor((1, 3, 6, 6), torch.float64, DEVICE), expect=1)
    assert type(fused.stem) is _ConvBlock
    taps = []
    fused(make_tensor((1, 3, 6, 6), torch.float64, DEVICE).detach(), taps)
    assert len(taps) == 3


def _scale_in_place(t):
    t.mul_(2)
    return t


torch.fx.wrap("_scale_in_place")


class _OpaqueWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        z = _scale_in_place(x)  # fx records a call it cannot see into
        return torch.relu(y) + z.sum()


def test_a_function_fx_cannot_see_into_ends_the_chain():
    fused_equals_original(_OpaqueWrite().double().eval(), make_tensor((1, 3, 6, 6), torch.float64, DEVICE), expect=0)


class _CountsInADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.stats = {"calls": 0}

    def forward(self, x):
        self.stats["calls"] += 1
        return torch.relu(self.conv(x))


def test_tracing_never_changes_the_models_containers():
    model = _CountsInADict().double().eval()
    fused = bigkern.fuse(model, inplace=True)
    assert model.stats == {"calls": 0}
    fused(make_tensor((1, 3, 6, 6), torch.float64, DEVICE))
    fused(make_tensor((1, 3, 6, 6), torch.float64, DEVICE))
    assert fused.stats == {"calls": 2}


class _HeadWithMethods(nn.Module):
    """A detection-style head: the parent calls it and also its own methods and attributes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.scale = 0.5

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def logits(self, x):
        return self.bn(self.conv(x)) * self.scale


class _Tail(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _ReachesIntoItsHead(nn.Module):
    def __init__(self, untraceable):
        super().__init__()
        self.head, self.tail = _HeadWithMethods(), _Tail()
        self.untraceable = untraceable

    def forward(self, x):
        y = self.tail(self.head(x))
        if self.untraceable and x.sum() > 0:  # data-dependent: fx cannot trace it
            y = y + self.extra(x)
        return y

    def extra(self, x):
        return self.head.logits(x).mean() * self.head.scale


@pytest.mark.parametrize("untraceable", [True, False], ids=["untraced", "hooked"])
def test_children_whose_methods_the_parent_calls_keep_their_identity(untraceable):
    """A traced replacement of the head has none of its methods or attributes (AttributeError: no
    'logits'), nor its folded batch norm: the head is fused inside only, its sibling still fuses.
    The parent is kept as itself either way: untraceable, or with a hook (its forward only calls the
    head; its other method, called after fusing, reaches into it)."""
    model = randomize_batch_norms(_ReachesIntoItsHead(untraceable)).double().eval()
    if not untraceable:
        model.register_forward_hook(lambda module, args, output: None)
    x = make_tensor((1, 3, 6, 6), torch.float64, DEVICE)
    fused = fused_equals_original(model, x, expect=1)
    assert type(fused.head) is _HeadWithMethods and isinstance(fused.tail.conv, FusedConv2d)
    torch.testing.assert_close(fused.extra(x), model.extra(x), atol=1e-10, rtol=1e-10)
