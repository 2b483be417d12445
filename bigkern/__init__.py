"""bigkern: fused GPU kernels for convolution, LSTM and flash attention, in Triton and C++/CUDA,
as drop-in replacements for torch.nn modules and torch.nn.functional calls.

    BIGKERN_BACKEND=auto|triton|cuda|torch   or   with bigkern.use_backend("triton"): ...
    bigkern.explain(fn, *args)               which implementation a call takes, and why
    with bigkern.record() as calls: ...      which implementation each op call inside took
"""

from bigkern import _ext
from bigkern.dispatch import BACKENDS, UnsupportedError, explain, record, requested_backend, use_backend

__version__ = getattr(_ext.build_info(), "version", "0.1.0+source")

# Load the compiled extension (registers torch.ops.bigkern.*_cuda) before the Python ops.
_ext.extension()

from bigkern import ops  # noqa: E402,F401
from bigkern import nn  # noqa: E402,F401
from bigkern.fuse import fuse  # noqa: E402
from bigkern.patch import enable, patch, unpatch  # noqa: E402

__all__ = ["BACKENDS", "UnsupportedError", "enable", "explain", "fuse", "nn", "ops", "patch", "record",
           "requested_backend", "unpatch", "use_backend"]
