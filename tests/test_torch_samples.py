"""bigkern on PyTorch's own test inputs (torch.testing._internal's OpInfo and ModuleInfo databases).

PyTorch checks conv2d, scaled_dot_product_attention, Conv2d, LSTM, LSTMCell, MultiheadAttention and
the Transformer layers on these sample inputs, and checks their error inputs raise a given type with a
message matching a given pattern. A drop-in has to pass the same:
  samples  every sample's outputs, input gradients and parameter gradients, by FlashAttention's rule
           against the same call in float64, with one backend forced; the backend really served
           (bigkern.record), or raised UnsupportedError for the whole sample set (then skipped).
  errors   every error input raises torch's exception type with a message matching torch's pattern.
Samples with dropout are left out (different random streams; test_attention/test_lstm check dropout).
"""

import contextlib
import copy
import dataclasses
import math
import re
from unittest import mock

import pytest
import torch
from torch.utils import _pytree as pytree

import bigkern
from bigkern import testing
from bigkern.ops import attention as attention_ops
from bigkern.patch import patched_modules
from conftest import DEVICE, backend_skip_reason

try:
    import expecttest  # noqa: F401  torch.testing._internal's TestCase derives from its
except ImportError:  # the GPU machine's image lacks it; nothing here uses what it adds
    import sys
    import types
    import unittest

    sys.modules["expecttest"] = types.SimpleNamespace(TestCase=unittest.TestCase, ACCEPT=False)
try:
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
    from torch.testing._internal import common_nn
except Exception as error:  # the internal API moved: not a reason to fail the suite
    pytest.skip(f"torch.testing._internal unavailable: {error}", allow_module_level=True)

# bf16 tl.dot returns garbage in the 3.8 interpreter: bf16 is checked on a GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
KERNEL_BACKENDS = ["triton", "cuda"]

OPS = {
    "nn.functional.conv2d": bigkern.nn.functional.conv2d,
    "nn.functional.scaled_dot_product_attention": bigkern.nn.functional.scaled_dot_product_attention,
}
# module classes with a bigkern drop-in, and containers that bigkern.patch fills with them
MODULES = ["Conv2d", "LSTM", "LSTMCell", "MultiheadAttention", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "TransformerEncoder", "Transformer"]


def _op_info(name):
    return next(op for op in op_db if op.name == name and op.variant_test_name == "")


def _module_info(name):
    return next(m for m in module_db if m.module_cls.__name__ == name)


def _forced(backend):
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return bigkern.use_backend(backend)


# ---------------------------------------------------------------------------------------------
# Copies of a call's arguments: same dtype (torch's own computation) and float64 on the CPU (the
# reference). Floating tensors become fresh leaves keeping requires_grad; masks and ints are copied.

def _same_dtype(tree):
    return pytree.tree_map(lambda t: testing.same_dtype_copy(t) if _is_float(t) else t, tree)


def _fp64(tree):
    return pytree.tree_map(lambda t: testing.fp64_copy(t) if _is_float(t) else
                           (t.cpu() if isinstance(t, torch.Tensor) else t), tree)


def _is_float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


@dataclasses.dataclass
class Run:
    """One computation of a sample: what it returned, the call it was given, its module's parameters."""
    out: object
    call: tuple  # (args, kwargs)
    params: dict = dataclasses.field(default_factory=dict)


