"""The CUDA attention backend (csrc/attention/, bigkern/ops/attention_cuda.py) against float64.

The kernels run twice over the same randomized cases:
  emulator  on the CPU: the production sources compiled by g++ with the PTX wrappers, the tensor-map
            encoder and the launch replaced by C++ of the same semantics (tests/cuda_emulation/),
            every CUDA thread a fiber. It checks the index math, masking, GQA, strides, the cp.async
            pipeline and, for the Hopper forward, the TMA/mbarrier ring and the wgmma operands as
            the PTX ISA describes them; not timing.
  gpu       on a GPU (`gpu` marker; skipped here): the real kernels through torch.ops.bigkern, the
            Hopper forward with BIGKERN_ATTENTION_SM90=only on compute capability 9.0.
Both go through attention_cuda.run_forward/run_backward, so alignment copies and output allocation
(NaN-poisoned, guard-banded) are the production ones.
"""

import ctypes
import math

import pytest
import torch

from bigkern import _ext, dispatch, testing
from bigkern.ops import attention_cuda
from bigkern.testing import make_tensor
from conftest import DEVICE

from cuda_emulation import emulation
from cuda_emulation.emulation import array

DTYPES = [torch.float16, torch.bfloat16]
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}  # csrc/common/dtype.cuh DType

# (batch, q heads, kv heads, L, S, head dim): odd sizes, partial and whole blocks, GQA, L != S
CASES = [
    (1, 1, 1, 1, 1, 64),
    (2, 3, 3, 7, 7, 64),
    (1, 2, 1, 33, 47, 64),  # GQA 2:1, L < S: every tile partial
    (1, 4, 2, 129, 65, 64),  # L > S: causal rows past S see every key
    (1, 2, 2, 64, 128, 64),  # whole blocks only
    (1, 1, 1, 1, 1000, 64),  # one query, many keys
    (1, 2, 2, 1, 1, 128),
    (1, 2, 1, 129, 129, 128),
    (2, 2, 1, 7, 200, 128),
    (1, 1, 1, 1000, 33, 128),  # many query blocks, one key block
    (1, 2, 1, 45, 70, 32),
    (1, 1, 1, 77, 100, 96),
    (1, 2, 1, 40, 70, 256),  # dK and dV in two passes
]
GPU_CASES = CASES + [
    (2, 8, 2, 1000, 1000, 64),
    (2, 8, 8, 1000, 1000, 128),
    (1, 16, 4, 2048, 2048, 128),
    (3, 4, 1, 4097, 511, 64),
    (2, 4, 2, 1500, 1500, 256),
    (2, 4, 4, 999, 1001, 96),
]


# ---------------------------------------------------------------------------------------------
# Runners: (forward op, backward op) with the registered ops' signatures.

@pytest.fixture(scope="session")
def emulated_library(request):
    # attention.cu (the dispatch; its sm90 hook is the driver's stub), every per-head-dim kernel file
    # and the Hopper forward's (driven directly by emulated_attention_forward_sm90)
    sources = ["attention/attention.cu"] + sorted(
        f"attention/{p.name}" for p in (emulation.CSRC / "attention").glob("attention_*hdim*.cu"))
    return emulation.library_for_tests(request, "attention_emulated.cpp", sources)


