"""triton.autotune, the bigkern way, for every family's kernels.

- Results are cached on disk (Triton's `cache_results`: keyed by Triton's version, the GPU target,
  the kernel source and the tuning key, in Triton's cache directory), so a second process starts
  without re-tuning. `bigkern info` shows the cache.
- Under the interpreter only the first config is kept: timing there means nothing, and each extra
  config would cost a full interpreted run.
"""

import inspect
import os
from pathlib import Path

import triton


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs, key, **kwargs):
    if _interpreting():
        configs = configs[:1]
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kwargs)


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
