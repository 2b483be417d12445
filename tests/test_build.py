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
