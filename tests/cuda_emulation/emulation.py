"""Build the CPU emulation of bigkern's CUDA kernels (see emulator.h) and load it with ctypes.

One translation unit: a driver (e.g. attention_emulated.cpp, with the emulator and C entry points)
followed by the production .cu files, compiled by the host C++ compiler with this directory's
include/ ahead of csrc/ so that the emulator's tensor_core.cuh and launch.cuh stand in for the PTX
and the <<<...>>> launch. Built once per change of any source, cached under `cache_dir`.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
FLAGS = ["-std=c++20", "-O2", "-shared", "-fPIC", "-x", "c++", "-Wno-unknown-pragmas", "-Wno-attributes", "-Wno-psabi"]


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cuda_include_dir() -> Optional[Path]:
    """A CUDA toolkit's include/ (for cuda_fp16.h and friends; nothing else of CUDA is used)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += ["/usr/local/cuda"]
    for candidate in filter(None, candidates):
        include = Path(candidate) / "include"
        if (include / "cuda_fp16.h").exists() and (include / "cuda_runtime.h").exists():
            return include
    return None


def unavailable_reason() -> Optional[str]:
    if compiler() is None:
        return "no host C++ compiler (g++) to build the CUDA emulator"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (cuda_fp16.h) for the CUDA emulator"
    return None


def build(driver: str, sources, cache_dir: Path) -> ctypes.CDLL:
    """Compile `driver` (a file in this directory) followed by `sources` (paths under csrc/) into a
    shared library in cache_dir, unless an identical build is there; load it."""
    include = cuda_include_dir()
    inputs = [HERE / driver] + [CSRC / s for s in sources]
    watched = sorted(set(inputs) | set(HERE.rglob("*.h")) | set(HERE.rglob("*.cuh"))
                     | set(CSRC.rglob("*.h")) | set(CSRC.rglob("*.cuh")))
    digest = hashlib.sha256()
    for path in watched:
        digest.update(str(path).encode() + path.read_bytes())
    digest.update(" ".join(FLAGS + [compiler(), str(include)]).encode())
    name = f"{Path(driver).stem}-{digest.hexdigest()[:16]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    library = cache_dir / f"{name}.so"
    if not library.exists():
        unit = cache_dir / f"{name}.cpp"
        unit.write_text("".join(f'#include "{path}"\n' for path in inputs))
        command = [compiler(), *FLAGS, f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{CSRC}", f"-I{include}",
                   str(unit), "-o", str(library) + ".tmp"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(command)}\n{result.stderr[-8000:]}")
        os.replace(str(library) + ".tmp", library)
    return ctypes.CDLL(str(library))


def library_for_tests(request, driver: str, sources) -> ctypes.CDLL:
    """build() for a pytest session fixture: skips (saying why) where the emulator cannot be built,
    and keeps the libraries in pytest's cache (build/ without one)."""
    import pytest

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("cuda-emulation") if cache is not None else request.config.rootpath / "build"
    return build(driver, sources, cache_dir)


# Arguments of the drivers' C entry points.

def dtype_code(dtype) -> int:
    """csrc/common/dtype.cuh's DType of a torch dtype."""
    import torch

    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


def array(ctype, values):
    """A C array of `values` (never empty: a pointer to it is always valid)."""
    return (ctype * max(1, len(values)))(*values)


def pointer(t) -> ctypes.c_void_p:
    """A tensor's data pointer, or null for None."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

