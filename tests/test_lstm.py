"""LSTM (bigkern/ops/lstm.py, bigkern/nn/rnn.py): every backend against torch.nn.LSTM / LSTMCell run
in float64 with the same state_dict -- outputs, h_n, c_n and the gradient of every parameter, the
input and (h0, c0) -- plus the module protocol, opcheck, torch.compile and torch's errors."""

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

import bigkern
from bigkern import memory, testing
from bigkern.nn import functional as F
from bigkern.nn import rnn
from bigkern.ops import lstm as ops
from bigkern.testing import make_tensor
from conftest import DEVICE, backend_skip_reason

GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def check(results):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, "\n".join(bad)


def compare(backend, module, x, hx=None):
    """compare_with_reference, skipping configurations a forced `cuda` cannot serve (with why)."""
    try:
        return ops.compare_with_reference(module, x, hx)
    except bigkern.UnsupportedError as reason:
        if backend == "cuda":
            pytest.skip(str(reason))
        raise


def random_hx(config, batch, dtype, unbatched=False):
    layers = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    P = config.get("proj_size") or config["hidden_size"]
    lead = (layers,) if unbatched else (layers, batch)
    return (make_tensor(lead + (P,), dtype, DEVICE), make_tensor(lead + (config["hidden_size"],), dtype, DEVICE))


# (config, T, B): odd sizes, every feature, small enough for the interpreter.
LSTM_CASES = [
    (dict(input_size=7, hidden_size=16), 5, 3),
    (dict(input_size=1, hidden_size=7, bias=False), 3, 1),
    (dict(input_size=5, hidden_size=33, num_layers=2), 4, 2),
    (dict(input_size=4, hidden_size=7, num_layers=3, bidirectional=True, batch_first=True), 3, 2),
    (dict(input_size=6, hidden_size=9, proj_size=4, num_layers=2, bidirectional=True), 4, 3),
    (dict(input_size=3, hidden_size=16, proj_size=7, batch_first=True), 5, 1),
    (dict(input_size=8, hidden_size=17, bidirectional=True), 1, 5),
]
if GPU:
    LSTM_CASES += [
        (dict(input_size=129, hidden_size=129, num_layers=2), 20, 33),
        (dict(input_size=256, hidden_size=512), 50, 4),
        (dict(input_size=64, hidden_size=256, proj_size=96, bidirectional=True, batch_first=True), 30, 17),
        (dict(input_size=512, hidden_size=512, num_layers=2, bidirectional=True), 25, 64),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,T,B", LSTM_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_lstm_matches_fp64(backend, dtype, config, T, B):
    module = rnn.LSTM(**config, device=DEVICE, dtype=dtype)
    shape = (B, T, config["input_size"]) if config.get("batch_first") else (T, B, config["input_size"])
    x = make_tensor(shape, dtype, DEVICE)
    hx = random_hx(config, B, dtype) if T % 2 else None  # odd T with (h0, c0), even T with zeros
    check(compare(backend, module, x, hx))


def test_lstm_non_contiguous_input_and_state(backend):
    config = dict(input_size=5, hidden_size=7, num_layers=2)
    module = rnn.LSTM(**config, device=DEVICE)
    x = make_tensor((4, 3, 5), torch.float32, DEVICE, layout="strided")
    h0 = make_tensor((3, 2, 7), device=DEVICE).transpose(0, 1)  # (layers, batch, hidden), not contiguous
    c0 = make_tensor((2, 3, 14), device=DEVICE)[..., ::2]
    assert not (x.is_contiguous() or h0.is_contiguous() or c0.is_contiguous())
    check(compare(backend, module, x, (h0, c0)))


# each dtype and sortedness once on CPU; every combination on a GPU
PACKED_VARIANTS = [(torch.float32, False), (torch.float16, True)] + [
    pytest.param(dtype, enforce, marks=pytest.mark.gpu) for dtype, enforce in
    ((torch.float32, True), (torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True))]


@pytest.mark.parametrize("dtype,enforce_sorted", PACKED_VARIANTS, ids=str)
@pytest.mark.parametrize("config", [
    dict(input_size=5, hidden_size=7, bidirectional=True),
    dict(input_size=3, hidden_size=16, num_layers=2, proj_size=5, bidirectional=True),
], ids=["bidirectional", "2-layer-proj-bidirectional"])
def test_packed_sequence(backend, dtype, enforce_sorted, config):
    lengths = [3, 5, 1, 4] if not enforce_sorted else [5, 4, 4, 1]
    sequences = [make_tensor((n, config["input_size"]), dtype, DEVICE) for n in lengths]
    x = pack_sequence(sequences, enforce_sorted=enforce_sorted)
    module = rnn.LSTM(**config, device=DEVICE, dtype=dtype)
    check(compare(backend, module, x, random_hx(config, len(lengths), dtype)))


def test_packed_padded_without_state(backend):
    config = dict(input_size=4, hidden_size=9, num_layers=2, bidirectional=True, batch_first=True)
    padded = make_tensor((3, 6, 4), device=DEVICE)
    x = pack_padded_sequence(padded, torch.tensor([2, 6, 3]), batch_first=True, enforce_sorted=False)
    check(compare(backend, rnn.LSTM(**config, device=DEVICE), x))


@pytest.mark.parametrize("with_hx,batch_first", [(False, False), (True, True)])
def test_unbatched_input(backend, with_hx, batch_first):
    config = dict(input_size=6, hidden_size=7, num_layers=2, bidirectional=True, batch_first=batch_first)
    module = rnn.LSTM(**config, device=DEVICE)
    hx = random_hx(config, 1, torch.float32, unbatched=True) if with_hx else None
    check(compare(backend, module, make_tensor((5, 6), device=DEVICE), hx))


@pytest.mark.parametrize("train", [False, True])
def test_dropout_between_layers(backend, train):
    if GPU:
        pytest.skip("torch's LSTM on CUDA draws dropout masks from cuDNN's own RNG state, not torch's")
    module = rnn.LSTM(5, 7, num_layers=3, dropout=0.4, bidirectional=True, device=DEVICE).train(train)
    # compare_with_reference reseeds before each run: torch's native LSTM and bigkern draw the same masks
    check(compare(backend, module, make_tensor((4, 3, 5), device=DEVICE)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 33), (1, 1, 7), (3, 16, 16)], ids=str)  # (batch, input, hidden)
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_matches_fp64(backend, dtype, shape, bias):
    B, I, H = shape
    module = rnn.LSTMCell(I, H, bias=bias, device=DEVICE, dtype=dtype)
    hx = (make_tensor((B, H), dtype, DEVICE), make_tensor((B, H), dtype, DEVICE)) if bias else None
    check(compare(backend, module, make_tensor((B, I), dtype, DEVICE), hx))