def _aligned_values(runs):
    """[(name, is_gradient, [value of each run])]: the outputs leaf by leaf; then, after one backward
    pass through every differentiable output (the same random cotangents for every run), the
    gradients of the call's leaf inputs and of the parameters."""
    outs = [pytree.tree_leaves(r.out) for r in runs]
    assert len(outs[0]) == len(outs[1]), f"{len(outs[0])} outputs, torch gives {len(outs[1])}"
    values, losses = [], [[] for _ in runs]
    for i, (a, r, *ts) in enumerate(zip(*outs)):
        if not isinstance(r, torch.Tensor):
            assert a == r, f"output {i}: {a!r}, torch gives {r!r}"
            continue
        assert isinstance(a, torch.Tensor), f"output {i}: {type(a).__name__}, torch gives a tensor"
        assert a.dtype == ts[0].dtype, f"output {i}: dtype {a.dtype}, torch gives {ts[0].dtype}"
        values.append((f"output {i}", False, [a, r, *ts]))
        if a.requires_grad and r.requires_grad:
            cotangent = torch.randn(r.shape, dtype=torch.float64)
            for loss, value in zip(losses, (a, r, *ts)):
                loss.append((value * cotangent.to(value.device, value.dtype)).sum())
    if not losses[0]:
        return values
    for loss in losses:
        sum(loss).backward()
    # the leaves among the call's inputs (a sample may pass a tensor computed from a leaf)
    inputs = [pytree.tree_leaves(r.call) for r in runs]
    leaves = [j for j, t in enumerate(inputs[0]) if _is_float(t) and t.requires_grad and t.is_leaf]
    gradients = [(f"grad input {j}", [x[j].grad for x in inputs]) for j in leaves]
    gradients += [(f"grad {name}", [r.params[name].grad for r in runs]) for name in runs[0].params]
    for name, grads in gradients:
        if grads[1] is None:
            assert grads[0] is None, f"{name}: a gradient where torch has none"
            continue
        assert grads[0] is not None, f"{name}: gradient missing"
        values.append((name, True, grads))
    return values


def _values_with_backward_forced(runs, backend):
    """(_aligned_values(runs) with the backward pass under the forced backend too, None); where the
    backend refuses that backward (UnsupportedError, with its reason): (the outputs' values, the error)."""
    try:
        with _forced(backend), bigkern.record() as calls:
            values = _aligned_values(runs)
    except bigkern.UnsupportedError as error:
        detached = [dataclasses.replace(r, out=pytree.tree_map(
            lambda t: t.detach() if isinstance(t, torch.Tensor) else t, r.out)) for r in runs]
        return _aligned_values(detached), error
    assert all(b == backend for _, b in calls), f"backward served by {dict(calls)}"
    return values, None


def _largest_magnitude(run: Run, values):
    """The largest |x| over a run's inputs, parameters, outputs and gradients."""
    tensors = [t for t in pytree.tree_leaves(run.call) + list(run.params.values()) if _is_float(t)]
    tensors += [v[1] for _, _, v in values]
    return max((t.detach().abs().max().item() for t in tensors if t.numel()), default=0.0)


def _compare_runs(values, scale, grad_floor_ulps=None):
    """The first run against the float64 second, PyTorch's own same-dtype computation third, by
    FlashAttention's rule, outputs and gradients. These samples are tiny modules on inputs uniform
    in [-9, 9]: many values are small sums of large terms (a weight gradient of a saturated LSTM, a
    bias gradient in front of a LayerNorm), and with a few dozen elements torch's largest error is a
    noisy estimate of the rounding; so the floor is measured at `scale`, the largest magnitude in
    the sample (_largest_magnitude: what the terms are made of), not at each tensor's own.
    Returns the Comparisons."""
    results = []
    for name, is_gradient, (a, r, t) in values:
        factor = testing.GRADIENT_FACTOR if is_gradient else testing.OUTPUT_FACTOR
        floor_ulps = grad_floor_ulps if is_gradient else None
        results.append(testing.compare(a, r, t, name=name, factor=factor, floor_ulps=floor_ulps, scale=scale))
    return results


def _logit_magnitude(query, key, scale=None):
    """The largest |logit| of an attention call, plus log S: about the largest |logsumexp|."""
    query, key = query.detach().cpu().double(), key.detach().cpu().double()
    if query.numel() == 0 or key.numel() == 0:
        return 0.0
    if key.dim() > 2 and key.shape[-3] != query.shape[-3]:  # GQA
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    return ((query @ key.transpose(-1, -2)) * scale).abs().max().item() + math.log(key.shape[-2])


def _attention_gradient_floor(dtype, logit_magnitude):
    """The inputs here are uniform in [-9, 9], so attention logits reach tens or hundreds. A flash
    backward recomputes P = exp(s - logsumexp) from the saved logsumexp; s recomputed in another
    summation order differs by ulps of |s|, so P, and every gradient, carries a relative error of
    about eps * |logsumexp|, even where a row attends to one key and P = 1. torch's math backend
    keeps P itself (exactly 1 there), so its own error can sit far below that. (The forward needs
    no such floor: the dominant logit minus the running max is exactly 0.)"""
    return testing.default_floor_ulps(dtype) * max(1.0, logit_magnitude)


