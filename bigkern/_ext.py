"""Loading the compiled extension bigkern._C, and why it may be missing.

A missing extension is normal (no CUDA toolkit at build time, or BIGKERN_BUILD_CUDA=0); an extension
built against another torch is refused with one warning naming both versions, because loading it
could crash on ABI differences. Either way bigkern imports and serves through Triton and torch.
"""

import functools
import importlib
import warnings
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def build_info():
    """What setup.py recorded at build time, or None when bigkern was never built (a source tree)."""
    try:
        return importlib.import_module("bigkern._build_info")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _load():
    """(module or None, reason it is unavailable or None)."""
    info = build_info()
    if info is None:
        return None, "bigkern was not built (no bigkern/_build_info.py): run `pip install --no-build-isolation -e .`"
    if not info.cuda_built:
        return None, f"the CUDA extension was not built: {info.skipped_reason}"
    if info.torch_version != torch.__version__:
        reason = (f"bigkern._C was built against torch {info.torch_version} but torch {torch.__version__} "
                  f"is installed; rebuild bigkern (serving through Triton and torch until then)")
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return None, reason
    try:
        module = importlib.import_module("bigkern._C")
    except ImportError as error:
        reason = f"bigkern._C failed to load: {error}"
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return None, reason
    return module, None


def extension():
    """The loaded bigkern._C module, or None."""
    return _load()[0]


def unavailable_reason():
    """Why bigkern._C cannot serve, or None when it is loaded."""
    return _load()[1]


def _parse_archs(arch_list):
    """[(major, minor, arch-specific, ptx)] from a TORCH_CUDA_ARCH_LIST such as "8.0;9.0a;9.0+PTX"."""
    archs = []
    for entry in (arch_list or "").replace(",", ";").replace(" ", ";").split(";"):
        ptx = entry.endswith("+PTX")
        major, _, minor = entry.removesuffix("+PTX").rstrip("af").partition(".")
        if major.isdigit() and (minor or "0").isdigit():
            archs.append((int(major), int(minor or 0), entry.removesuffix("+PTX")[-1:] in ("a", "f"), ptx))
    return archs


def arch_reason(capability, arch_list) -> Optional[str]:
    """Why a build for `arch_list` has no kernel that runs on a GPU of `capability`, or None."""
    major, minor = capability
    for a_major, a_minor, specific, ptx in _parse_archs(arch_list):
        if ptx and (a_major, a_minor) <= (major, minor):
            return None  # the driver compiles the PTX for this GPU
        if a_major == major and (a_minor == minor if specific else a_minor <= minor):
            return None  # a cubin runs on later minor versions of its major, unless arch-specific
    return (f"bigkern._C was built for {arch_list}, which has no kernel for compute capability "
            f"{major}.{minor} (rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor})")