def _span_bytes(t):
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def emulated_ops(library, deferred_copies=True, seed=0, sm90=False):
    """The emulated kernels as functions with the signatures of torch.ops.bigkern.attention_*_cuda
    (with sm90, the forward is the Hopper kernel's: TMA, wgmma, producer and consumer warpgroups)."""
    def call(entry, q, k, tensors, inputs, lse, scale, is_causal):
        shape = [q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]]
        error = ctypes.create_string_buffer(1024)
        status = entry(
            _DTYPE_CODES[q.dtype], array(ctypes.c_int64, shape), ctypes.c_float(scale), int(is_causal),
            array(ctypes.c_void_p, [t.data_ptr() for t in tensors] + [lse.data_ptr()]),
            array(ctypes.c_int64, [s for t in tensors for s in t.stride()[:3]]),
            array(ctypes.c_int64, [_span_bytes(t) for t in tensors[:inputs]]),
            int(deferred_copies), ctypes.c_uint(seed), error, len(error))
        assert status == 0, f"emulated attention kernel: {error.value.decode()}"

    forward_entry = library.emulated_attention_forward_sm90 if sm90 else library.emulated_attention_forward

    def forward(q, k, v, out, lse, scale, is_causal):
        if out.numel():
            call(forward_entry, q, k, [q, k, v, out], 3, lse, scale, is_causal)

    def backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale, is_causal):
        if q.numel() or k.numel():
            call(library.emulated_attention_backward, q, k, [grad_out, q, k, v, out, dq, dk, dv], 5, lse, scale,
                 is_causal)

    return forward, backward


def gpu_ops():
    reason = attention_cuda.unsupported(*(torch.empty(1, 1, 1, 64, device=DEVICE, dtype=torch.float16),) * 3)
    if reason:
        pytest.skip(reason)
    return torch.ops.bigkern.attention_forward_cuda, torch.ops.bigkern.attention_backward_cuda


@pytest.fixture(params=["emulator", pytest.param("gpu", marks=pytest.mark.gpu)])
def runner(request, fresh_seed):
    """(forward op, backward op, device) for the emulated kernels on the CPU or the real ones."""
    if request.param == "emulator":
        library = request.getfixturevalue("emulated_library")
        # copies at their wait or at once, by the seed's parity (test_pipeline_* covers "at once")
        return (*emulated_ops(library, deferred_copies=fresh_seed % 2 == 0, seed=fresh_seed), "cpu")
    return (*gpu_ops(), "cuda")


# ---------------------------------------------------------------------------------------------
# The float64 reference, and the comparison by FlashAttention's rule.