@contextlib.contextmanager
def _observing_attention_logits():
    """The logit magnitudes of the attention calls bigkern's modules make inside the block."""
    magnitudes = []
    original = attention_ops.scaled_dot_product_attention

    def observe(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        magnitudes.append(_logit_magnitude(query, key, scale))
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    with mock.patch.object(attention_ops, "scaled_dot_product_attention", observe):
        yield magnitudes


def _skip_unless_served(served, unsupported):
    if not served:
        pytest.skip(f"every sample raised UnsupportedError; first: {unsupported[0]}")


# ---------------------------------------------------------------------------------------------
# Ops: OpInfo samples and error inputs.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_op_samples_match_torch(name, backend, dtype):
    op, fn = _op_info(name), OPS[name]
    served, unsupported = 0, []
    for i, sample in enumerate(op.sample_inputs(DEVICE, dtype, requires_grad=True)):
        if sample.kwargs.get("dropout_p", 0.0) > 0:
            continue
        call = ((sample.input, *sample.args), sample.kwargs)
        call_t, call64 = _same_dtype(call), _fp64(call)
        try:
            with _forced(backend), bigkern.record() as calls:
                out = fn(*call[0], **call[1])
        except bigkern.UnsupportedError as error:
            unsupported.append(f"sample {i}: {error}")
            continue
        assert calls and all(b == backend for _, b in calls), f"sample {i}: served by {dict(calls)}"
        reference = Run(op.op(*call64[0], **call64[1]), call64)
        same_dtype = Run(op.op(*call_t[0], **call_t[1]), call_t)
        floor = None
        if "attention" in name:
            (query, key, *_), kwargs = call64
            floor = _attention_gradient_floor(dtype, _logit_magnitude(query, key, kwargs.get("scale")))
        values, refused = _values_with_backward_forced([Run(out, call), reference, same_dtype], backend)
        if refused:
            unsupported.append(f"sample {i} backward: {refused}")
        else:
            served += 1
        for result in _compare_runs(values, _largest_magnitude(reference, values), floor):
            assert result.ok, f"sample {i} {sample.summary() if hasattr(sample, 'summary') else ''}: {result}"
    _skip_unless_served(served, unsupported)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_conv2d_error_inputs_match_torch(backend):
    errors = list(_op_info("nn.functional.conv2d").error_inputs(DEVICE))
    assert errors
    with _forced(backend):
        for error in errors:
            sample = error.sample_input
            with pytest.raises(error.error_type, match=error.error_regex):
                bigkern.nn.functional.conv2d(sample.input, *sample.args, **sample.kwargs)


# ---------------------------------------------------------------------------------------------
# Modules: ModuleInfo samples (through bigkern.patch, so containers are covered) and error inputs.

def _has_dropout(module):
    return module.training and any(
        (isinstance(m, torch.nn.Dropout) and m.p > 0) or
        (isinstance(getattr(m, "dropout", None), float) and m.dropout > 0) for m in module.modules())


def _module_samples(name, dtype, training):
    info = _module_info(name)
    for sample in info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=True,
                                          training=training):
        if sample.forward_input is not None:
            yield sample


