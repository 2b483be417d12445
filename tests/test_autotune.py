"""kernels/autotune.py: one config in the interpreter, disk caching where Triton has it."""

import os

import pytest
import torch

from bigkern.dispatch import triton_unavailable

pytestmark = pytest.mark.skipif(triton_unavailable() is not None, reason="needs triton")


def test_interpreter_keeps_only_the_first_config_and_runs():
    import triton
    import triton.language as tl

    from bigkern.kernels.autotune import autotune

    @autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 64})], key=["n"])
    @triton.jit
    def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2, mask=mask)

    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    assert len(double.configs) == (1 if interpreting else 2)
    device = "cpu" if interpreting else "cuda"
    x = torch.randn(37, device=device)
    y = torch.full_like(x, float("nan"))
    double[lambda meta: (triton.cdiv(37, meta["BLOCK"]),)](x, y, 37)
    torch.testing.assert_close(y, 2 * x)
    if hasattr(double, "cache_results") and not interpreting:
        assert double.cache_results, "autotune results should be cached on disk"


def test_autotune_off_keeps_the_first_config_the_kernel_allows(monkeypatch):
    import triton

    from bigkern.kernels.autotune import pruner

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    prune = pruner(lambda configs, named_args, **kw: configs[1:])  # the kernel rules out the first
    monkeypatch.setenv("BIGKERN_TRITON_AUTOTUNE", "0")
    assert [c.kwargs["BLOCK"] for c in prune(configs, {})] == [32]
    monkeypatch.setenv("BIGKERN_TRITON_AUTOTUNE", "1")
    assert [c.kwargs["BLOCK"] for c in prune(configs, {})] == [32, 64]
    assert [c.kwargs["BLOCK"] for c in pruner()(configs, {})] == [16, 32, 64]
