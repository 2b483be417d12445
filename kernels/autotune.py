"""triton.autotune, the bigkern way, for every family's kernels.

- Results are cached on disk (Triton's `cache_results`: keyed by Triton's version, the GPU target,
  the kernel source and the tuning key, in Triton's cache directory), so a second process starts
  without re-tuning. `bigkern info` shows the cache.
- Under the interpreter only the first config is kept: timing there means nothing, and each extra
  config would cost a full interpreted run.
- BIGKERN_TRITON_AUTOTUNE=0 keeps the first config that survives the kernel's own pruning, so no
  tile is timed (the test suite sets it: on a GPU it runs hundreds of shapes and would otherwise
  compile and time every tile of every kernel variant for each). Triton 3.6 still times a lone
  config (warm-up and repeats, for every new shape): the timer then times nothing.
"""

import inspect
import os
from pathlib import Path

import triton


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning_enabled() -> bool:
    return os.environ.get("BIGKERN_TRITON_AUTOTUNE", "1") not in ("", "0")


def autotune(configs, key, **kwargs):
    if _interpreting():
        configs = configs[:1]
    parameters = inspect.signature(triton.autotune).parameters
    if "cache_results" in parameters:
        kwargs.setdefault("cache_results", True)
    if "do_bench" in parameters:
        kwargs.setdefault("do_bench", _timer)
    prune_by = dict(kwargs.pop("prune_configs_by", None) or {})
    prune_by["early_config_prune"] = pruner(prune_by.get("early_config_prune"))
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune_by, **kwargs)


def _timer(kernel_call, quantiles):
    """Triton's timing of one config; nothing to time when autotuning is off (one config is left,
    which the launch compiles and runs anyway)."""
    if not autotuning_enabled():
        return [0.0] * len(quantiles)
    import triton.testing

    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def pruner(kernel_prune=None):
    """The kernel's own pruning, then only its first survivor when autotuning is off."""
    def prune(configs, named_args, **kwargs):
        kept = kernel_prune(configs, named_args, **kwargs) if kernel_prune else configs
        return kept if autotuning_enabled() else kept[:1]
    return prune


def cache_dir() -> Path:
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):
        return Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))


def cache_entries():
    """Paths of the stored autotuning results."""
    directory = cache_dir()
    return sorted(directory.glob("*/*.autotune.json")) if directory.exists() else []