def reference(q, k, v, is_causal, scale):
    """Attention by its definition, in q's dtype: (out, lse); GQA by repeating k and v."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if is_causal:  # top-left: query i sees key j <= i
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def gradient_term_scales(q, k, v, grad_out, is_causal, scale):
    """The magnitudes of the terms each gradient sums (float64), for the comparison's floor: dq and
    dk sum scale * P (dP - delta) times k or q, dv sums P times dO, and those terms cancel."""
    q, k, v, grad_out = (t.detach().double().cpu() for t in (q, k, v, grad_out))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out, _ = reference(q, kr, vr, is_causal, scale)
    scores = (q @ kr.transpose(-1, -2)) * scale
    if is_causal:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, -1)
    delta = (grad_out * out).sum(-1, keepdim=True)
    ds_terms = p * ((grad_out @ vr.transpose(-1, -2)).abs() + delta.abs())

    def per_kv_head(t):  # (B, Hq, S, D) -> summed over each kv head's query heads
        return t.unflatten(1, (k.shape[1], group)).sum(2)

    dq = (scale * ds_terms @ kr.abs()).max().item()
    dk = per_kv_head(scale * ds_terms.transpose(-1, -2) @ q.abs()).max().item()
    dv = per_kv_head(p.transpose(-1, -2) @ grad_out.abs()).max().item()
    return [dq or None, dk or None, dv or None]


def check_attention(forward_op, backward_op, q, k, v, is_causal, scale):
    """Run forward and backward (unless backward_op is None) through attention_cuda's production
    wrappers; compare the output, lse and the three gradients with float64 (FlashAttention's rule)."""
    out, lse = attention_cuda.run_forward(forward_op, q, k, v, is_causal, scale)
    q64, k64, v64 = (testing.fp64_copy(t, requires_grad=True) for t in (q, k, v))
    out64, lse64 = reference(q64, k64, v64, is_causal, scale)
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_t, lse_t = reference(qt, kt, vt, is_causal, scale)
    results = [testing.compare(out, out64, out_t), testing.compare(lse, lse64, lse_t, name="lse")]
    if backward_op is None:
        failures = [str(r) for r in results if not r.ok]
        assert not failures, "; ".join(failures)
        return out, lse, None

    grad_out = make_tensor(out.shape, out.dtype, out.device)
    dq, dk, dv = attention_cuda.run_backward(backward_op, grad_out, q, k, v, out, lse, is_causal, scale)
    out64.backward(grad_out.double().cpu())
    out_t.backward(grad_out)
    scales = gradient_term_scales(q, k, v, grad_out, is_causal, scale)
    for name, actual, expected, torch_result, term_scale in zip(
            ("dq", "dk", "dv"), (dq, dk, dv), (q64.grad, k64.grad, v64.grad), (qt.grad, kt.grad, vt.grad), scales):
        results.append(testing.compare(actual, expected, torch_result, name=name, factor=testing.GRADIENT_FACTOR,
                                       scale=term_scale))
    failures = [str(r) for r in results if not r.ok]
    assert not failures, "; ".join(failures)
    return out, lse, (dq, dk, dv)


def case_id(case):
    return "B{}-H{}:{}-L{}-S{}-D{}".format(*case)


def inputs(case, dtype, device, layout="contiguous"):
    batch, heads_q, heads_kv, len_q, len_kv, head_dim = case
    q = make_tensor((batch, heads_q, len_q, head_dim), dtype, device, layout=layout)
    k = make_tensor((batch, heads_kv, len_kv, head_dim), dtype, device, layout=layout)
    v = make_tensor((batch, heads_kv, len_kv, head_dim), dtype, device, layout=layout)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Numerics: every case, causal and not, fp16 and bf16.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_fp64(runner, case, is_causal, dtype):
    forward_op, backward_op, device = runner
    q, k, v = inputs(case, dtype, device)
    check_attention(forward_op, backward_op, q, k, v, is_causal, 1.0 / math.sqrt(case[-1]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", GPU_CASES[len(CASES):], ids=case_id)
def test_large_cases_match_fp64_on_gpu(case, is_causal, dtype):
    forward_op, backward_op = gpu_ops()
    q, k, v = inputs(case, dtype, "cuda")
    check_attention(forward_op, backward_op, q, k, v, is_causal, 1.0 / math.sqrt(case[-1]))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_qkv_views_are_read_in_place(runner, head_dim):
    """q, k, v as transposed views of one (B, L, 3, H, D) projection: strided rows, no copies."""
    forward_op, backward_op, device = runner
    batch, heads, length = 2, 3, 77
    qkv = make_tensor((batch, length, 3, heads, head_dim), torch.float16, device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert all(attention_cuda._aligned(t) is t for t in (q, k, v))
    check_attention(forward_op, backward_op, q, k, v, True, 0.3)


def test_unaligned_and_strided_inputs_are_copied(runner):
    forward_op, backward_op, device = runner
    q = make_tensor((1, 2, 19, 64), torch.bfloat16, device, layout="strided")  # last-dim stride 2
    k = make_tensor((1, 2, 23, 65), torch.bfloat16, device)[..., 1:]  # 2-byte offset, stride 65
    v = make_tensor((1, 2, 23, 64), torch.bfloat16, device, layout="transposed")  # column-major rows
    assert all(attention_cuda._aligned(t) is not t for t in (q, k, v))
    check_attention(forward_op, backward_op, q, k, v, False, 0.125)


@pytest.mark.parametrize("run", range(2))
def test_pipeline_under_shuffled_schedules(emulated_library, fresh_seed, run):
    """cp.async copies performed at once, with warps drifting apart: a stage refilled before every
    warp is done with it corrupts the result (copies performed only at their wait, which catch a
    stage read before its wait, alternate in the other emulated tests)."""
    forward_op, backward_op = emulated_ops(emulated_library, deferred_copies=False, seed=fresh_seed)
    # no mask: 8 key blocks for every CTA, so 7 refills that could race (the mask is tested elsewhere)
    q, k, v = inputs((1, 2, 1, 150, 450, 64), torch.float16, "cpu")
    check_attention(forward_op, backward_op, q, k, v, False, 0.125)


# The Hopper forward in the emulator: TMA (128-byte swizzle, zero fill past the ends, completion at
# random later rounds or at once), mbarriers, wgmma through shared-memory descriptors.
SM90_CASES = [
    (1, 2, 1, 33, 47, 64),
    (1, 3, 1, 77, 500, 64),  # GQA 3:1, four key blocks
    (2, 2, 2, 128, 128, 64),  # whole blocks only
    (1, 2, 1, 129, 129, 128),
    (1, 4, 2, 200, 300, 128),
    (1, 1, 1, 1, 257, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", SM90_CASES, ids=case_id)
def test_sm90_forward_in_emulator(emulated_library, fresh_seed, case, is_causal, dtype):
    forward_op, _ = emulated_ops(emulated_library, deferred_copies=fresh_seed % 2 == 0, seed=fresh_seed, sm90=True)
    q, k, v = inputs(case, dtype, "cpu")
    check_attention(forward_op, None, q, k, v, is_causal, 1.0 / math.sqrt(case[-1]))


@pytest.mark.parametrize("deferred_copies", [True, False], ids=["copies-later", "copies-at-issue"])
def test_sm90_forward_in_emulator_reads_fused_qkv_views(emulated_library, fresh_seed, deferred_copies):
    """Tensor maps over (batch, heads, rows) ordered by stride: transposed views need no copy."""
    forward_op, _ = emulated_ops(emulated_library, deferred_copies, seed=fresh_seed, sm90=True)
    qkv = make_tensor((2, 150, 3, 3, 128), torch.bfloat16, "cpu")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_attention(forward_op, None, q, k, v, True, 0.1)


@pytest.mark.parametrize("run", range(2))
def test_sm90_pipeline_under_shuffled_schedules(emulated_library, fresh_seed, run):
    """Six key blocks through a two-stage ring, copies landing at once, warps drifting apart: a
    stage refilled before every consumer warp released it, or a wrong phase, corrupts the result."""
    forward_op, _ = emulated_ops(emulated_library, deferred_copies=run == 0, seed=fresh_seed, sm90=True)
    q, k, v = inputs((1, 2, 1, 200, 700, 64), torch.float16, "cpu")
    check_attention(forward_op, None, q, k, v, False, 0.125)


def test_empty_sequences(runner):
    """S = 0: out = 0, lse = -inf, dq = 0 (as softmax over no keys weighs nothing); L = 0: dk = dv = 0."""
    forward_op, backward_op, device = runner
    q = make_tensor((2, 2, 5, 64), torch.float16, device)
    no_keys = torch.empty(2, 1, 0, 64, dtype=torch.float16, device=device)
    out, lse = attention_cuda.run_forward(forward_op, q, no_keys, no_keys, False, 0.125)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.full_like(lse, float("-inf")))
    dq, dk, dv = attention_cuda.run_backward(backward_op, torch.ones_like(out), q, no_keys, no_keys, out, lse,
                                             False, 0.125)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == dv.shape == no_keys.shape

    no_queries = torch.empty(2, 2, 0, 64, dtype=torch.float16, device=device)
    k, v = make_tensor((2, 1, 9, 64), torch.float16, device), make_tensor((2, 1, 9, 64), torch.float16, device)
    out, lse = attention_cuda.run_forward(forward_op, no_queries, k, v, True, 0.125)
    assert out.shape == (2, 2, 0, 64) and lse.shape == (2, 2, 0)
    dq, dk, dv = attention_cuda.run_backward(backward_op, out, no_queries, k, v, out, lse, True, 0.125)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_nan_propagates_like_the_reference(runner):
    """A NaN in q poisons its row; a NaN in k poisons the rows that see that key (not the others)."""
    forward_op, backward_op, device = runner
    q, k, v = inputs((1, 1, 1, 40, 40, 64), torch.float16, device)
    q[0, 0, 3, 5] = float("nan")
    k[0, 0, 20, 7] = float("nan")
    out, _ = attention_cuda.run_forward(forward_op, q, k, v, True, 0.125)
    expected, _ = reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), True, 0.125)
    assert torch.equal(out.isnan().cpu(), expected.isnan())


def hopper_ops(monkeypatch):
    """The GPU ops with the sm90 forward required (BIGKERN_ATTENTION_SM90=only: no fallback)."""
    ops = gpu_ops()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 forward runs on compute capability 9.0 only")
    monkeypatch.setenv("BIGKERN_ATTENTION_SM90", "only")
    return ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[-1] in (64, 128)], ids=case_id)
def test_sm90_forward_matches_fp64(monkeypatch, case, is_causal, dtype):
    """The Hopper forward (TMA, wgmma, warp-specialised), with the sm_80 backward."""
    forward_op, backward_op = hopper_ops(monkeypatch)
    q, k, v = inputs(case, dtype, "cuda")
    check_attention(forward_op, backward_op, q, k, v, is_causal, 1.0 / math.sqrt(case[-1]))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_forward_reads_fused_qkv_views(monkeypatch, head_dim):
    forward_op, backward_op = hopper_ops(monkeypatch)
    qkv = make_tensor((2, 300, 3, 5, head_dim), torch.bfloat16, "cuda")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_attention(forward_op, backward_op, q, k, v, True, 0.2)


@pytest.mark.gpu
def test_backward_is_deterministic():
    forward_op, backward_op = gpu_ops()
    q, k, v = inputs((2, 8, 2, 1000, 1000, 128), torch.bfloat16, "cuda")
    out, lse = attention_cuda.run_forward(forward_op, q, k, v, True, 0.1)
    grad_out = make_tensor(out.shape, out.dtype, "cuda")
    first = attention_cuda.run_backward(backward_op, grad_out, q, k, v, out, lse, True, 0.1)
    second = attention_cuda.run_backward(backward_op, grad_out, q, k, v, out, lse, True, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------
# Registration and reasons (CPU).

def test_ops_are_registered_with_the_contract_schemas():
    if _ext.extension() is None:
        pytest.skip(f"bigkern._C: {_ext.unavailable_reason()}")
    forward = str(torch.ops.bigkern.attention_forward_cuda.default._schema)
    backward = str(torch.ops.bigkern.attention_backward_cuda.default._schema)
    assert forward == ("bigkern::attention_forward_cuda(Tensor q, Tensor k, Tensor v, Tensor(a!) out, "
                       "Tensor(b!) lse, float scale, bool is_causal) -> ()")
    assert backward == ("bigkern::attention_backward_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
                        "Tensor out, Tensor lse, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, float scale, "
                        "bool is_causal) -> ()")


def test_cpu_tensors_are_unsupported_with_the_dispatch_reason():
    q = make_tensor((1, 2, 8, 64), torch.float16)
    reason = attention_cuda.unsupported(q, q, q, None, 0.0, False, None)
    assert reason is not None and reason == dispatch.cuda_unsupported(q, q, q)


def test_kernel_reasons():
    def reason(q, k=None, v=None, **kwargs):
        k = q if k is None else k
        return attention_cuda.kernel_unsupported(q, k, q if v is None else v, **kwargs)

    half = make_tensor((2, 4, 8, 64), torch.float16)
    assert reason(half) is None
    assert reason(make_tensor((2, 4, 8, 128), torch.bfloat16), make_tensor((2, 1, 3, 128), torch.bfloat16)) is None
    assert "float32" in reason(make_tensor((2, 4, 8, 64)))
    assert "one dtype" in reason(half, half.bfloat16())
    assert "attn_mask" in reason(half, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    assert "dropout" in reason(half, dropout_p=0.1)
    assert "head dim" in reason(half, v=make_tensor((2, 4, 8, 32), torch.float16))
    assert "head dims" in reason(make_tensor((2, 4, 8, 80), torch.float16))
    assert "multiple" in reason(half, make_tensor((2, 3, 8, 64), torch.float16))
    assert "4-d" in reason(make_tensor((4, 8, 64), torch.float16))


def test_arch_reason():
    assert _ext.arch_reason((8, 0), "8.0;9.0a") is None
    assert _ext.arch_reason((8, 9), "8.0;9.0a") is None  # sm_80 cubins run on 8.x
    assert _ext.arch_reason((9, 0), "8.0;9.0a") is None
    assert _ext.arch_reason((9, 0), "8.0") is not None  # no cubin runs across majors
    assert _ext.arch_reason((12, 0), "8.0;9.0a") is not None
    assert _ext.arch_reason((10, 0), "8.0;9.0+PTX") is None  # PTX is compiled by the driver


def test_serves_nothing_without_the_extension(monkeypatch):
    """BIGKERN_BUILD_CUDA=0: the module imports and says why, without touching bigkern._C."""
    info = _ext.build_info()
    monkeypatch.setattr(info, "cuda_built", False, raising=False)
    monkeypatch.setattr(info, "skipped_reason", "BIGKERN_BUILD_CUDA=0", raising=False)
    _ext._load.cache_clear()
    try:
        q = make_tensor((1, 2, 8, 64), torch.float16)
        assert "BIGKERN_BUILD_CUDA=0" in attention_cuda.unsupported(q, q, q, None, 0.0, False, None)
    finally:
        monkeypatch.undo()
        _ext._load.cache_clear()


def test_python_head_dims_are_the_compiled_ones(emulated_library):
    compiled = [d for d in range(8, 513, 8) if emulated_library.emulated_attention_head_dim_supported(d)]
    assert tuple(compiled) == attention_cuda.HEAD_DIMS


# ---------------------------------------------------------------------------------------------
# Shared memory: what each head dim's launches ask for, and GPUs that allow less.

@pytest.mark.parametrize("head_dim", attention_cuda.HEAD_DIMS)
def test_the_shared_memory_table_is_what_the_kernels_launch_with(emulated_library, head_dim):
    """attention_cuda.SHARED_BYTES decides which GPUs can run a head dim: it must be what the
    launches really ask for (the largest launch of the forward, and of the backward)."""
    library = emulated_library
    library.emulated_largest_shared_launch.restype = ctypes.c_size_t
    forward_op, backward_op = emulated_ops(library)
    q, k, v = inputs((1, 1, 1, 3, 5, head_dim), torch.float16, "cpu")
    library.emulated_largest_shared_launch()
    out, lse = attention_cuda.run_forward(forward_op, q, k, v, False, None)
    forward_bytes = library.emulated_largest_shared_launch()
    attention_cuda.run_backward(backward_op, make_tensor(out.shape, out.dtype, "cpu"), q, k, v, out, lse, False, None)
    assert (forward_bytes, library.emulated_largest_shared_launch()) == attention_cuda.SHARED_BYTES[head_dim]


def test_gpus_with_less_shared_memory_are_refused_with_the_reason(monkeypatch):
    """The sm_80 build runs on sm_86/sm_89 GPUs (RTX 30xx/40xx, A10, L4, L40), which allow 99 KB of
    shared memory per block: head dim 128 (both ways) and the head dim 256 backward need more, and
    their launch failed with 'invalid argument' instead of being refused."""
    class Properties:
        shared_memory_per_block_optin = 101376

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    q = torch.empty(1, 1, 1, 128, dtype=torch.float16)
    assert "need 104448 bytes of shared memory per block; this GPU allows 101376" in \
        attention_cuda.shared_memory_reason(q, backward=False)
    q256 = torch.empty(1, 1, 1, 256, dtype=torch.float16)
    assert attention_cuda.shared_memory_reason(q256, backward=False) is None
    assert "backward kernels at head dim 256 need 135680" in attention_cuda.shared_memory_reason(q256, backward=True)
    for head_dim in (32, 64, 96):
        q = torch.empty(1, 1, 1, head_dim, dtype=torch.float16)
        assert attention_cuda.shared_memory_reason(q, backward=True) is None
    Properties.shared_memory_per_block_optin = 227 * 1024  # H100
    assert all(attention_cuda.shared_memory_reason(torch.empty(1, 1, 1, d), backward=b) is None
               for d in attention_cuda.HEAD_DIMS for b in (False, True))