def test_lstm_cell_unbatched(backend):
    module = rnn.LSTMCell(4, 9, device=DEVICE)
    check(compare(backend, module, make_tensor((4,), device=DEVICE)))
    check(compare(backend, module, make_tensor((4,), device=DEVICE),
                  (make_tensor((9,), device=DEVICE), make_tensor((9,), device=DEVICE))))


def test_nan_and_inf_propagate_as_in_torch(backend):
    module = rnn.LSTM(4, 7, bidirectional=True, device=DEVICE)
    x = make_tensor((5, 3, 4), device=DEVICE)
    x[1, 0, 2] = float("nan")  # poisons sequence 0 from step 1 on (both directions meet it)
    x[3, 2, 1] = float("inf")
    check(compare(backend, module, x))


def test_functional_layer_and_cell_match_torch(backend):
    """The functional entry points alone: one layer one direction, and one step."""
    torch_layer = torch.nn.LSTM(5, 9, proj_size=4, dtype=torch.float64)
    params = [p.detach().to(DEVICE, torch.float32).requires_grad_() for p in torch_layer._flat_weights]
    x = make_tensor((6, 3, 5), device=DEVICE, requires_grad=True)
    h0, c0 = make_tensor((3, 4), device=DEVICE), make_tensor((3, 9), device=DEVICE)
    for reverse in (False, True):
        out, (hn, cn) = F.lstm_layer(x, (h0, c0), *params, reverse=reverse)
        xr = x.detach().double().cpu().flip(0) if reverse else x.detach().double().cpu()
        ref, (ref_h, ref_c) = torch_layer(xr, (h0.double().cpu()[None], c0.double().cpu()[None]))
        ref = ref.flip(0) if reverse else ref
        for a, b in ((out, ref), (hn, ref_h[0]), (cn, ref_c[0])):
            torch.testing.assert_close(a.double().cpu(), b.detach(), rtol=1e-4, atol=1e-5)
    cell = torch.nn.LSTMCell(5, 9, dtype=torch.float64)
    weights = [p.detach().to(DEVICE, torch.float32) for p in cell.parameters()]
    h, c = F.lstm_cell(x[0], None, *weights)
    ref_h, ref_c = cell(x[0].detach().double().cpu())
    torch.testing.assert_close(h.double().cpu(), ref_h.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.double().cpu(), ref_c.detach(), rtol=1e-4, atol=1e-5)