def _check_module_call(torch_module, args, kwargs, backend, dtype):
    """bigkern.patch(a copy of torch_module)(*args, **kwargs) with `backend` forced against the module
    in float64 and as it is (PyTorch's same-dtype computation): outputs, input and parameter
    gradients. Raises UnsupportedError where the backend cannot serve the call."""
    mine = bigkern.patch(copy.deepcopy(torch_module))
    assert patched_modules(mine), "bigkern.patch swapped nothing"
    reference = copy.deepcopy(torch_module).to("cpu", torch.float64)
    call = (args, kwargs)
    call_t, call64 = _same_dtype(call), _fp64(call)
    with _forced(backend), bigkern.record() as calls, _observing_attention_logits() as magnitudes:
        out = mine(*args, **kwargs)
    assert calls and all(b == backend for _, b in calls), f"served by {dict(calls)}"
    runs = [Run(module(*c[0], **c[1]) if o is None else o, c, dict(module.named_parameters()))
            for module, c, o in ((mine, call, out), (reference, call64, None), (torch_module, call_t, None))]
    values, refused = _values_with_backward_forced(runs, backend)
    floor = _attention_gradient_floor(dtype, max(magnitudes)) if magnitudes else None
    for result in _compare_runs(values, _largest_magnitude(runs[1], values), floor):
        assert result.ok, str(result)
    if refused:  # its outputs checked, the refusal is the caller's to count
        raise refused


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES[:1] if DEVICE == "cpu" else DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", MODULES)
def test_module_samples_match_torch(name, backend, dtype, training):
    cls = _module_info(name).module_cls
    served, unsupported = 0, []
    for i, sample in enumerate(_module_samples(name, dtype, training)):
        ctor, forward = sample.constructor_input, sample.forward_input
        torch_module = cls(*ctor.args, **ctor.kwargs).to(DEVICE, dtype).train(training)
        if _has_dropout(torch_module):
            continue
        kwargs = dict(forward.kwargs)
        if cls is torch.nn.MultiheadAttention:
            # the weights are the (L, S) matrix a fused kernel never forms; auto covers the default
            kwargs["need_weights"] = False
        try:
            _check_module_call(torch_module, forward.args, kwargs, backend, dtype)
        except bigkern.UnsupportedError as error:
            unsupported.append(f"sample {i}: {error}")
            continue
        except AssertionError as error:
            raise AssertionError(f"sample {i} ({ctor.args} {ctor.kwargs}, training={training}): {error}") from None
        served += 1
    _skip_unless_served(served, unsupported)


def _legacy_module_tests():
    """The dict-based module tests PyTorch still runs (common_nn): padding modes, groups, depthwise,
    'same'/'valid', an empty batch, the Transformer layers with gelu."""
    for case in common_nn.module_tests + common_nn.get_new_module_tests():
        name = case.get("fullname") or "_".join(filter(None, (case.get("module_name"), case.get("desc"))))
        if name.split("_")[0] in MODULES:
            yield pytest.param(case, id=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(_legacy_module_tests()))
def test_legacy_module_tests_match_torch(case, backend):
    dtype = torch.float32
    if "constructor" in case:
        torch_module = case["constructor"](*case.get("constructor_args", ()))
    else:
        torch_module = getattr(torch.nn, case["module_name"])(*case.get("constructor_args", ()))
    if "input_fn" in case:
        inputs = case["input_fn"]()
        inputs = tuple(t.detach().to(DEVICE, dtype).requires_grad_()
                       for t in (inputs if isinstance(inputs, tuple) else (inputs,)))
    else:
        inputs = (testing.make_tensor(case["input_size"], dtype, DEVICE, requires_grad=True),)
    try:
        _check_module_call(torch_module.to(DEVICE, dtype), inputs, {}, backend, dtype)
    except bigkern.UnsupportedError as error:
        pytest.skip(f"UnsupportedError: {error}")


def test_multihead_attention_samples_with_weights_match_torch_under_auto():
    """need_weights=True (torch's default) is served under auto, by torch, with the same results."""
    cls = torch.nn.MultiheadAttention
    for i, sample in enumerate(_module_samples("MultiheadAttention", torch.float32, True)):
        ctor, forward = sample.constructor_input, sample.forward_input
        torch_module = cls(*ctor.args, **ctor.kwargs).to(DEVICE)
        mine = bigkern.patch(copy.deepcopy(torch_module))
        with bigkern.use_backend("auto"):
            out = mine(*forward.args, **forward.kwargs)
        expected = torch_module(*forward.args, **forward.kwargs)
        for a, e in zip(pytree.tree_leaves(out), pytree.tree_leaves(expected)):
            torch.testing.assert_close(a, e, msg=lambda m: f"sample {i}: {m}")


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("name", ["LSTM", "LSTMCell"])
def test_module_error_inputs_match_torch(name, backend):
    info = _module_info(name)
    drop_in = getattr(bigkern.nn, name)
    errors = list(info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32, requires_grad=False,
                                                training=True))
    assert errors
    with _forced(backend):
        for error in errors:
            ctor, forward = error.module_error_input.constructor_input, error.module_error_input.forward_input
            if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(error.error_type, match=error.error_regex):
                    drop_in(*ctor.args, **ctor.kwargs)
                continue
            module = drop_in(*ctor.args, **ctor.kwargs).to(DEVICE)
            with pytest.raises(error.error_type, match=error.error_regex):
                module(*forward.args, **forward.kwargs)


