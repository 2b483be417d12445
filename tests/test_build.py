"""The build: the extension is there when a toolkit was, and its metadata tells the truth."""

import os
import shutil
import warnings

import pytest
import torch

import bigkern
from bigkern import _ext


def test_build_info_is_recorded():
    info = _ext.build_info()
    assert info is not None, "bigkern was not built (pip install --no-build-isolation -e .)"
    assert info.torch_version == torch.__version__
    assert info.version == bigkern.__version__


def test_cuda_extension_is_built_where_a_toolkit_is_found():
    info = _ext.build_info()
    toolkit = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    if os.environ.get("BIGKERN_BUILD_CUDA", "auto") == "0" or not toolkit or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit here: the extension is rightly skipped")
    assert info.cuda_built, f"a toolkit is here but bigkern._C was not built: {info.skipped_reason}"
    assert _ext.extension() is not None, _ext.unavailable_reason()
    assert hasattr(torch.ops.bigkern, "bias_act_forward_cuda")
    assert _ext.extension().cuda_runtime_version() >= 12000


def test_mismatched_torch_version_warns_naming_both_and_serves_without_the_extension(monkeypatch):
    info = _ext.build_info()
    monkeypatch.setattr(info, "torch_version", "1.0.0", raising=False)
    monkeypatch.setattr(info, "cuda_built", True, raising=False)
    _ext._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _ext.extension() is None
        messages = " ".join(str(w.message) for w in caught)
        assert "1.0.0" in messages and torch.__version__ in messages
        with bigkern.use_backend("cuda"), pytest.raises(bigkern.UnsupportedError, match="1.0.0"):
            bigkern.ops.epilogue.BIAS_ACT.select(torch.empty(1), None, 1, 0, 0.0)
    finally:
        monkeypatch.undo()
        _ext._load.cache_clear()


def _setup_function(name):
    """A function of setup.py, without running setup() (which importing setup.py would)."""
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    [node] = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {"re": __import__("re")}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


_SM90_HOST_DRIVER = r"""
#include <cstdio>
#include <cuda_runtime.h>
#include "attention/attention.h"
namespace bigkern { namespace attention { namespace sm90 {
template <int HEAD_DIM>
cudaError_t forward_for_head_dim(DType, const AttentionProblem&, const AttentionForwardArgs&, cudaStream_t) {
  return cudaSuccess;
}
}}}
#include "attention/attention_sm90.cu"
// an H100, as the CUDA runtime would report it
cudaError_t CUDARTAPI cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}
int main() { std::printf("%d\n", int(bigkern::attention::sm90_forward_enabled())); }
"""


def test_the_hopper_forward_is_never_launched_from_a_build_without_sm90a(tmp_path):
    """Without sm_90a in TORCH_CUDA_ARCH_LIST ("8.0;9.0", "9.0+PTX") the Hopper kernel's body is a
    trap; BIGKERN_ATTENTION_SM90=1 on an H100 launched it anyway, killing the CUDA context."""
    from pathlib import Path

    import subprocess

    arch_flags = _setup_function("arch_flags")
    assert "-DBIGKERN_SM90A_BUILT=1" in arch_flags("8.0;9.0a")
    assert not any(f.startswith("-D") for f in arch_flags("8.0;9.0;9.0+PTX"))

    from cuda_emulation import emulation

    compiler, include = emulation.compiler(), emulation.cuda_include_dir()
    if compiler is None or include is None:
        pytest.skip("needs a C++ compiler and a CUDA toolkit's headers")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    (tmp_path / "driver.cpp").write_text(_SM90_HOST_DRIVER)
    enabled = {}
    for defines in ([], ["-DBIGKERN_SM90A_BUILT=1"]):
        binary = tmp_path / f"driver{len(defines)}"
        subprocess.run([compiler, "-std=c++17", "-I", str(csrc), "-I", str(include), *defines,
                        str(tmp_path / "driver.cpp"), "-o", str(binary)], check=True, capture_output=True)
        run = subprocess.run([str(binary)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, BIGKERN_ATTENTION_SM90="1"))
        enabled[bool(defines)] = run.stdout.strip()
    assert enabled == {False: "0", True: "1"}