def test_functional_lstm_packed_overload(backend):
    module = torch.nn.LSTM(3, 5, num_layers=2, device=DEVICE)
    x = pack_sequence([make_tensor((n, 3), device=DEVICE) for n in (4, 2, 2)])
    hx = (make_tensor((2, 3, 5), device=DEVICE), make_tensor((2, 3, 5), device=DEVICE))
    out, h_n, c_n = F.lstm(x.data, x.batch_sizes, hx, module._flat_weights, True, 2, 0.0, False, False)
    ref, (ref_h, ref_c) = module(x, hx)
    for a, b in ((out, ref.data), (h_n, ref_h), (c_n, ref_c)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_float64_runs_on_the_reference():
    """float64 is a torch dtype the kernels do not take: auto serves it with the torch backend."""
    module = rnn.LSTM(3, 5, device=DEVICE, dtype=torch.float64)
    x = make_tensor((4, 2, 3), torch.float64, DEVICE)
    explanation = bigkern.explain(module, x)
    assert explanation.backend == "torch" and "float64" in explanation.reasons["triton"]
    check(ops.compare_with_reference(module, x))


def test_autocast_like_torch():
    """torch runs whole LSTMs in the autocast dtype on CUDA (cuDNN) and CPU (oneDNN's
    mkldnn_rnn_layer is on CPU autocast's list), and LSTMCell in it on CUDA only. Values follow
    the FA rule against float64: torch's CPU LSTMCell returns float32 but rounds its gate
    matmuls to bfloat16 (autocast catches the linear inside the composite op), so its error sets
    a bound that our float32 cell meets with room."""
    torch_cell, torch_lstm = torch.nn.LSTMCell(3, 5, device=DEVICE), torch.nn.LSTM(3, 5, device=DEVICE)
    cell, lstm = rnn.LSTMCell(3, 5, device=DEVICE), rnn.LSTM(3, 5, device=DEVICE)
    cell.load_state_dict(torch_cell.state_dict())
    lstm.load_state_dict(torch_lstm.state_dict())
    x = make_tensor((4, 2, 3), device=DEVICE)
    autocast_dtype = torch.float16 if GPU else torch.bfloat16
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        h, c = cell(x[0])
        expected_h, _ = torch_cell(x[0])
        out, _ = lstm(x)
    assert h.dtype == expected_h.dtype and c.dtype == expected_h.dtype
    reference_h, _ = copy.deepcopy(torch_cell).double()(x[0].double())
    reference_out, _ = copy.deepcopy(torch_lstm).double()(x.double())
    testing.assert_close(h, reference_h, expected_h, name="LSTMCell h")
    if GPU:  # cuDNN's LSTM runs in float16 under autocast
        with torch.autocast(DEVICE, dtype=torch.float16):
            expected, _ = torch_lstm(x)
    else:  # torch's own CPU LSTM fails under autocast here (oneDNN); its policy is bf16 throughout
        expected, _ = copy.deepcopy(torch_lstm).bfloat16()(x.bfloat16())
    assert out.dtype == expected.dtype == autocast_dtype
    testing.assert_close(out, reference_out, expected, name="LSTM output")


@pytest.mark.parametrize("state", ["none", "float32", "float16"])
def test_cpu_autocast_with_projections_like_torch(state):
    """On CPU an LSTM with projections is not oneDNN's: torch autocasts it op by op, so c_n keeps
    the dtype c0 came in (float32 without c0) while the output and h_n are float16."""
    theirs = torch.nn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True)
    ours = rnn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True)
    ours.load_state_dict(theirs.state_dict())
    x = make_tensor((4, 2, 3))
    hx = None if state == "none" else (make_tensor((4, 2, 2)).to(getattr(torch, state)),
                                       make_tensor((4, 2, 5)).to(getattr(torch, state)))
    with torch.autocast("cpu", dtype=torch.float16):
        expected = theirs(x, hx)
        got = ours(x, hx)
        packed = ours(pack_sequence([x[:, 0], x[:3, 1]]), hx)
    for want, have in zip(_flatten(expected), _flatten(got)):
        assert have.dtype == want.dtype, (state, [t.dtype for t in _flatten(got)], [t.dtype for t in _flatten(expected)])
        torch.testing.assert_close(have.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert [t.dtype for t in _flatten(packed)] == [t.dtype for t in _flatten(expected)]


@pytest.mark.parametrize("input_dtype,state", [("float32", "none"), ("float32", "float32"), ("bfloat16", "none"),
                                               ("bfloat16", "float32"), ("float16", "none"), ("float32", "bfloat16")])
@pytest.mark.parametrize("packed", [True, False])
def test_cpu_autocast_without_onednn_like_torch(input_dtype, state, packed):
    """Where oneDNN does not take a CPU LSTM (packed input; float16 input) torch runs it step by step
    in its ops, which autocast and promote as the cell's do: outputs in promote(autocast dtype, c0's
    dtype). Packed data of another dtype than the weights is autocast's to cast, not an error."""
    if not packed and input_dtype != "float16":
        input_dtype = "float16"  # dense float32/bfloat16 input: oneDNN's (test_autocast_like_torch)
    theirs = torch.nn.LSTM(3, 5, num_layers=2)
    ours = rnn.LSTM(3, 5, num_layers=2)
    ours.load_state_dict(theirs.state_dict())
    x = make_tensor((4, 2, 3)).to(getattr(torch, input_dtype))
    if packed:
        x = pack_sequence([x[:, 0], x[:3, 1]])
    hx = None if state == "none" else tuple(make_tensor((2, 2, 5)).to(getattr(torch, state)) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = theirs(x, hx)
        got = ours(x, hx)
    assert [t.dtype for t in _flatten(got)] == [t.dtype for t in _flatten(expected)]
    for want, have in zip(_flatten(expected), _flatten(got)):
        torch.testing.assert_close(have.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("input_dtype,state", [("bfloat16", "none"), ("bfloat16", "float32"),
                                               ("float32", "bfloat16"), ("float16", "none"), ("float32", "float16")])
def test_cpu_autocast_lstm_cell_like_torch(input_dtype, state):
    """torch's CPU LSTMCell is a composition: its gate matmuls autocast (taking, say, an autocast
    bfloat16 activation to float32 weights) and the cell update promotes, so h_1 and c_1 come out
    in promote(autocast dtype, c0's dtype) -- c0 being the input's dtype when none is given."""
    theirs = torch.nn.LSTMCell(3, 5)
    ours = rnn.LSTMCell(3, 5)
    ours.load_state_dict(theirs.state_dict())
    x = make_tensor((4, 3)).to(getattr(torch, input_dtype)).requires_grad_()
    hx = None if state == "none" else tuple(make_tensor((4, 5)).to(getattr(torch, state)) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = theirs(x, hx)
        got = ours(x, hx)
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    for want, have in zip(expected, got):
        torch.testing.assert_close(have.float(), want.float(), rtol=2e-2, atol=2e-2)
    got[0].float().sum().backward()
    assert x.grad.dtype == x.dtype and ours.weight_ih.grad.dtype == torch.float32


@pytest.mark.parametrize("state", ["float16", "bfloat16", "float64"])
def test_cell_state_of_another_dtype_promotes_like_torch(state):
    """torch's cell update c1 = f c0 + i g promotes: h_1, c_1 in promote(input's dtype, c0's); h0
    must still be the input's (its matmul with the weights refuses another)."""
    theirs = torch.nn.LSTMCell(3, 5)
    ours = rnn.LSTMCell(3, 5)
    ours.load_state_dict(theirs.state_dict())
    x, h0 = make_tensor((4, 3), requires_grad=True), make_tensor((4, 5))
    c0 = make_tensor((4, 5)).to(getattr(torch, state)).requires_grad_()
    expected, got = theirs(x, (h0, c0)), ours(x, (h0, c0))
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want)
    sum(t.sum() for t in got).backward()
    assert c0.grad.dtype == c0.dtype and x.grad.dtype == x.dtype
    with pytest.raises(RuntimeError, match="'hx\\[0\\]'"):
        ours(x, (h0.to(getattr(torch, state)), c0))


def test_cell_output_may_be_changed_in_place_like_torchs(backend):
    """Zoneout-style loops scale the h a cell returns in place before the next step: torch's cell
    keeps no such output for backward; bigkern's kept it (the version error at backward)."""
    theirs = torch.nn.LSTMCell(3, 4, device=DEVICE)
    ours = bigkern.patch(copy.deepcopy(theirs))
    xs = make_tensor((3, 2, 3), device=DEVICE)
    for cell in (theirs, ours):
        state = None
        for x in xs:
            h, c = cell(x, state)
            h.mul_(0.9)
            state = (h, c)
        (h.sum() + c.sum()).backward()
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name).grad, param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_complex_inputs_are_torchs_own():
    """torch's CPU LSTM and LSTMCell compute in complex64 (forward and backward); bigkern's refused
    them. auto leaves them to torch; a forced kernel backend says why it cannot serve."""
    torch.manual_seed(0)
    for cls, x in ((torch.nn.LSTM, torch.randn(3, 2, 3, dtype=torch.complex64)),
                   (torch.nn.LSTMCell, torch.randn(2, 3, dtype=torch.complex64))):
        theirs = cls(3, 4).to(torch.complex64)
        ours = bigkern.patch(copy.deepcopy(theirs))
        expected, got = theirs(x), ours(x)
        torch.testing.assert_close(got, expected)
        got[0].abs().sum().backward()
        expected[0].abs().sum().backward()
        for name, param in theirs.named_parameters():
            torch.testing.assert_close(ours.get_parameter(name).grad, param.grad, msg=name)
        with bigkern.use_backend("triton"), pytest.raises(bigkern.UnsupportedError, match="complex"):
            ours(x)
    cell = torch.nn.LSTMCell(3, 4).to(torch.complex64)
    x, hx = torch.randn(2, 3, dtype=torch.complex64), (torch.randn(2, 4, dtype=torch.complex64),) * 2
    torch.testing.assert_close(F.lstm_cell(x, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh),
                               torch.lstm_cell(x, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))


def _flatten(result):
    out, (h, c) = result
    return [out.data if isinstance(out, PackedSequence) else out, h, c]


def test_empty_batch(backend):
    module = rnn.LSTM(3, 5, bidirectional=True, device=DEVICE)
    x = torch.empty(4, 0, 3, device=DEVICE, requires_grad=True)
    out, (h, c) = module(x)
    assert out.shape == (4, 0, 10) and h.shape == c.shape == (2, 0, 5)
    (out.sum() + h.sum() + c.sum()).backward()
    assert module.weight_hh_l0.grad is not None and torch.all(module.weight_hh_l0.grad == 0)


# ---------------------------------------------------------------------------------------------
# The schedule of rows behind every variable-length batch.

def test_schedule_of_a_packed_batch():
    steps, start_rows = ops.schedule((3, 2, 2, 1), False)
    assert steps == ((0, 3, 0, 0, 3, 2), (3, 2, 0, 3, 5, 2), (5, 2, 3, 2, 7, 1), (7, 1, 5, 2, 0, 0))
    assert start_rows == (0, 1, 2)
    steps, start_rows = ops.schedule((3, 2, 2, 1), True)
    assert steps == ((7, 1, 0, 0, 5, 2), (5, 2, 7, 1, 3, 2), (3, 2, 5, 2, 0, 3), (0, 3, 3, 2, 0, 0))
    assert start_rows == (7, 6, 2)  # each sequence starts (in reverse) at its own last step


# ---------------------------------------------------------------------------------------------
# The module protocol: state_dict, class swap, registry, explain.

MODULE_CONFIGS = [dict(input_size=5, hidden_size=7), dict(input_size=4, hidden_size=6, num_layers=2, bias=False),
                  dict(input_size=3, hidden_size=8, proj_size=3, bidirectional=True, batch_first=True)]


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=str)
def test_state_dict_round_trips_with_torch(config):
    theirs = torch.nn.LSTM(**config)
    ours = rnn.LSTM(**config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    ours.load_state_dict(theirs.state_dict())
    shape = (2, 4, config["input_size"]) if config.get("batch_first") else (4, 2, config["input_size"])
    x = make_tensor(shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    back = torch.nn.LSTM(**config)
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), theirs.state_dict().values()))
    cell_theirs, cell_ours = torch.nn.LSTMCell(5, 7, bias=config.get("bias", True)), rnn.LSTMCell(5, 7)
    if not config.get("bias", True):
        cell_ours = rnn.LSTMCell(5, 7, bias=False)
    assert list(cell_ours.state_dict()) == list(cell_theirs.state_dict())
    cell_ours.load_state_dict(cell_theirs.state_dict())
    x = make_tensor((3, 5))
    torch.testing.assert_close(cell_ours(x), cell_theirs(x), rtol=1e-4, atol=1e-5)


