"""bigkern.patch / unpatch / enable: the mechanics, on a drop-in registered just for the test.
(Each family's own drop-ins are tested against torch in its test file.)"""

import copy
import pickle

import pytest
import torch

import bigkern
from bigkern.nn import DROP_INS, register_drop_in


class DropInLinear(torch.nn.Linear):
    """A drop-in as the families write them: same state, its own forward."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) + 0.0


class UserLinear(torch.nn.Linear):
    """A user's subclass with its own forward: never swapped."""


@pytest.fixture
def linear_drop_in():
    register_drop_in(torch.nn.Linear, DropInLinear)
    yield
    DROP_INS.pop(torch.nn.Linear)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                               torch.nn.Sequential(torch.nn.Linear(8, 8), UserLinear(8, 3)))


def test_patch_swaps_in_place_keeping_state_hooks_and_mode(linear_drop_in):
    m = model().eval()
    calls = []
    m[0].register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    params = [id(p) for p in m.parameters()]
    keys = list(m.state_dict())
    x = torch.randn(2, 4)
    expected = m(x)

    assert bigkern.patch(m) is m
    assert type(m[0]) is DropInLinear and type(m[2][0]) is DropInLinear
    assert type(m[2][1]) is UserLinear
    assert [id(p) for p in m.parameters()] == params and list(m.state_dict()) == keys
    assert not m.training
    torch.testing.assert_close(m(x), expected)
    assert calls[-1] is DropInLinear
    from bigkern.patch import patched_modules

    assert [name for name, _ in patched_modules(m)] == ["0", "2.0"]

    bigkern.unpatch(m)
    assert type(m[0]) is torch.nn.Linear and type(m[2][0]) is torch.nn.Linear
    assert "_bigkern_original_class" not in m[0].__dict__
    torch.testing.assert_close(m(x), expected)


def test_include_and_exclude(linear_drop_in):
    m = bigkern.patch(model(), exclude=["2.*"])
    assert type(m[0]) is DropInLinear and type(m[2][0]) is torch.nn.Linear
    m = bigkern.patch(model(), include=["2.0"])
    assert type(m[0]) is torch.nn.Linear and type(m[2][0]) is DropInLinear
    m = bigkern.patch(model(), exclude=[torch.nn.Linear])
    assert type(m[0]) is torch.nn.Linear
    # a pattern covers everything inside what it matches
    m = bigkern.patch(model(), exclude=["2"])
    assert type(m[0]) is DropInLinear and type(m[2][0]) is torch.nn.Linear
    m = bigkern.patch(model(), include=["2"])
    assert type(m[0]) is torch.nn.Linear and type(m[2][0]) is DropInLinear
    m = bigkern.patch(model(), include=[torch.nn.Sequential], exclude=["2.0"])
    assert type(m[0]) is DropInLinear and type(m[2][0]) is torch.nn.Linear


def test_state_dict_round_trips_between_patched_and_unpatched(linear_drop_in, tmp_path):
    patched = bigkern.patch(model())
    torch.save(patched.state_dict(), tmp_path / "w.pt")
    plain = model()
    for p in plain.parameters():
        torch.nn.init.normal_(p)
    plain.load_state_dict(torch.load(tmp_path / "w.pt"))
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), patched(x))


@pytest.mark.parametrize("torch_class", list(DROP_INS), ids=lambda c: c.__name__)
def test_drop_ins_have_torchs_signatures(torch_class):
    """Config tools (jsonargparse, LightningCLI) and inspect.signature(...).bind read the class's
    signature: a drop-in's constructor and forward take torch's parameters, names and defaults."""
    import inspect

    def parameters(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    drop_in = DROP_INS[torch_class]
    assert parameters(drop_in) == parameters(torch_class)
    assert parameters(drop_in.forward) == parameters(torch_class.forward)


def test_register_drop_in_requires_a_subclass():
    with pytest.raises(TypeError):
        register_drop_in(torch.nn.Linear, torch.nn.Conv2d)


def test_enable_routes_functional_calls_only_inside_the_block(monkeypatch):
    import bigkern.nn.functional as bf

    sentinel = object()
    monkeypatch.setattr(bf, "conv2d", lambda *a, **k: sentinel, raising=False)
    original = torch.nn.functional.conv2d
    with bigkern.enable():
        assert torch.nn.functional.conv2d(None, None) is sentinel
    assert torch.nn.functional.conv2d is original


def test_enable_routes_varlen_attn_and_its_fallback_still_reaches_torch():
    """Inside enable(), torch's varlen_attn is bigkern's; a call bigkern's kernels cannot serve still
    reaches torch's own (taken at import), not bigkern's again."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    import bigkern.nn.functional as bf
    from bigkern.ops import attention

    originals = {"varlen_attn": varlen.varlen_attn, "varlen_attn_out": getattr(varlen, "varlen_attn_out", None)}
    found = {"varlen_attn": "_TORCH_VARLEN_ATTN", "varlen_attn_out": "_TORCH_VARLEN_ATTN_OUT"}
    with bigkern.enable():
        for name, original in originals.items():
            if original is not None:  # varlen_attn_out: torch 2.14 on
                assert getattr(varlen, name) is getattr(bf, name)
            assert getattr(attention, found[name]) is original
    for name, original in originals.items():
        assert getattr(varlen, name, None) is original


def test_torch_paths_inside_enable_reach_torch_not_bigkern_again():
    """Inside enable() torch.nn.functional's conv2d / sdpa are bigkern's: the calls bigkern leaves to
    torch (its torch backend on CPU, torch.func, NestedTensors) must reach torch's own, not recurse."""
    F = torch.nn.functional
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    q = torch.randn(1, 2, 4, 8)
    expected_conv, expected_grad = F.conv2d(x, w), torch.func.grad(lambda a: F.conv2d(a, w).sum())(x)
    expected_sdpa = F.scaled_dot_product_attention(q, q, q)
    nested = torch.nested.nested_tensor_from_jagged(torch.randn(8, 2, 8), torch.tensor([0, 3, 8])).transpose(1, 2)
    with bigkern.enable(), bigkern.use_backend("auto"):
        torch.testing.assert_close(F.conv2d(x, w), expected_conv)
        torch.testing.assert_close(torch.nn.Conv2d(2, 3, 3)(x).shape, expected_conv.shape)
        torch.testing.assert_close(torch.func.grad(lambda a: F.conv2d(a, w).sum())(x), expected_grad)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), expected_sdpa)
        assert F.scaled_dot_product_attention(nested, nested, nested).is_nested