def test_error_patterns_are_torch_own():
    """The patterns really describe torch: torch's own modules and conv2d raise them too (so a
    pattern that torch stopped matching is noticed here, not mistaken for a bigkern bug)."""
    for error in _op_info("nn.functional.conv2d").error_inputs(DEVICE):
        sample = error.sample_input
        with pytest.raises(error.error_type, match=error.error_regex):
            torch.nn.functional.conv2d(sample.input, *sample.args, **sample.kwargs)
    for name in ("LSTM", "LSTMCell"):
        info = _module_info(name)
        for error in info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32, requires_grad=False,
                                                   training=True):
            ctor, forward = error.module_error_input.constructor_input, error.module_error_input.forward_input
            with pytest.raises(error.error_type, match=re.compile(error.error_regex)):
                module = info.module_cls(*ctor.args, **ctor.kwargs).to(DEVICE)
                module(*forward.args, **forward.kwargs)


# ---------------------------------------------------------------------------------------------
# Bad calls beyond torch's error inputs: the drop-in raises the type torch raises, or, where torch
# answers, answers with the same shapes.

def _bad_module_calls():
    r = lambda shape, dtype=torch.float32: testing.make_tensor(shape, dtype, DEVICE)  # noqa: E731
    kpm = lambda *shape, value=False: torch.full(shape, value, dtype=torch.bool, device=DEVICE)  # noqa: E731
    lstm = lambda: torch.nn.LSTM(4, 5)  # noqa: E731
    cell = lambda: torch.nn.LSTMCell(4, 5)  # noqa: E731
    mha = lambda: torch.nn.MultiheadAttention(8, 2)  # noqa: E731
    layer = lambda: torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0)  # noqa: E731
    conv = lambda: torch.nn.Conv2d(3, 4, 3)  # noqa: E731
    packed = lambda: torch.nn.utils.rnn.pack_padded_sequence(r((6, 3, 4)), [6, 4, 2])  # noqa: E731
    no_weights = dict(need_weights=False)
    return {
        "lstm input size": (lstm, (r((6, 2, 3)),), {}),
        "lstm 4-d input": (lstm, (r((6, 2, 4, 1)),), {}),
        "lstm 1-d input": (lstm, (r((4,)),), {}),
        "lstm h0 shape": (lstm, (r((6, 2, 4)), (r((1, 3, 5)), r((1, 2, 5)))), {}),
        "lstm c0 shape": (lstm, (r((6, 2, 4)), (r((1, 2, 5)), r((1, 2, 6)))), {}),
        "lstm hx not a pair": (lstm, (r((6, 2, 4)), r((1, 2, 5))), {}),
        "lstm unbatched, 3-d hx": (lstm, (r((6, 4)), (r((1, 2, 5)), r((1, 2, 5)))), {}),
        "lstm batched, 2-d hx": (lstm, (r((6, 2, 4)), (r((1, 5)), r((1, 5)))), {}),
        "lstm input dtype": (lstm, (r((6, 2, 4), torch.float64),), {}),
        "lstm integer input": (lstm, (torch.ones(6, 2, 4, dtype=torch.long, device=DEVICE),), {}),
        "lstm packed, hx batch": (lstm, (packed(), (r((1, 2, 5)), r((1, 2, 5)))), {}),
        "lstm empty sequence": (lstm, (r((0, 2, 4)),), {}),
        "lstm empty batch": (lstm, (r((6, 0, 4)),), {}),
        "lstm hx as a list": (lstm, (r((6, 2, 4)), [r((1, 2, 5)), r((1, 2, 5))]), {}),
        "cell input size": (cell, (r((2, 3)),), {}),
        "cell 3-d input": (cell, (r((2, 3, 4)),), {}),
        "cell hx batch": (cell, (r((2, 4)), (r((3, 5)), r((3, 5)))), {}),
        "cell input dtype": (cell, (r((2, 4), torch.float64),), {}),
        "cell hx dtype": (cell, (r((2, 4)), (r((2, 5), torch.float64), r((2, 5)))), {}),
        "cell unbatched, 2-d hx": (cell, (r((4,)), (r((1, 5)), r((1, 5)))), {}),
        "cell empty batch": (cell, (r((0, 4)),), {}),
        "mha embedding size": (mha, (r((3, 2, 6)), r((4, 2, 8)), r((4, 2, 8))), no_weights),
        "mha key/value lengths": (mha, (r((3, 2, 8)), r((4, 2, 8)), r((5, 2, 8))), no_weights),
        "mha batch": (mha, (r((3, 2, 8)), r((4, 3, 8)), r((4, 3, 8))), no_weights),
        "mha key_padding_mask shape": (mha, (r((3, 2, 8)), r((4, 2, 8)), r((4, 2, 8))),
                                       dict(key_padding_mask=kpm(2, 5), **no_weights)),
        "mha 2-d attn_mask shape": (mha, (r((3, 2, 8)), r((4, 2, 8)), r((4, 2, 8))),
                                    dict(attn_mask=kpm(3, 5), **no_weights)),
        "mha 3-d attn_mask shape": (mha, (r((3, 2, 8)), r((4, 2, 8)), r((4, 2, 8))),
                                    dict(attn_mask=kpm(3, 3, 4), **no_weights)),
        "mha integer attn_mask": (mha, (r((3, 2, 8)), r((4, 2, 8)), r((4, 2, 8))),
                                  dict(attn_mask=torch.ones(3, 4, dtype=torch.int32, device=DEVICE), **no_weights)),
        "mha is_causal without a mask": (mha, (r((3, 2, 8)), r((3, 2, 8)), r((3, 2, 8))),
                                         dict(is_causal=True, **no_weights)),
        "mha 4-d query": (mha, (r((3, 2, 8, 1)), r((4, 2, 8, 1)), r((4, 2, 8, 1))), no_weights),
        "mha dtype": (mha, tuple(r((n, 2, 8), torch.float64) for n in (3, 4, 4)), no_weights),
        "mha unbatched, 2-d key_padding_mask": (mha, (r((3, 8)), r((4, 8)), r((4, 8))),
                                                dict(key_padding_mask=kpm(1, 4), **no_weights)),
        "mha every key masked": (mha, (r((3, 2, 8)), r((4, 2, 8)), r((4, 2, 8))),
                                 dict(key_padding_mask=kpm(2, 4, value=True), **no_weights)),
        "layer embedding size": (layer, (r((3, 2, 6)),), {}),
        "layer src_mask shape": (layer, (r((3, 2, 8)),), dict(src_mask=kpm(3, 4))),
        "layer is_causal without a mask": (layer, (r((3, 2, 8)),), dict(is_causal=True)),
        "conv channels": (conv, (r((2, 2, 6, 6)),), {}),
        "conv input smaller than the kernel": (conv, (r((2, 3, 2, 2)),), {}),
        "conv 5-d input": (conv, (r((1, 2, 3, 6, 6)),), {}),
        "conv dtype": (conv, (r((2, 3, 6, 6), torch.float64),), {}),
        "conv reflect padding wider than the input": (
            lambda: torch.nn.Conv2d(3, 4, 3, padding=4, padding_mode="reflect"), (r((2, 3, 3, 3)),), {}),
    }


def _outcome(make_module, args, kwargs, patch, backend):
    torch.manual_seed(0)  # the same weights for both modules
    module = make_module()
    if patch:
        module = bigkern.patch(module)
    try:
        with _forced(backend) if patch else contextlib.nullcontext():
            out = module(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 -- the type is what is compared
        return type(error), str(error)
    return "answer", [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("case", list(_bad_module_calls()))
def test_bad_module_calls_do_what_torch_does(case, backend):
    make_module, args, kwargs = _bad_module_calls()[case]
    expected = _outcome(lambda: make_module().to(DEVICE), args, kwargs, False, backend)
    got = _outcome(lambda: make_module().to(DEVICE), args, kwargs, True, backend)
    if expected[0] == "answer":
        assert got == expected
    else:
        assert got[0] is expected[0], f"torch raises {expected[0].__name__}: {expected[1]}; bigkern: {got}"
