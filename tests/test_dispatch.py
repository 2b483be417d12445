"""The dispatch seam: requests, forcing, reasons, explain."""

import types

import pytest
import torch

import bigkern
from bigkern import dispatch
from bigkern.nn import functional as F
from bigkern.testing import make_tensor


def test_unsupported_error_is_a_runtime_error():
    assert issubclass(bigkern.UnsupportedError, RuntimeError)


def test_forcing_cuda_on_cpu_tensors_raises_with_the_reason():
    x = make_tensor((4, 5))
    with bigkern.use_backend("cuda"), pytest.raises(bigkern.UnsupportedError, match="cuda: .*CUDA tensors"):
        F.bias_act(x, None, "relu")


def test_forcing_triton_without_the_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with bigkern.use_backend("triton"), pytest.raises(bigkern.UnsupportedError, match="interpreter"):
        F.bias_act(make_tensor((4, 5)), None, "relu")


def test_environment_variable_forces_and_is_validated(monkeypatch):
    monkeypatch.setenv("BIGKERN_BACKEND", "cuda")
    assert bigkern.requested_backend() == "cuda"
    with pytest.raises(bigkern.UnsupportedError):
        F.bias_act(make_tensor((4, 5)), None, "relu")
    monkeypatch.setenv("BIGKERN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="BIGKERN_BACKEND"):
        bigkern.requested_backend()


def test_use_backend_nests_and_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("BIGKERN_BACKEND", "cuda")
    with bigkern.use_backend("torch"):
        assert bigkern.requested_backend() == "torch"
        with bigkern.use_backend("auto"):
            assert bigkern.requested_backend() == "auto"
        assert bigkern.requested_backend() == "torch"
    assert bigkern.requested_backend() == "cuda"
    with pytest.raises(ValueError):
        with bigkern.use_backend("cudnn"):
            pass


def test_auto_takes_torch_for_cpu_tensors_and_explains_the_others():
    x, b = make_tensor((4, 5)), make_tensor((5,))
    explanation = bigkern.explain(F.bias_act, x, b, "gelu")
    assert explanation.backend == "torch" and explanation.requested == "auto"
    assert explanation.reasons["cuda"] and "CUDA tensors" in explanation.reasons["cuda"]
    text = str(explanation)
    assert "bias_act" in text and "-> torch" in text
    assert bigkern.explain("bias_act", x, b, 1, -1, 0.01).backend == "torch"


def test_auto_skips_implementations_not_verified_on_a_gpu():
    op = dispatch.Op("test_only_op")
    try:
        op.register("cuda", lambda x: None, auto=False)(lambda x: "cuda")
        op.register("torch", lambda x: None)(lambda x: "torch")
        x = torch.empty(1)
        assert op(x) == "torch"
        assert "not verified" in op.explain(x).reasons["cuda"]
        with bigkern.use_backend("cuda"):
            assert op(x) == "cuda"
    finally:
        dispatch.REGISTRY.pop("test_only_op")


def test_auto_with_no_usable_implementation_raises_with_every_reason():
    op = dispatch.Op("test_only_op")
    try:
        op.register("triton", lambda x: "no triton here")(lambda x: None)
        with pytest.raises(bigkern.UnsupportedError, match=r"no implementation can serve this call \(triton: no triton here\)"):
            op(torch.empty(1))
    finally:
        dispatch.REGISTRY.pop("test_only_op")


def test_triton_launches_on_its_inputs_gpu(monkeypatch):
    """Triton launches on the current device: a Triton implementation runs with its first CUDA
    input's device made current (inputs on cuda:1 failed with 'cannot be accessed from Triton').
    Fake CUDA tensors stand in for real ones; torch.cuda.device is replaced by a recorder."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    current = ["cuda:0"]

    class Device:
        def __init__(self, device):
            self.device, self.previous = str(device), None

        def __enter__(self):
            self.previous, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "device", Device)
    op = dispatch.Op("test_only_op")
    try:
        op.register("triton", lambda *a, **k: None)(lambda *a, **k: current[0])
        op.register("torch", lambda *a, **k: None)(lambda *a, **k: current[0])
        with FakeTensorMode():
            x, y = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:2")
        with bigkern.use_backend("triton"):
            assert op(None, x, y) == "cuda:1"
            assert op(1.0, other=y) == "cuda:2"
            assert op(torch.empty(2)) == "cuda:0"  # no CUDA input: nothing to choose
        with bigkern.use_backend("torch"):
            assert op(x) == "cuda:0"  # torch's own ops choose their device
        assert current == ["cuda:0"]
    finally:
        dispatch.REGISTRY.pop("test_only_op")


def test_cuda_refuses_a_gpu_the_extension_has_no_kernels_for(monkeypatch):
    """Every family's CUDA kernels (not attention's alone) refuse a GPU bigkern._C was not built for,
    with the reason (a launch failed with 'no kernel image is available')."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bigkern import _ext

    monkeypatch.setattr(_ext, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_info", lambda: types.SimpleNamespace(cuda_archs="8.0;9.0a"))
    with FakeTensorMode():
        x = torch.empty(2, device="cuda:0")
    for capability, refused in (((12, 0), True), ((9, 0), False), ((8, 6), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        reason = dispatch.cuda_unsupported(x)
        assert (reason is not None and "8.0;9.0a" in reason and f"{capability[0]}.{capability[1]}" in reason) == refused


def test_explain_rejects_what_is_not_bigkern():
    with pytest.raises(TypeError):
        bigkern.explain(torch.nn.functional.relu, torch.empty(1))


def test_interpreter_switched_after_triton_was_imported_is_a_reason_not_a_crash():
    """TRITON_INTERPRET set after `import torch` (which imports Triton) leaves Triton's library
    functions compiled-mode: the kernels cannot launch. Triton then cannot serve, and says why:
    auto takes torch, a forced triton raises UnsupportedError (before: InterpreterError inside)."""
    import subprocess
    import sys

    script = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, bigkern
if torch.cuda.is_available():
    print("skip: a GPU"); raise SystemExit
import triton  # what torch 2.14's compiler stack does with bigkern (torch 2.11's does not)
os.environ["TRITON_INTERPRET"] = "1"
x, b = torch.randn(3, 5), torch.randn(5)
y = bigkern.nn.functional.bias_act(x, b, "gelu")
assert torch.allclose(y, torch.nn.functional.gelu(x + b))
try:
    with bigkern.use_backend("triton"):
        bigkern.nn.functional.bias_act(x, b, "gelu")
    print("served: no error")
except bigkern.UnsupportedError as error:
    assert "set after Triton was imported" in str(error), error
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1:] in (["ok"], ["skip: a GPU"]), \
        result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.skipif(not dispatch.triton_interpreter_enabled(), reason="only Triton's interpreter has the flaw")
def test_forced_triton_refuses_bfloat16_dots_in_the_interpreter():
    """Triton's interpreter multiplies bf16 tl.dot operands wrongly: the families built on tl.dot say
    so instead of answering garbage; bias_act (no dot) still serves bf16."""
    bf16 = dict(dtype=torch.bfloat16)
    q = make_tensor((1, 2, 8, 16), **bf16)
    x, w = make_tensor((1, 3, 6, 6), **bf16), make_tensor((4, 3, 3, 3), **bf16)
    lstm = bigkern.nn.LSTM(4, 5, dtype=torch.bfloat16)
    calls = [lambda: F.scaled_dot_product_attention(q, q, q), lambda: F.conv2d(x, w),
             lambda: lstm(make_tensor((3, 2, 4), **bf16))]
    with bigkern.use_backend("triton"):
        for call in calls:
            with pytest.raises(bigkern.UnsupportedError, match="bfloat16"):
                call()
        F.bias_act(make_tensor((3, 8), **bf16), make_tensor((8,), **bf16), "gelu")
    for call in calls:  # auto: torch serves CPU tensors
        call()


def test_record_blocks_nest():
    x = make_tensor((3, 4))
    with bigkern.record() as outer:
        with bigkern.record() as inner:
            F.bias_act(x)
        F.bias_act(x)  # equal Counters until here: leaving `inner` must not remove `outer`
    F.bias_act(x)
    assert sum(inner.values()) == 1 and sum(outer.values()) == 2
    assert not dispatch._RECORDERS


def test_use_backend_blocks_may_end_in_any_order():
    """Two threads' blocks end out of order: each removes its own request, not the latest one."""
    first, second = bigkern.use_backend("cuda"), bigkern.use_backend("torch")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert dispatch.requested_backend() == "torch"
    second.__exit__(None, None, None)
    assert not dispatch._requests


def test_info_reports_a_bad_backend_variable(monkeypatch):
    from bigkern import cli

    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    lines = cli.info_lines()
    assert any("requested: invalid" in line and "bogus" in line for line in lines)


def test_explain_runs_the_call_up_to_its_first_decision():
    """explain answers for every public function and drop-in module with what the call itself does:
    its validation (bad arguments raise as the call would), its torch paths, its first op; the
    random generators are left as they were."""
    x = make_tensor((5, 2, 4))
    lstm, cell = bigkern.nn.LSTM(4, 6, num_layers=2, dropout=0.5), bigkern.nn.LSTMCell(4, 6)
    layer = bigkern.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5)
    assert bigkern.explain(lstm, x).op == "lstm_layer"
    assert bigkern.explain(cell, x[0]).op == "lstm_layer"
    assert bigkern.explain(F.lstm_cell, x[0], None, cell.weight_ih, cell.weight_hh).op == "lstm_layer"
    assert bigkern.explain(layer, make_tensor((3, 2, 8))).op == "sdpa_forward"
    q = make_tensor((1, 2, 5, 8))
    state = torch.get_rng_state()
    assert bigkern.explain(F.scaled_dot_product_attention, q, q, q, dropout_p=0.5).op == "sdpa_forward"
    assert torch.equal(torch.get_rng_state(), state)
    for bad in (make_tensor((5, 2, 3)), make_tensor((5, 2, 4)).long()):
        with pytest.raises(Exception) as from_call:
            lstm(bad)
        with pytest.raises(type(from_call.value)):
            bigkern.explain(lstm, bad)
    nested = torch.nested.nested_tensor([make_tensor((2, 3, 8)), make_tensor((2, 5, 8))], layout=torch.jagged)
    assert bigkern.explain(F.scaled_dot_product_attention, nested, nested, nested).backend == "torch"
    with bigkern.use_backend("triton"):
        explanation = bigkern.explain(F.scaled_dot_product_attention, nested, nested, nested)
    assert explanation.backend is None and "NestedTensor" in explanation.reasons["triton"]
    with pytest.raises(KeyError, match="no bigkern op named 'nope'"):
        bigkern.explain("nope")


def test_backend_names_are_strings():
    for bad, error in ((None, TypeError), (1, TypeError), ("tritn", ValueError)):
        with pytest.raises(error, match="auto, triton, cuda, torch"):
            with bigkern.use_backend(bad):
                pass