def test_class_swap_of_torch_instances():
    """bigkern.patch swaps __class__: a torch instance must work at once, with its own parameters."""
    from bigkern.nn import DROP_INS

    assert DROP_INS[torch.nn.LSTM] is rnn.LSTM and DROP_INS[torch.nn.LSTMCell] is rnn.LSTMCell
    model = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    x = make_tensor((5, 2, 4))
    expected = model(x)
    model.__class__ = rnn.LSTM
    got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # parameters swapped in after construction are what forward uses
        model.weight_hh_l0.mul_(0.5)
    model.__class__ = torch.nn.LSTM
    expected = model(x)
    model.__class__ = rnn.LSTM
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    cell = torch.nn.LSTMCell(4, 6)
    expected = cell(x[0])
    cell.__class__ = rnn.LSTMCell
    torch.testing.assert_close(cell(x[0]), expected, rtol=1e-4, atol=1e-5)


def test_functional_call_sees_swapped_parameters():
    module = rnn.LSTM(3, 4)
    params = {name: torch.zeros_like(p) for name, p in module.named_parameters()}
    out, (h, c) = torch.func.functional_call(module, params, (make_tensor((2, 1, 3)),))
    assert torch.all(out == 0) and torch.all(c == 0)


def test_forced_backend_runs_forward_and_backward(backend, monkeypatch):
    """Both ops run on the forced backend (autograd's backward thread sees the same request)."""
    calls = []
    for op in (ops.LSTM_LAYER, ops.LSTM_LAYER_BACKWARD):
        impl = op.implementations[backend]

        def spy(*args, name=op.name, run=impl.run):
            calls.append(name)
            return run(*args)
        monkeypatch.setattr(impl, "run", spy)
    module = rnn.LSTM(3, 5, device=DEVICE)
    try:
        out, _ = module(make_tensor((2, 2, 3), device=DEVICE))
        out.sum().backward()
    except bigkern.UnsupportedError as reason:
        if backend != "cuda":
            raise
        pytest.skip(str(reason))
    assert calls == ["lstm_layer", "lstm_layer_backward"]


