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