def test_enable_blocks_overlapping_in_threads_restore_torch_when_the_last_ends():
    import threading

    original = torch.nn.functional.conv2d
    first_entered, second_entered, first_left = threading.Event(), threading.Event(), threading.Event()
    seen_inside = []

    def first():
        with bigkern.enable():
            first_entered.set()
            second_entered.wait(10)
        first_left.set()

    def second():
        first_entered.wait(10)
        with bigkern.enable():
            second_entered.set()
            first_left.wait(10)
            seen_inside.append(torch.nn.functional.conv2d is not original)  # still inside a block

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen_inside == [True] and torch.nn.functional.conv2d is original


def test_one_pattern_is_a_pattern_not_its_characters(linear_drop_in):
    m = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(11)))
    bigkern.patch(m, include="10")
    assert [name for name, _ in bigkern.patch.__globals__["patched_modules"](m)] == ["10"]


def test_parametrized_modules_patch_and_unpatch(linear_drop_in):
    """torch.nn.utils.parametrize puts its own class layer on a module: patch and unpatch swap the
    class under it, in either order, and the parametrized weight keeps working."""
    from torch.nn.utils import parametrizations

    x = torch.randn(3, 4)
    for order in ("parametrize first", "patch first"):
        m = torch.nn.Sequential(torch.nn.Linear(4, 5))
        if order == "patch first":
            bigkern.patch(m)
        parametrizations.weight_norm(m[0])
        expected = m(x)
        if order == "parametrize first":
            bigkern.patch(m)
        assert isinstance(m[0], DropInLinear), order
        torch.testing.assert_close(m(x), expected)
        bigkern.unpatch(m)
        assert not isinstance(m[0], DropInLinear) and isinstance(m[0], torch.nn.Linear), order
        torch.testing.assert_close(m(x), expected)
        torch.nn.utils.parametrize.remove_parametrizations(m[0], "weight")
        assert type(m[0]) is torch.nn.Linear


def test_dynamo_rnn_flag_is_on_while_patched_lstms_live():
    """patch turns on torch._dynamo.config.allow_rnn (patched LSTMs then compile without graph breaks);
    it also sends torch's own LSTMs into dynamo's experimental tracing, so unpatching the last patched
    LSTM turns it back off -- unless it was on before."""
    import gc

    import torch._dynamo

    gc.collect()  # patched LSTMs that earlier tests left in reference cycles are alive until collected
    with torch._dynamo.config.patch(allow_rnn=False):
        first = bigkern.patch(torch.nn.Sequential(torch.nn.LSTM(2, 3)))
        second = bigkern.patch(torch.nn.LSTMCell(2, 3))  # a cell: no flag needed, none counted
        third = bigkern.patch(torch.nn.LSTM(2, 3))
        assert torch._dynamo.config.allow_rnn
        bigkern.unpatch(first)
        assert torch._dynamo.config.allow_rnn  # `third` still needs it
        bigkern.unpatch(second)
        bigkern.unpatch(third)
        assert not torch._dynamo.config.allow_rnn
    with torch._dynamo.config.patch(allow_rnn=True):
        bigkern.unpatch(bigkern.patch(torch.nn.LSTM(2, 3)))
        assert torch._dynamo.config.allow_rnn
    # a copy of a patched LSTM (deepcopy, pickle, torch.save) is a patched LSTM too: it keeps the flag
    # on when the original is unpatched (it went off, and the copy failed to compile)
    with torch._dynamo.config.patch(allow_rnn=False):
        original = bigkern.patch(torch.nn.LSTM(2, 3))
        copies = [copy.deepcopy(original), pickle.loads(pickle.dumps(original))]
        bigkern.unpatch(original)
        assert torch._dynamo.config.allow_rnn
        for patched in copies:
            bigkern.unpatch(patched)
        assert not torch._dynamo.config.allow_rnn