def test_explain_modules(backend):
    x = make_tensor((3, 2, 4), device=DEVICE)
    for module, inputs in ((rnn.LSTM(4, 6, device=DEVICE), x), (rnn.LSTMCell(4, 6, device=DEVICE), x[0])):
        explanation = bigkern.explain(module, inputs)
        assert set(explanation.reasons) == {"triton", "cuda", "torch"}
        if backend != "cuda":
            assert explanation.backend == backend


def test_forcing_cuda_on_cpu_tensors_says_why():
    if GPU:
        pytest.skip("CPU-only check")
    module = rnn.LSTM(3, 5)
    with bigkern.use_backend("cuda"), pytest.raises(bigkern.UnsupportedError, match="CUDA tensors|extension"):
        module(make_tensor((2, 2, 3)))


def test_cuda_ops_are_registered():
    from bigkern import _ext

    if _ext.extension() is None:
        pytest.skip(f"bigkern._C: {_ext.unavailable_reason()}")
    for name in ("lstm_persistent_plan_cuda", "lstm_persistent_forward_cuda", "lstm_persistent_backward_cuda"):
        assert hasattr(torch.ops.bigkern, name), name


# ---------------------------------------------------------------------------------------------
# The Triton kernels compile for the GPUs too (the interpreter checks semantics, not codegen).

COMPILE_FOR_GPUS = """
from bigkern.codegen import compile_for_gpu
from bigkern.kernels import lstm as kernels


def compile_for(kernel, arch, dtype, constexprs, fp32_names=()):
    compile_for_gpu(kernel, constexprs, arch, pointer="*" + dtype, types={name: "*fp32" for name in fp32_names})


state = ("bias_ptr", "cells_ptr", "gates_ptr", "dc_ptr")
for arch, dtype, precision in ((90, "fp16", "ieee"), (80, "fp32", "tf32")):
    tiles = dict(BLOCK_B=32, BLOCK_K=64, PRECISION=precision)
    compile_for(kernels.lstm_forward_step_kernel, arch, dtype,
                dict(HAS_BIAS=True, PROJ=True, SAVE_GATES=True, BLOCK_H=16, **tiles), state)
    compile_for(kernels.lstm_projection_kernel, arch, dtype, dict(BLOCK_P=16, **tiles))
    compile_for(kernels.lstm_hidden_grad_kernel, arch, dtype, dict(BLOCK_P=16, **tiles))
    for proj in (False, True):
        compile_for(kernels.lstm_backward_step_kernel, arch, dtype, dict(PROJ=proj, BLOCK_H=32, **tiles), state)
print("compiled")
"""


def test_triton_kernels_compile_for_hopper_and_ampere():
    """Code generation down to cubin for sm_90 and sm_80, without a GPU (in a process of its own:
    this one runs the interpreter)."""
    import os
    import subprocess
    import sys

    if GPU:
        pytest.skip("the GPU tests compile and run every kernel")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode and "ptxas" in result.stderr.lower() and "not found" in result.stderr.lower():
        pytest.skip("Triton has no ptxas here")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile

