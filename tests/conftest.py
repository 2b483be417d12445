"""Test set-up shared by every family.

On a machine without a GPU, Triton kernels run in the interpreter on CPU tensors; with one, on the
GPU. Every output a bigkern op allocates is poisoned with NaN first, so unwritten elements fail.
Every test draws a fresh seed (printed when it fails).
"""

import os

os.environ.setdefault("BIGKERN_POISON_OUTPUTS", "1")
# one tile per kernel (kernels/autotune.py): on a GPU the suite runs hundreds of shapes and would
# otherwise compile and time every tile of every kernel variant for each
os.environ.setdefault("BIGKERN_TRITON_AUTOTUNE", "0")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import bigkern  # noqa: E402
from bigkern import dispatch, memory  # noqa: E402
from bigkern.testing import default_device, seed_everything  # noqa: E402

DEVICE = default_device()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = seed_everything()
    request.node.bigkern_seed = seed
    yield seed


@pytest.fixture(autouse=True)
def no_out_of_bounds_writes():
    """Every output a bigkern op allocated during the test still has intact guard bands."""
    memory.check_guards()
    yield
    memory.check_guards()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = getattr(item, "bigkern_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("bigkern", f"seed {seed} (bigkern.testing.seed_everything({seed}) reproduces)"))
    return report


def backend_skip_reason(backend, device=DEVICE):
    """Why `backend` cannot run on this machine's test device, or None."""
    probe = torch.empty(1, device=device)
    if backend == "triton":
        return dispatch.triton_unsupported(probe)
    if backend == "cuda":
        return dispatch.cuda_unsupported(probe)
    return None


@pytest.fixture(params=dispatch.BACKENDS)
def backend(request):
    """Each backend in turn, forced; skipped (with the reason) where this machine cannot run it."""
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    with bigkern.use_backend(request.param):
        yield request.param
