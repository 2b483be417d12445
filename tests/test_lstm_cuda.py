"""The persistent LSTM CUDA kernels (csrc/lstm/) on the CPU, through the emulator
(tests/cuda_emulation/): the production sources compiled by g++, the cooperative launch emulated
with every CTA on an OS thread of its own (each CTA's threads fibers on it) and grid.sync() a
barrier across them. The registered "cuda" implementations of bigkern/ops/lstm.py run unchanged,
their launchers swapped for the emulated ones (CUDA_KERNELS), on a pretend device of 4 SMs so that
the hidden units spread over several blocks that must meet at every timestep; outputs, h_n, c_n
and every gradient are compared with float64 torch.nn.LSTM by the FlashAttention rule. On a GPU
tests/test_lstm.py runs the real kernels."""

import ctypes

import pytest
import torch

import bigkern
from bigkern import dispatch
from bigkern.nn import rnn
from bigkern.ops import lstm as ops
from bigkern.testing import make_tensor
from conftest import DEVICE
from cuda_emulation import emulation
from cuda_emulation.emulation import dtype_code, pointer

PRETEND_SMS = 4


@pytest.fixture(scope="session")
def emulated_library(request):
    return emulation.library_for_tests(request, "lstm_emulated.cpp",
                                       ["lstm/lstm_persistent_forward.cu", "lstm/lstm_persistent_backward.cu"])


class EmulatedKernels(dispatch.CompiledKernels):
    """The CPU emulation of the persistent LSTM sources, with the signatures of
    torch.ops.bigkern.lstm_persistent_*_cuda, checked as csrc/lstm/lstm_op.cpp checks them."""

    def __init__(self, library, seed):
        self.library = library
        self.seed = seed
        self.plans = []  # (backward, blocks) of every plan made: the tests check several blocks met

    def unsupported(self, tensors):
        return None if all(t.device.type == "cpu" for t in tensors) else "the CUDA emulator takes CPU tensors"

    def _plan(self, w_hh, batch, backward):
        blocks, units = ctypes.c_int(), ctypes.c_int()
        status = self.library.emulated_lstm_persistent_plan(dtype_code(w_hh.dtype), ctypes.c_int64(batch),
                                                            ctypes.c_int64(w_hh.shape[1]), int(backward),
                                                            PRETEND_SMS, ctypes.byref(blocks), ctypes.byref(units))
        self.plans.append((backward, blocks.value))
        return "" if status == 0 else f"the persistent kernel's plan fails (status {status})"

    def lstm_persistent_plan(self, w_hh, batch, training):
        return self._plan(w_hh, batch, False) or (self._plan(w_hh, batch, True) if training else "")

    def _run(self, entry, *args):
        error = ctypes.create_string_buffer(1024)
        status = entry(dtype_code(args[0].dtype), PRETEND_SMS,
                       *args[1:], ctypes.c_uint(self.seed), error, len(error))
        assert status == 0, f"emulated LSTM kernel: {error.value.decode()}"

    def lstm_persistent_forward(self, gx, w_hh, bias, h0, c0, out, cells, gates, h_n, c_n, reverse):
        H, B, N = w_hh.shape[1], h0.shape[0], gx.shape[0]
        assert gx.stride(1) == 1 and gx.shape[1] == 4 * H and N % B == 0
        for t, shape in ((w_hh, (4 * H, H)), (h0, (B, H)), (c0, (B, H)), (out, (N, H)), (h_n, (B, H)), (c_n, (B, H))):
            assert t.is_contiguous() and tuple(t.shape) == shape and t.dtype == gx.dtype
        for t, shape in ((bias, (4 * H,)), (cells, (N, H)), (gates, (N, 4 * H))):
            assert t is None or (t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape) == shape)
        self._run(self.library.emulated_lstm_persistent_forward, gx, pointer(gx), ctypes.c_int64(gx.stride(0)),
                  pointer(w_hh), pointer(bias), pointer(h0), pointer(c0), pointer(out), pointer(cells),
                  pointer(gates), pointer(h_n), pointer(c_n), ctypes.c_int64(N // B), ctypes.c_int64(B),
                  ctypes.c_int64(H), int(reverse))

    def lstm_persistent_backward(self, grad_out, grad_h_n, grad_c_n, w_hh, gates, cells, c0, dz, dc, reverse):
        H, B, N = w_hh.shape[1], c0.shape[0], grad_out.shape[0]
        for t, shape in ((grad_out, (N, H)), (grad_h_n, (B, H)), (grad_c_n, (B, H)), (w_hh, (4 * H, H)),
                         (c0, (B, H)), (dz, (N, 4 * H))):
            assert t.is_contiguous() and tuple(t.shape) == shape and t.dtype == grad_out.dtype
        for t, shape in ((gates, (N, 4 * H)), (cells, (N, H)), (dc, (B, H))):
            assert t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape) == shape
        self._run(self.library.emulated_lstm_persistent_backward, grad_out, pointer(grad_out), pointer(grad_h_n),
                  pointer(grad_c_n), pointer(w_hh), pointer(gates), pointer(cells), pointer(c0), pointer(dz),
                  pointer(dc), ctypes.c_int64(N // B), ctypes.c_int64(B), ctypes.c_int64(H), int(reverse))


@pytest.fixture
def emulated(emulated_library, monkeypatch, fresh_seed):
    if DEVICE == "cuda":
        pytest.skip("on a GPU tests/test_lstm.py runs the real persistent kernels")
    kernels = EmulatedKernels(emulated_library, fresh_seed)
    monkeypatch.setattr(ops, "CUDA_KERNELS", kernels)
    return kernels


def check(results):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, "\n".join(bad)


# (hidden, batch, steps): hidden units over 4 blocks (a last block with fewer units), batch up to
# the kernel's 8, row lengths that are and are not whole 16-byte chunks.
CASES = [(24, 1, 5), (13, 3, 4), (40, 8, 3), (7, 5, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden,batch,steps", CASES)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_persistent_kernels_match_fp64(emulated, dtype, hidden, batch, steps, training):
    module = rnn.LSTM(hidden, hidden, num_layers=2 if training else 1, bidirectional=True, dtype=dtype)
    x = make_tensor((steps, batch, hidden), dtype)
    layers = module.num_layers * 2
    hx = (make_tensor((layers, batch, hidden), dtype), make_tensor((layers, batch, hidden), dtype))
    with bigkern.use_backend("cuda"), bigkern.record() as calls:
        check(ops.compare_with_reference(module, x, hx, backward=training))
    assert calls[("lstm_layer", "cuda")] == layers, calls
    if training:
        assert calls[("lstm_layer_backward", "cuda")] == layers, calls
    assert all(blocks > 1 for _, blocks in emulated.plans), emulated.plans  # several blocks met each step


def test_plan_gives_each_unit_and_sequence_a_thread(emulated):
    """The backward kernel's 256 threads each carry one (unit, sequence): a plan of 33 units per
    block at batch 8 (hidden 132 over 4 SMs) left every block's unit 32 uncomputed. Refused now
    (too many units), as the forward's plan refuses what its warps cannot hold."""
    for batch, refused in ((8, True), (4, False)):
        w_hh = torch.empty(4 * 132, 132)
        reason = emulated._plan(w_hh, batch, backward=True)
        assert bool(reason) == refused and (not refused or "status 2" in reason), (batch, reason)