@pytest.mark.parametrize("op_backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["dense", "packed-reverse-proj"])
def test_opcheck(op_backend, variant):
    if backend_skip_reason(op_backend):
        pytest.skip(backend_skip_reason(op_backend))
    H, P, I = 5, (3 if variant != "dense" else 5), 4
    sizes = [] if variant == "dense" else [3, 2, 2, 1]
    N, B = (6, 2) if variant == "dense" else (8, 3)
    gx = make_tensor((N, 4 * H), device=DEVICE, requires_grad=True)
    w_hh = make_tensor((4 * H, P), device=DEVICE, requires_grad=True)
    b_ih, b_hh = (make_tensor((4 * H,), device=DEVICE, requires_grad=True) for _ in range(2))
    w_hr = make_tensor((P, H), device=DEVICE, requires_grad=True) if P != H else None
    h0 = make_tensor((B, P), device=DEVICE, requires_grad=True)
    c0 = make_tensor((B, H), device=DEVICE, requires_grad=True)
    reverse = variant != "dense"
    del I
    with bigkern.use_backend(op_backend), memory.poisoned_outputs(False):
        args = (gx, w_hh, b_ih, b_hh, w_hr, h0, c0, sizes, reverse, True)
        torch.library.opcheck(torch.ops.bigkern.lstm_layer.default, args)
        out, hn, cn, gates, cells = torch.ops.bigkern.lstm_layer(*args)
        grads = [make_tensor(t.shape, device=DEVICE) for t in (out, hn, cn)]
        torch.library.opcheck(torch.ops.bigkern.lstm_layer_backward.default,
                              (*grads, out.detach(), gates.detach(), cells.detach(), w_hh.detach(),
                               None if w_hr is None else w_hr.detach(), h0.detach(), c0.detach(), sizes, reverse))


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = rnn.LSTMCell(14, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        h2, _ = self.cell(out[:, -1], (h[-1, :, :6], c[-1, :, :6]))
        return self.head(h2) + h.sum()


def test_torch_compile_fullgraph():
    model = Tagger()
    x = make_tensor((3, 4, 5), requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    # Dynamo refuses every torch.nn.LSTM instance (subclasses too) unless allow_rnn is set
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    for a, b in zip([p.grad for p in model.parameters()] + [x.grad], expected_grads):
        torch.testing.assert_close(a, b)


def test_functional_compiles_without_configuration_and_exports():
    weights = [make_tensor(s) * 0.3 for s in ((28, 5), (28, 7), (28,), (28,))]
    cell_weights = [make_tensor(s) * 0.3 for s in ((28, 7), (28, 7))]

    def step(x):
        out, (h, c) = F.lstm_layer(x, None, *weights)
        h2, c2 = F.lstm_cell(out[-1], (h, c), *cell_weights)
        return out.sum(0) + h2 + c2

    x = make_tensor((4, 3, 5))
    expected = step(x)
    torch.testing.assert_close(torch.compile(step, backend="aot_eager", fullgraph=True)(x), expected)

    class Step(torch.nn.Module):
        def forward(self, x):
            return step(x)

    exported = torch.export.export(Step(), (x,))
    assert any("bigkern.lstm_layer" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_exported_without_grad_still_differentiates(backend, cls):
    """Exported under no_grad, then run with grad, torch's LSTM differentiates; so must bigkern's (the
    op was traced with nothing kept for backward: it recomputes the forward)."""
    torch_module = getattr(torch.nn, cls)(5, 7, **({"num_layers": 2} if cls == "LSTM" else {}))
    module = bigkern.patch(copy.deepcopy(torch_module))
    x = make_tensor((4, 3, 5) if cls == "LSTM" else (3, 5))

    def first(outputs):
        return outputs[0]

    with torch.no_grad():
        exported = torch.export.export(module, (x,))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    first(exported.module()(x1)).sum().backward()
    first(torch_module(x2)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception type, naming the argument.

def _raises_like_torch(torch_call, our_call, name):
    with pytest.raises(Exception) as theirs:
        torch_call()
    with pytest.raises(type(theirs.value), match=name):
        our_call()


def test_bad_input_to_lstm():
    theirs = torch.nn.LSTM(4, 5, num_layers=2)
    ours = rnn.LSTM(4, 5, num_layers=2)
    ours.load_state_dict(theirs.state_dict())
    x = make_tensor((3, 2, 4))
    good = (make_tensor((2, 2, 5)), make_tensor((2, 2, 5)))
    cases = [
        ((make_tensor((3, 2, 3)),), "input_size"),
        ((make_tensor((3, 2, 4, 1)),), "Expected input"),
        ((x, (good[0], make_tensor((2, 2, 4)))), r"hidden\[1\]"),
        ((x, (make_tensor((2, 3, 5)), good[1])), r"hidden\[0\]"),
        ((x, (good[0], make_tensor((2, 2))),), "hx and cx"),
        ((x.half(),), "dtype"),
        ((make_tensor((0, 2, 4)),), "sequence length"),
        ((x, [good[0], good[1], good[1]]), "two hidden states"),
    ]
    for args, name in cases:
        _raises_like_torch(lambda: theirs(*args), lambda: ours(*args), name)
    # dtype mismatches between input and hx: torch's CPU path fails deep inside (RuntimeError)
    bad_state = (good[0].double(), good[1])
    _raises_like_torch(lambda: theirs(x, bad_state), lambda: ours(x, bad_state), r"hx\[0\]")


def test_bad_input_to_packed_lstm():
    theirs = torch.nn.LSTM(4, 5)
    ours = rnn.LSTM(4, 5)
    ours.load_state_dict(theirs.state_dict())
    x = pack_sequence([make_tensor((n, 4)) for n in (2, 3)], enforce_sorted=False)
    wrong_width = pack_sequence([make_tensor((n, 3)) for n in (2, 3)], enforce_sorted=False)
    half = PackedSequence(x.data.half(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    cases = [
        ((x, (make_tensor((1, 2, 4)), make_tensor((1, 2, 5)))), r"hidden\[0\]"),
        ((x, (make_tensor((1, 2, 5)), make_tensor((1, 2, 6)))), r"hidden\[1\]"),
        ((wrong_width,), "input_size"),
        ((half,), "dtype"),
        ((x, (make_tensor((2, 5)), make_tensor((2, 5)))), r"hx\[0\]"),  # 2-D state: torch's IndexError
        ((PackedSequence(x.data[:0], torch.tensor([], dtype=torch.int64)),), "batch_sizes"),  # no steps
    ]
    for args, name in cases:
        _raises_like_torch(lambda: theirs(*args), lambda: ours(*args), name)
    _raises_like_torch(lambda: theirs(make_tensor((0, 2, 4))), lambda: ours(make_tensor((0, 2, 4))),
                       "Expected sequence length to be larger than 0")  # torch's wording, case included


def test_lstm_cell_double_backward_matches_finite_differences():
    cell = rnn.LSTMCell(3, 4).double()
    x, h, c = (make_tensor(shape, dtype=torch.float64).requires_grad_() for shape in ((2, 3), (2, 4), (2, 4)))
    with bigkern.record() as calls:
        assert torch.autograd.gradgradcheck(lambda x, h, c: cell(x, (h, c)), (x, h, c))
    assert calls[("lstm_layer_double_backward", "torch")] > 0, dict(calls)


def test_double_backward_says_it_is_not_supported():
    """Like cuDNN's LSTM: a clear error when gradients taken with create_graph=True are
    differentiated again (torch.func.grad twice runs torch's ops instead, and works)."""
    lstm = rnn.LSTM(3, 4).double()
    x = make_tensor((5, 2, 3), dtype=torch.float64).requires_grad_()
    grad, = torch.autograd.grad(lstm(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        grad.square().sum().backward()
    twice = torch.func.grad(lambda a: torch.func.grad(lambda b: lstm(b)[0].sum())(a).square().sum())(x.detach())
    reference = torch.nn.LSTM(3, 4).double()
    reference.load_state_dict(lstm.state_dict())
    expected = torch.func.grad(lambda a: torch.func.grad(lambda b: reference(b)[0].sum())(a).square().sum())(x.detach())
    torch.testing.assert_close(twice, expected)


@pytest.mark.parametrize("batch_sizes,state", [
    ([2, 3, 2], False),         # increasing: torch fails inside its loop
    ([3, 0, 2, 2], False),      # an empty step
    ([3, 3, 3], False),         # more rows than the data has (our kernels would read past it)
    ("int32", True),            # not int64
    ("2-d", False),             # (with a state, torch 2.11 runs it; 2.14 raises RuntimeError; bigkern too)
    ("float", False),           # torch.nn.LSTM sizes its zero state by it first: TypeError
], ids=str)
def test_bad_batch_sizes_of_a_hand_made_packed_sequence(backend, batch_sizes, state):
    """PackedSequence(data, batch_sizes) built by hand, not by pack_padded_sequence: what torch
    rejects, bigkern rejects with torch's exception type, naming batch_sizes, before any kernel runs."""
    if backend_skip_reason(backend) or backend == "cuda":
        pytest.skip(backend_skip_reason(backend) or "the persistent kernel takes dense batches")
    theirs = torch.nn.LSTM(4, 5).to(DEVICE)
    ours = rnn.LSTM(4, 5).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    data = make_tensor((7, 4), device=DEVICE)
    if isinstance(batch_sizes, str):
        sizes = {"int32": torch.tensor([3, 2, 2], dtype=torch.int32), "2-d": torch.tensor([[3, 2, 2]]),
                 "float": torch.tensor([3.0, 2.0, 2.0])}[batch_sizes]
    else:
        sizes = torch.tensor(batch_sizes)
    packed = PackedSequence(data, sizes)
    hx = (make_tensor((1, 3, 5), device=DEVICE), make_tensor((1, 3, 5), device=DEVICE)) if state else None
    with bigkern.use_backend(backend):
        _raises_like_torch(lambda: theirs(packed, hx), lambda: ours(packed, hx), "batch_sizes")


def test_packed_rows_past_the_batch_sizes_are_ignored_as_torch_ignores_them(backend):
    if backend_skip_reason(backend) or backend == "cuda":
        pytest.skip(backend_skip_reason(backend) or "the persistent kernel takes dense batches")
    theirs = torch.nn.LSTM(4, 5).to(DEVICE)
    ours = rnn.LSTM(4, 5).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    packed = PackedSequence(make_tensor((7, 4), device=DEVICE), torch.tensor([3, 2]))
    expected, (h, c) = theirs(packed)
    with bigkern.use_backend(backend):
        out, (h_ours, c_ours) = ours(packed)
    assert out.data.shape == expected.data.shape == (5, 5)
    torch.testing.assert_close(out.data, expected.data)
    torch.testing.assert_close((h_ours, c_ours), (h, c))


def test_bad_input_to_lstm_cell():
    theirs = torch.nn.LSTMCell(4, 5)
    ours = rnn.LSTMCell(4, 5)
    ours.load_state_dict(theirs.state_dict())
    x = make_tensor((2, 4))
    cases = [
        ((make_tensor((2, 3)),), "input_size"),
        ((x, (make_tensor((3, 5)), make_tensor((2, 5)))), "batch size"),
        ((x, (make_tensor((2, 5)), make_tensor((2, 6)))), "hidden_size"),
        ((make_tensor((2, 3, 4)),), "1D or 2D"),
        ((x, (make_tensor((1, 2, 5)), make_tensor((2, 5)))), r"hx\[0\]"),
        ((x.half(),), "dtype"),
        ((x, (make_tensor((2, 5)).double(), make_tensor((2, 5)))), r"hx\[0\]"),
        ((x, (make_tensor((2, 5)),)), "two hidden states"),
        ((x, make_tensor((2, 5))), "'hx'"),
        ((make_tensor((1, 4)), (make_tensor((5,)), make_tensor((5,)))), r"hx\[0\]"),
        ((x, (make_tensor((2, 5, 1)), make_tensor((2, 5)))), r"hx\[0\]"),
    ]
    for args, name in cases:
        _raises_like_torch(lambda: theirs(*args), lambda: ours(*args), name)


def test_bad_input_to_functional():
    w_ih, w_hh = make_tensor((20, 3)), make_tensor((20, 5))
    with pytest.raises(TypeError, match="'input'"):
        F.lstm_layer([1.0], None, w_ih, w_hh)
    with pytest.raises(RuntimeError, match="'weight_hh'"):
        F.lstm_layer(make_tensor((2, 1, 3)), None, w_ih, make_tensor((20, 4)))
    with pytest.raises(RuntimeError, match="'bias_ih'"):
        F.lstm_layer(make_tensor((2, 1, 3)), None, w_ih, w_hh, make_tensor((19,)))
    with pytest.raises(RuntimeError, match="'weight_hh'"):
        F.lstm_layer(make_tensor((2, 1, 3)), None, w_ih, w_hh.double())
    with pytest.raises(RuntimeError, match=r"'hx\[1\]'"):
        F.lstm_layer(make_tensor((2, 1, 3)), (make_tensor((1, 5)), make_tensor((2, 5))), w_ih, w_hh)
    with pytest.raises(RuntimeError, match="'input'"):
        F.lstm_layer(torch.ones(2, 1, 3, dtype=torch.int64), None, w_ih, w_hh)
    with pytest.raises(RuntimeError, match="parameters"):
        F.lstm(make_tensor((2, 1, 3)), None, [w_ih, w_hh, w_ih, w_hh, w_ih], False, 1, 0.0, False, False, False)


def test_functional_bad_input_like_torch_functional():
    """torch.lstm_cell / torch.lstm's own exception types where they check (they read sizes first:
    IndexError); where torch's functional does not check at all and reads memory it should not
    (hx of another batch size, mismatched weights), bigkern still raises a RuntimeError."""
    x, h, c = make_tensor((2, 4)), make_tensor((2, 5)), make_tensor((2, 5))
    w_ih, w_hh, b_ih, b_hh = make_tensor((20, 4)), make_tensor((20, 5)), make_tensor((20,)), make_tensor((20,))
    cell_cases = [
        ((make_tensor((4,)), (h, c), w_ih, w_hh, b_ih, b_hh), "'input'"),
        ((x, (h, c), make_tensor((20,)), w_hh, b_ih, b_hh), "'weight_ih'"),
        ((x, (h, c), w_ih, w_hh, make_tensor((20, 1)), b_hh), "'bias_ih'"),
    ]
    for args, name in cell_cases:
        _raises_like_torch(lambda: torch.lstm_cell(*args), lambda: F.lstm_cell(*args), name)
    xs, h0, c0 = make_tensor((3, 2, 4)), make_tensor((1, 2, 5)), make_tensor((1, 2, 5))
    params = [w_ih, w_hh, b_ih, b_hh]
    lstm_cases = [
        ((xs[0], (h0, c0), params, True, 1, 0.0, False, False, False), "'input'"),
        ((xs, (h0[0], c0), params, True, 1, 0.0, False, False, False), r"'hx\[0\]'"),
        ((xs, h0, params, True, 1, 0.0, False, False, False), "invalid combination of arguments"),
    ]
    for args, name in lstm_cases:
        _raises_like_torch(lambda: torch.lstm(*args), lambda: F.lstm(*args), name)
    with pytest.raises(RuntimeError, match=r"'hx\[0\]'"):
        F.lstm(xs, (make_tensor((1, 3, 5)), c0), params, True, 1, 0.0, False, False, False)


def test_lstm_cell_biases_broadcast_like_torch(backend):
    """torch.lstm_cell adds its biases by broadcasting: a (1,), (1, 4H) or per-row (B, 4H) bias works."""
    x, h, c = (make_tensor(s, device=DEVICE, requires_grad=True) for s in ((3, 4), (3, 5), (3, 5)))
    w_ih, w_hh = make_tensor((20, 4), device=DEVICE), make_tensor((20, 5), device=DEVICE)
    for b_ih, b_hh in [(make_tensor((1, 20), device=DEVICE), make_tensor((20,), device=DEVICE)),
                       (make_tensor((3, 20), device=DEVICE), make_tensor((1, 20), device=DEVICE)),
                       (make_tensor((1,), device=DEVICE), make_tensor((20,), device=DEVICE))]:
        b_ih.requires_grad_()
        expected = torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        got = F.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        for want, have in zip(expected, got):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
        want_grads = torch.autograd.grad(sum(t.sum() for t in expected), (x, b_ih))
        have_grads = torch.autograd.grad(sum(t.sum() for t in got), (x, b_ih))
        for want, have in zip(want_grads, have_grads):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The persistent CUDA kernel (GPU only).

PERSISTENT_CASES = [(512, 1, 50), (1024, 4, 50), (768, 2, 13), (129, 3, 7), (256, 7, 9)]  # (hidden, batch, steps)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden,batch,steps", PERSISTENT_CASES)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_persistent_cuda_kernel_matches_fp64(dtype, hidden, batch, steps, training):
    """Forced cuda must really run the persistent kernels here (both directions), not skip."""
    module = rnn.LSTM(hidden, hidden, bidirectional=True, device="cuda", dtype=dtype)
    x = make_tensor((steps, batch, hidden), dtype, "cuda")
    hx = random_hx(dict(hidden_size=hidden, bidirectional=True), batch, dtype)
    assert ops.persistent_plan_reason(module.weight_hh_l0, batch, backward=training) is None
    with bigkern.use_backend("cuda"):
        check(ops.compare_with_reference(module, x, hx, backward=training))


@pytest.mark.gpu
def test_persistent_plan_reasons():
    big = torch.empty(4 * 4096, 4096, device="cuda", dtype=torch.float32)
    reason = ops.persistent_plan_reason(big, 1)
    assert reason and "shared memory" in reason
    small = torch.empty(4 * 256, 256, device="cuda", dtype=torch.float16)
    assert ops.persistent_plan_reason(small, 2) is None
    assert "batch" in ops.persistent_plan_reason(small, 4096)


# ---------------------------------------------------------------------------------------------
# The benchmark suite runs end to end (timings on the CPU only test the harness).

def test_lstm_benchmark_suite_runs_on_cpu(tmp_path):
    import json

    from bigkern import benchmark

    shapes = {"lstm": {"inference": [{"hidden": 16, "batch": 2, "steps": 3, "quick": True}],
                       "training": [{"hidden": 7, "batch": 3, "steps": 2, "quick": True}]}}
    shapes_path = tmp_path / "shapes.json"
    shapes_path.write_text(json.dumps(shapes))
    rc = benchmark.main(["--cpu", "--quick", "--family", "lstm", "--shapes", str(shapes_path), "--results",
                         str(tmp_path / "results"), "--provider", "bigkern-triton", "bigkern-cuda", "torch-eager"])
    assert rc == 0
    [path] = (tmp_path / "results").glob("*/*.json")
    statuses = {(r["mode"], r["provider"]): r["status"] for r in json.loads(path.read_text())["rows"]}
    triton_status = "ok" if backend_skip_reason("triton", "cpu") is None else "unavailable"  # timed on the CPU
    assert statuses[("inference", "bigkern-triton")] == triton_status
    assert statuses[("training", "bigkern-triton")] == triton_status
    assert statuses[("training", "torch-eager")] == "ok"
    assert statuses[("inference", "bigkern-cuda")] == "unavailable"


def test_handwritten_baseline_is_an_lstm():
    from bigkern.benchmark.lstm import handwritten_lstm

    module = torch.nn.LSTM(3, 5)
    x, h0, c0 = make_tensor((4, 2, 3)), make_tensor((2, 5)), make_tensor((2, 5))
    out, h, c = handwritten_lstm(x, h0, c0, *module._flat_weights)
    ref, (ref_h, ref_c) = module(x, (h0[None], c0[None]))
    torch.testing.assert_close((out, h, c), (ref, ref_h[0], ref_c[0]), rtol=1e-4, atol=1e-5)
