"""bigkern.patch / unpatch / enable: the mechanics, on a drop-in registered just for the test.
(Each family's own drop-ins are tested against torch in its test file.)"""

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


def test_state_dict_round_trips_between_patched_and_unpatched(linear_drop_in, tmp_path):
    patched = bigkern.patch(model())
    torch.save(patched.state_dict(), tmp_path / "w.pt")
    plain = model()
    for p in plain.parameters():
        torch.nn.init.normal_(p)
    plain.load_state_dict(torch.load(tmp_path / "w.pt"))
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), patched(x))


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
