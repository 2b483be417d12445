"""kernels/autotune.py: one config in the interpreter, disk caching where Triton has it."""

import inspect
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


def test_attention_launches_the_tile_its_pruner_chose(monkeypatch):
    """On a GPU the attention kernels are autotuned over the tiles their pruners pick per shape
    (kernels/attention.py: forward_tiles, dkdv_tiles, dq_tiles). Triton calls a pruner only when
    given more than one config: with a single placeholder every launch ran the placeholder. The
    GPU launch path is replayed here with the launch arguments of a real (interpreted) call, the
    kernel's run replaced by a recorder."""
    import bigkern
    from bigkern.kernels import attention as kernels
    from bigkern.kernels import autotune as tuning

    launches = []
    monkeypatch.setattr(kernels, "_launch", lambda name, raw, grid, args, meta: launches.append((name, grid, args, meta)))
    q, k, v = (torch.randn(1, 2, 40, 32, requires_grad=True) for _ in range(3))
    with bigkern.use_backend("triton"):
        bigkern.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert sorted(name for name, *_ in launches) == ["dkdv", "dq", "forward"]

    monkeypatch.setattr(tuning, "_interpreting", lambda: False)  # build the GPU's autotuner
    monkeypatch.setenv("BIGKERN_TRITON_AUTOTUNE", "0")  # the pruner's first choice, nothing timed
    kernels._tuned.cache_clear()
    try:
        for name, grid, args, meta in launches:
            tuner = kernels._tuned(name)
            launched = {}
            monkeypatch.setattr(tuner.fn, "run", lambda *a, **kw: launched.update(kw))
            tuner.run(*args, grid=grid, warmup=False, **meta)
            tiles = {"forward": kernels.forward_tiles, "dkdv": kernels.dkdv_tiles, "dq": kernels.dq_tiles}[name]
            named = {**dict(zip(tuner.arg_names, args)), **meta}
            block_m, block_n, warps, stages = tiles(named, kernels._capability()[0] >= 9)[0]
            assert (launched["BLOCK_M"], launched["BLOCK_N"], launched["num_warps"], launched["num_stages"]) == \
                (block_m, block_n, warps, stages), name
    finally:
        kernels._tuned.cache_clear()


def test_autotune_off_times_nothing(monkeypatch):
    """With autotuning off one config is left, and Triton 3.6 would still time it (warm-up and
    repeats, for every new shape): bigkern's timer returns without running it."""
    import triton
    import triton.testing

    from bigkern.kernels import autotune as tuning

    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("this Triton's autotune takes no timer")
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, quantiles=None, **kw: timed.append(fn) or [1.0] * 3)
    monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0, mask=tl.arange(0, BLOCK) < n)

    tuned = tuning.autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])(kernel)
    assert tuned._do_bench is tuning._timer or getattr(tuned, "do_bench", None) is tuning._timer

    def launch():
        raise AssertionError("timed with autotuning off")
    monkeypatch.setenv("BIGKERN_TRITON_AUTOTUNE", "0")
    assert tuning._timer(launch, (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    monkeypatch.setenv("BIGKERN_TRITON_AUTOTUNE", "1")
    assert tuning._timer(launch, (0.5, 0.2, 0.8)) == [1.0] * 3 and timed == [launch]
