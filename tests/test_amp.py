import pytest
import torch

import bigkern
from bigkern import amp
from conftest import backend_skip_reason


def test_cast_inputs_follows_autocast():
    x, idx = torch.randn(2, 3), torch.ones(2, dtype=torch.long)
    assert amp.cast_inputs(x, None, idx) == (x, None, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, none, cidx = amp.cast_inputs(x, None, idx)
        assert cx.dtype == torch.bfloat16 and none is None and cidx.dtype == torch.long
        assert amp.cast_inputs(x.double())[0].dtype == torch.float64  # autocast never casts float64
        assert amp.autocast_dtype(x) == torch.bfloat16
    assert amp.autocast_dtype(x) is None


@pytest.fixture
def newer_tf32_api():
    """A program that chose TF32 through torch's newer fp32_precision settings: from then on torch
    raises on any read of the legacy allow_tf32 flags. Restored afterwards."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision, conv.fp32_precision = "tf32", "ieee"
    yield
    matmul.fp32_precision, conv.fp32_precision = saved


def test_tf32_allowed_reads_either_api(newer_tf32_api):
    assert amp.tf32_allowed("matmul") is True
    assert amp.tf32_allowed("conv") is False


def test_tf32_allowed_follows_the_legacy_flags():
    flags = {"matmul": torch.backends.cuda.matmul, "conv": torch.backends.cudnn}
    previous = {kind: flag.allow_tf32 for kind, flag in flags.items()}
    # (torch's own test utilities may have called torch.backends.disable_global_flags() in this
    # process; setting cudnn's flags then needs the mutation context torch's flags() uses)
    with getattr(torch.backends, "__allow_nonbracketed_mutation")():
        _flip_and_check(flags, previous)


def _flip_and_check(flags, previous):
    try:
        for kind, flag in flags.items():
            for value in (True, False):
                flag.allow_tf32 = value
                assert amp.tf32_allowed(kind) is value, (kind, value)
    finally:
        for kind, flag in flags.items():
            flag.allow_tf32 = previous[kind]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_entry_points_work_after_the_newer_tf32_api(newer_tf32_api, backend):
    """Attention read the legacy flag on every call (every dtype) and LSTM for float32: both raised
    torch's 'mix of the legacy and new APIs' RuntimeError once a program used the newer setting."""
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    q, k, v = (torch.randn(1, 2, 7, 16) for _ in range(3))
    x = torch.randn(5, 2, 8)
    reference = torch.nn.LSTM(8, 16)
    lstm = bigkern.nn.LSTM(8, 16)
    lstm.load_state_dict(reference.state_dict())
    with bigkern.use_backend(backend):
        out = bigkern.nn.functional.scaled_dot_product_attention(q, k, v)
        y, _ = lstm(x)
        y.sum().backward()
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, reference(x)[0], atol=1e-5, rtol=1e-5)
