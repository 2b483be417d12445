"""Build bigkern: the Python package, the Triton kernels (`kernels/` installed as `bigkern.kernels`)
and, when a CUDA toolkit is found, the C++/CUDA extension `bigkern._C`.

Environment:
  BIGKERN_BUILD_CUDA   auto (default: build when nvcc is found) | 0 (never) | 1 (required; fail loudly)
  TORCH_CUDA_ARCH_LIST architectures, e.g. "8.0;9.0a" (the default: Ampere, and Hopper with wgmma)
  MAX_JOBS             parallel compile jobs (default: bounded by cores and by memory, 2 GB a job)
  BIGKERN_LOCAL_VERSION=1  version with a local tag naming torch and CUDA (set by `make wheel`)
  CUDA_HOME            toolkit root; found from `nvcc --dryrun` when unset
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0a"


def log(msg):
    print(f"bigkern build: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """The toolkit root. nvcc may be a wrapper script, so ask it where it lives rather than
    guessing from its path (torch's guess then fails to link -lcudart)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for candidate in ("/usr/local/cuda/bin/nvcc",):
            if os.path.exists(candidate):
                nvcc = candidate
                break
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null"],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match:
            return os.path.normpath(match.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.normpath(os.path.join(os.path.dirname(nvcc), ".."))


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8
    return max(1, min(cores, int(mem_gb // 2)))


def arch_flags(arch_list):
    """nvcc -gencode flags for "8.0;9.0a;9.0+PTX"-style lists, and BIGKERN_SM90A_BUILT where the
    list has sm_90a: only then does the Hopper attention kernel have a body (else a trap), and the
    host code must never launch it (csrc/attention/attention_sm90.cu)."""
    flags = []
    for arch in filter(None, re.split(r"[;\s,]+", arch_list)):
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        if num == "90a":
            flags.append("-DBIGKERN_SM90A_BUILT=1")
    return flags


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_build_info(**info):
    lines = ['"""Written by setup.py at build time: what bigkern._C was built against."""', ""]
    lines += [f"{key} = {value!r}" for key, value in info.items()]
    (ROOT / "bigkern" / "_build_info.py").write_text("\n".join(lines) + "\n")


def cuda_extensions():
    """The extension modules, and the build_ext command that builds them."""
    mode = os.environ.get("BIGKERN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"BIGKERN_BUILD_CUDA must be auto, 0 or 1, not {mode!r}")
    import torch

    info = dict(version=VERSION, torch_version=torch.__version__, cuda_version=None,
                cuda_archs=None, git_revision=git_revision(), cuda_built=False, skipped_reason=None)
    if mode == "0":
        info["skipped_reason"] = "BIGKERN_BUILD_CUDA=0"
        log("CUDA extension skipped: BIGKERN_BUILD_CUDA=0")
        write_build_info(**info)
        return [], {}, info["version"]
    cuda_home = find_cuda_home()
    reason = None
    if cuda_home is None:
        reason = "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    if reason:
        if mode == "1":
            raise SystemExit(f"bigkern build: BIGKERN_BUILD_CUDA=1 but {reason}")
        info["skipped_reason"] = reason
        log(f"CUDA extension skipped: {reason}; bigkern will serve through Triton and torch")
        write_build_info(**info)
        return [], {}, info["version"]

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    nvcc_version = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                                  capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", nvcc_version)
    info.update(cuda_version=match.group(1) if match else "unknown", cuda_archs=archs, cuda_built=True)
    if os.environ.get("BIGKERN_LOCAL_VERSION") == "1":
        # a wheel names what it was built against: 0.1.0+torch2.14.1.cu130
        torch_release = torch.__version__.split("+")[0]
        info["version"] = f"{VERSION}+torch{torch_release}.cu{info['cuda_version'].replace('.', '')}"
    write_build_info(**info)
    log(f"building bigkern._C with CUDA {info['cuda_version']} at {cuda_home} for {archs}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}")

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                     if p.suffix in (".cpp", ".cu"))
    common = ["-O3"]  # the C++ standard is the one torch asks for (C++20 from torch 2.13)
    nvcc = common + arch_flags(archs) + [
        "--expt-relaxed-constexpr", "-lineinfo",
        # torch adds these to forbid half operators; our kernels use the intrinsics and want them.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    ext = CUDAExtension(
        name="bigkern._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": common, "nvcc": nvcc},
    )
    class IncrementalBuild(BuildExtension):
        """Always compile in build/temp: pip's editable and wheel builds would otherwise use a fresh
        temporary directory each time, and ninja could never reuse an object."""

        def build_extensions(self):
            self.build_temp = str(ROOT / "build" / "temp")
            super().build_extensions()

    return [ext], {"build_ext": IncrementalBuild.with_options(use_ninja=True)}, info["version"]


ext_modules, cmdclass, build_version = cuda_extensions()
# the benchmark shapes travel inside the package too, for `bigkern bench` outside a checkout
shutil.copyfile(ROOT / "bench" / "shapes.json", ROOT / "bigkern" / "benchmark" / "shapes.json")

setup(
    version=build_version,
    packages=["bigkern", "bigkern.ops", "bigkern.nn", "bigkern.kernels", "bigkern.benchmark", "bigkern.integrations"],
    package_dir={"bigkern": "bigkern", "bigkern.kernels": "kernels"},
    package_data={"bigkern.benchmark": ["shapes.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
