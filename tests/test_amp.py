import torch

from bigkern import amp


def test_cast_inputs_follows_autocast():
    x, idx = torch.randn(2, 3), torch.ones(2, dtype=torch.long)
    assert amp.cast_inputs(x, None, idx) == (x, None, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, none, cidx = amp.cast_inputs(x, None, idx)
        assert cx.dtype == torch.bfloat16 and none is None and cidx.dtype == torch.long
        assert amp.cast_inputs(x.double())[0].dtype == torch.float64  # autocast never casts float64
        assert amp.autocast_dtype(x) == torch.bfloat16
    assert amp.autocast_dtype(x) is None
