"""scaled_dot_product_attention and varlen_attention (bigkern/ops/attention.py): every backend
against a float64 reference, forward and every gradient; torch's semantics and errors; dropout."""

import inspect
import math
import os
import random
import types
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_F

import bigkern
from bigkern import dispatch, memory, testing
from bigkern.nn import functional as F
from bigkern.ops import attention
from bigkern.testing import make_tensor
from conftest import DEVICE, backend_skip_reason

GPU = DEVICE == "cuda"


def check(results):
    for result in results:
        assert result.ok, str(result)


def skip_unless_served(*args, **kwargs):
    """Skip when the forced backend cannot serve this call (e.g. the CUDA kernels and masks)."""
    explanation = bigkern.explain(F.scaled_dot_product_attention, *args, **kwargs)
    if explanation.backend is None:
        pytest.skip(explanation.reasons[explanation.requested])


# ---------------------------------------------------------------------------------------------
# Randomized shapes: a fixed sample (stable test ids) of sizes, masks, GQA ratios, layouts.

def _sample_cases(count, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        L, S = rng.choice([1, 7, 33, 65]), rng.choice([1, 7, 33, 65])
        E = rng.choice([16, 40, 64, 3, 80])
        Ev = E if rng.random() < 0.6 else rng.choice([16, 24, 64])
        kv_heads = rng.choice([1, 2])
        heads = kv_heads * rng.choice([1, 2, 3])
        mask = rng.choice([None, None, "bool", "bool_rows", "float", "float_bcast", "float_full"])
        causal = mask is None and rng.random() < 0.5
        layout = rng.choice(["contiguous", "contiguous", "fused_qkv", "transposed", "strided", "blhd"])
        cases.append(dict(batch=rng.choice([1, 2]), heads=heads, kv_heads=kv_heads, L=L, S=S, E=E, Ev=Ev,
                          mask=mask, causal=causal, layout=layout,
                          dtype=[torch.float32, torch.float16][i % 2],
                          # dropout's Philox costs ~100 interpreter ops a tile: keep those cases small
                          dropout=rng.choice([0.0, 0.0, 0.2]) if max(L, S) <= 33 else 0.0,
                          scale=rng.choice([None, None, 0.3])))
    return cases


CASES = _sample_cases(14, seed=4)
if GPU:  # real sizes, 16-bit
    CASES += [dict(batch=2, heads=8, kv_heads=2, L=L, S=S, E=E, Ev=E, mask=mask, causal=causal, layout=layout,
                   dtype=dtype, dropout=0.0, scale=None)
              for (L, S, E, mask, causal, layout), dtype in zip(
                  [(1024, 1024, 128, None, True, "contiguous"), (777, 1500, 64, "bool", False, "contiguous"),
                   (2048, 2048, 96, None, False, "blhd"), (513, 513, 256, "float", False, "contiguous"),
                   (1, 4097, 128, None, False, "contiguous"), (1000, 333, 40, None, True, "strided")],
                  [torch.bfloat16, torch.float16, torch.bfloat16, torch.float16, torch.bfloat16, torch.bfloat16])]


def case_id(case):
    return (f"{str(case['dtype'])[6:]}-B{case['batch']}H{case['heads']}/{case['kv_heads']}-L{case['L']}S{case['S']}"
            f"-E{case['E']}v{case['Ev']}-{case['mask'] or 'nomask'}{'-causal' if case['causal'] else ''}"
            f"-{case['layout']}{'-drop' if case['dropout'] else ''}{'-scale' if case['scale'] else ''}")


def build(case, device=DEVICE, requires_grad=True):
    """q, k, v, mask for a case: q (B, H, L, E) in the case's layout."""
    B, H, Hkv, L, S, E, Ev, dtype = (case[n] for n in ("batch", "heads", "kv_heads", "L", "S", "E", "Ev", "dtype"))
    layout = case["layout"]
    if layout == "fused_qkv" and not (L == S and H == Hkv and E == Ev):
        layout = "blhd"
    if layout == "fused_qkv":
        q, k, v, _ = attention.make_inputs(B, H, Hkv, L, S, E, Ev, None, "fused_qkv", dtype, device, requires_grad)
    elif layout == "blhd":  # (B, L, H, E) projections viewed as (B, H, L, E)
        q, k, v = (make_tensor((B, n, h, d), dtype, device).transpose(1, 2).detach().requires_grad_(requires_grad)
                   for n, h, d in ((L, H, E), (S, Hkv, E), (S, Hkv, Ev)))
    else:
        q, k, v = (make_tensor(shape, dtype, device, layout=layout, requires_grad=requires_grad)
                   for shape in ((B, H, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)))
    mask = None
    kind = case["mask"]
    if kind == "bool":
        mask = torch.rand(B, 1, L, S, device=device) > 0.3
    elif kind == "bool_rows":  # some rows with every key masked
        mask = torch.rand(L, S, device=device) > 0.4
        mask[::3] = False
    elif kind == "float":
        mask = make_tensor((L, S), dtype, device, requires_grad=requires_grad)
    elif kind == "float_bcast":  # (B, 1, 1, S) padding-style additive mask, fp32 with 16-bit inputs
        mask = make_tensor((B, 1, 1, S), torch.float32, device)
        mask[..., -1:] = float("-inf")
        mask.requires_grad_(requires_grad)
    elif kind == "float_full":  # (B, H, L, S) with -inf entries and whole -inf rows
        mask = make_tensor((B, H, L, S), dtype, device)
        mask[torch.rand_like(mask, dtype=torch.float32) < 0.3] = float("-inf")
        mask[:, :, ::4] = float("-inf")
        mask.requires_grad_(requires_grad)
    return q, k, v, mask


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_fp64(backend, case):
    q, k, v, mask = build(case)
    args = (q, k, v, mask, case["dropout"], case["causal"], case["scale"], case["heads"] != case["kv_heads"])
    skip_unless_served(*args[:6], scale=args[6], enable_gqa=args[7])
    check(attention.compare_with_reference(*args))


@pytest.mark.parametrize("E,Ev", [(1, 1), (80, 112), (256, 160), (192, 8)])
def test_head_dims(backend, E, Ev):
    q = make_tensor((1, 2, 9, E), torch.float32, DEVICE, requires_grad=True)
    k = make_tensor((1, 2, 17, E), torch.float32, DEVICE, requires_grad=True)
    v = make_tensor((1, 2, 17, Ev), torch.float32, DEVICE, requires_grad=True)
    skip_unless_served(q, k, v, is_causal=True)
    check(attention.compare_with_reference(q, k, v, is_causal=True))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_three_d_inputs_take_a_mask_with_a_leading_one(backend, mask_kind):
    """torch (2.14) takes 3-d inputs (N, L, E) as (1, N, L, E): a (1, N, L, S) mask is theirs, (2, N, L, S)
    not; torch 2.11 refuses both, and so does bigkern there."""
    q, k, v = (make_tensor(shape, torch.float32, DEVICE) for shape in ((3, 7, 16), (3, 9, 16), (3, 9, 8)))
    if mask_kind == "bool":
        mask = torch.rand(1, 3, 7, 9, device=DEVICE) > 0.3
    else:
        mask = make_tensor((1, 3, 7, 9), torch.float32, DEVICE, requires_grad=True)
    skip_unless_served(q, k, v, mask[0])
    try:
        expected = torch_F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                        mask if mask_kind == "bool" else mask.double())
    except RuntimeError:  # torch 2.11 refuses it
        with pytest.raises(RuntimeError, match="attn_mask"):
            F.scaled_dot_product_attention(q, k, v, mask)
        return
    out = F.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    if mask_kind == "float":
        out.sum().backward()
        assert mask.grad.shape == mask.shape and mask.grad.isfinite().all()
    with pytest.raises(RuntimeError, match="attn_mask"):
        F.scaled_dot_product_attention(q, k, v, mask.expand(2, 3, 7, 9))


@pytest.mark.parametrize("shapes", [
    ((7, 16), (9, 16), (9, 8)),  # 2-D: no batch
    ((3, 7, 16), (3, 9, 16), (3, 9, 16)),  # 3-D
    ((2, 2, 3, 7, 16), (2, 1, 3, 9, 16), (1, 2, 3, 9, 16)),  # 5-D, broadcast batch dims
    ((2, 3, 7, 16), (9, 16), (1, 9, 16)),  # key and value broadcast over every batch dim
], ids=["2d", "3d", "5d-broadcast", "kv-broadcast"])
def test_batch_dims_broadcast(backend, shapes):
    q, k, v = (make_tensor(shape, torch.float32, DEVICE, requires_grad=True) for shape in shapes)
    mask = torch.rand(7, 9, device=DEVICE) > 0.2
    skip_unless_served(q, k, v, mask)
    check(attention.compare_with_reference(q, k, v, mask))


def test_gqa_key_and_value_heads_differ(backend):
    q = make_tensor((2, 4, 7, 16), torch.float32, DEVICE, requires_grad=True)
    k = make_tensor((2, 2, 9, 16), torch.float32, DEVICE, requires_grad=True)
    v = make_tensor((2, 1, 9, 16), torch.float32, DEVICE, requires_grad=True)
    skip_unless_served(q, k, v, enable_gqa=True)
    check(attention.compare_with_reference(q, k, v, enable_gqa=True))


@pytest.mark.parametrize("L,S,E", [(0, 5, 16), (5, 0, 16), (4, 6, 0), (1, 1, 16)])
def test_empty_and_single(backend, L, S, E):
    q = make_tensor((2, 3, L, E), torch.float32, DEVICE, requires_grad=True)
    k = make_tensor((2, 3, S, E), torch.float32, DEVICE, requires_grad=True)
    v = make_tensor((2, 3, S, 8), torch.float32, DEVICE, requires_grad=True)
    skip_unless_served(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v)
    expected = torch_F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad = make_tensor(out.shape, torch.float32, DEVICE)
    out.backward(grad)
    qd, kd, vd = (testing.fp64_copy(t) for t in (q, k, v))
    torch_F.scaled_dot_product_attention(qd, kd, vd).backward(grad.double().cpu())
    for mine, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(mine.double().cpu(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch's semantics: the reference is torch's own SDPA where torch has no randomness.

@pytest.mark.parametrize("what", ["causal_L<S", "causal_L>S", "masked_rows_bool", "masked_rows_float", "gqa",
                                  "broadcast_mask", "float_mask_grad"])
def test_torch_implementation_is_torch_sdpa(what):
    """The pure-PyTorch implementation (and so the float64 reference) is torch's SDPA, in float64:
    causal alignment, fully masked rows (output and gradients 0), GQA, broadcasting."""
    L, S = {"causal_L<S": (5, 9), "causal_L>S": (9, 4)}.get(what, (6, 7))
    hkv = 1 if what == "gqa" else 2
    q = make_tensor((2, 2, L, 8), torch.float64, requires_grad=True)
    k = make_tensor((2, hkv, S, 8), torch.float64, requires_grad=True)
    v = make_tensor((2, hkv, S, 5), torch.float64, requires_grad=True)
    kwargs = {}
    if what.startswith("causal"):
        kwargs["is_causal"] = True
    elif what == "masked_rows_bool":
        mask = torch.rand(2, 1, L, S) > 0.3
        mask[:, :, 1] = False
        kwargs["attn_mask"] = mask
    elif what == "masked_rows_float":
        mask = torch.randn(L, S, dtype=torch.float64)
        mask[2] = float("-inf")
        kwargs["attn_mask"] = mask
    elif what == "gqa":
        kwargs["enable_gqa"] = True
    elif what == "broadcast_mask":
        kwargs["attn_mask"] = torch.rand(S) .reshape(1, S) > 0.5
    elif what == "float_mask_grad":
        kwargs["attn_mask"] = make_tensor((2, 1, 1, S), torch.float64, requires_grad=True)
    leaves = [q, k, v] + ([kwargs["attn_mask"]] if what == "float_mask_grad" else [])
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    ref_kwargs = dict(kwargs, attn_mask=copies[3]) if what == "float_mask_grad" else kwargs
    with bigkern.use_backend("torch"):
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    expected = torch_F.scaled_dot_product_attention(*copies[:3], **ref_kwargs)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for mine, theirs in zip(leaves, copies):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_output_may_be_modified_in_place_like_torchs(backend):
    """torch's output is a fresh tensor: code after attention may scale it in place with grad on
    (evaluation without no_grad). bigkern's was a permuted view of its storage, which autograd
    forbids modifying. (Then differentiating raises the version error torch's fused backends raise:
    both keep the output for backward.)"""
    q, k, v = (make_tensor((2, 3, 5, 8), torch.float32, DEVICE, requires_grad=True).transpose(1, 2)
               for _ in range(3))  # (B, L, H, D) storage, the layout the output copies
    skip_unless_served(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v)
    expected = torch_F.scaled_dot_product_attention(q, k, v)
    assert out.stride() == expected.stride()
    out.mul_(2)
    torch.testing.assert_close(out, 2 * expected)


# S=100: the Triton forward splits the key walk in the interpreter (flash-decoding), so the merge
# of partial results must keep these semantics too.
@pytest.mark.parametrize("S", [6, 100])
def test_fully_masked_rows_give_zero_output_gradients_and_inf_lse(backend, S):
    q = make_tensor((1, 2, 5, 16), torch.float32, DEVICE, requires_grad=True)
    k = make_tensor((1, 2, S, 16), torch.float32, DEVICE, requires_grad=True)
    v = make_tensor((1, 2, S, 16), torch.float32, DEVICE, requires_grad=True)
    mask = torch.rand(5, S, device=DEVICE) > 0.3
    mask[torch.arange(5), torch.randint(S, (5,))] = True  # every other row keeps a key (0.3**6 is not rare)
    mask[1] = False
    skip_unless_served(q, k, v, mask)
    out = F.scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))
    args, _ = attention.prepare_sdpa(q, k, v, mask)
    _, lse = attention.sdpa_forward_op(*args)
    assert torch.isinf(lse[:, :, 1]).all() and (lse[:, :, 1] > 0).all()
    scores = (q.double() @ k.double().transpose(-1, -2)) / 4 + \
        torch.zeros(5, S, dtype=torch.float64, device=DEVICE).masked_fill(~mask, -math.inf)
    expected = torch.logsumexp(scores, -1)
    keep = torch.ones(5, dtype=torch.bool, device=DEVICE)
    keep[1] = False
    torch.testing.assert_close(lse[:, :, keep], expected[:, :, keep].float())  # fp32 tolerances


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else []), ids=str)
@pytest.mark.parametrize("S", [6, 100])
def test_rows_masked_by_the_lowest_finite_value_average_like_torch(backend, dtype, S):
    """Hugging Face masks with finfo(dtype).min, not -inf. For float32 and bfloat16 a row masked so
    everywhere is, for torch, a softmax of equal scores (the scores vanish next to the mask): the
    mean of the values. The kernels work in base 2, where finfo.min * log2(e) overflows; they must
    still average, not give 0. (float16's min, -65504, leaves the scores visible: softmax as usual.)
    Rows with one key left see only that key. Gradients too: such a row's softmax is still
    differentiable (its lse, max + log n, has rounded log n away: backward must not use it alone)."""
    q, k, v = (make_tensor((2, 2, 5, 16) if n == 0 else (2, 1, S, 16), dtype, DEVICE, requires_grad=True)
               for n in range(3))  # grouped-query: both query heads read one kv head
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(2, 1, 5, S, dtype=dtype, device=DEVICE)
    mask[:, :, 1] = lowest
    mask[:, :, 3, 1:] = lowest
    mask.requires_grad_()
    skip_unless_served(q, k, v, mask, enable_gqa=True)
    check(attention.compare_with_reference(q, k, v, mask, enable_gqa=True))  # FA rule: output, every gradient
    with torch.no_grad():
        out = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    if dtype != torch.float16:
        torch.testing.assert_close(out[:, :, 1].double(), v.double().mean(2).expand(2, 2, 16), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out[:, :, 3].double(), v[:, :, 0].double().expand(2, 2, 16), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("S", [9, 100])
@pytest.mark.parametrize("where", ["query_row", "visible_key", "masked_key", "value", "inf_value"])
def test_nan_and_inf_propagate_as_in_torch(backend, where, S):
    q = make_tensor((1, 2, 7, 16), torch.float32, DEVICE)
    k = make_tensor((1, 2, S, 16), torch.float32, DEVICE)
    v = make_tensor((1, 2, S, 16), torch.float32, DEVICE)
    mask = torch.ones(7, S, dtype=torch.bool, device=DEVICE)
    mask[:, 4] = False
    if where == "query_row":
        q[0, 1, 3, 2] = float("nan")
    elif where == "visible_key":
        k[0, 0, 2, 5] = float("nan")
    elif where == "masked_key":  # masked, still NaN: torch adds the mask (NaN + -inf = NaN)
        k[0, 0, 4, 5] = float("nan")
    elif where == "value":
        v[0, 1, 6, 0] = float("nan")
    else:
        v[0, 1, 6, 0] = float("inf")
    for t in (q, k, v):
        t.requires_grad_()
    skip_unless_served(q, k, v, mask)
    with torch.no_grad():
        expected = torch_F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    out = F.scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    check(attention.compare_with_reference(q, k, v, mask))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("L", [9, 30])
def test_causal_key_no_query_sees_gets_zero_gradients(backend, value, L):
    """With is_causal and S > L, keys past the last query row are seen by no row: their gradients are
    0 whatever they hold, as torch's. (The dK/dV kernel's query tile past L must not count.)"""
    S = L + 3
    q = make_tensor((1, 2, L, 8), torch.float32, DEVICE, requires_grad=True)
    k = make_tensor((1, 2, S, 8), torch.float32, DEVICE)
    v = make_tensor((1, 2, S, 8), torch.float32, DEVICE)
    with torch.no_grad():
        k[0, 0, S - 1, 0] = value
        k[0, 1, S - 2, 5] = value
    k.requires_grad_()
    v.requires_grad_()
    skip_unless_served(q, k, v, is_causal=True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(torch.randn_like(out))
    assert out.isfinite().all()  # (q.grad is not: 0 * k = NaN, in torch's too)
    assert torch.equal(k.grad[:, :, L:], torch.zeros_like(k.grad[:, :, L:]))
    assert torch.equal(v.grad[:, :, L:], torch.zeros_like(v.grad[:, :, L:]))
    assert k.grad.isfinite().all() and v.grad.isfinite().all()


# ---------------------------------------------------------------------------------------------
# Flash-decoding: few query rows, many keys. The Triton forward splits the key walk over several
# programs and merges their partial outputs by their logsumexp; backward is unchanged (it reads
# the merged out and lse). Key counts scale up on a GPU, where a split covers >= 256 keys.

DECODING_CASES = [
    dict(batch=1, heads=2, kv_heads=1, L=1, S=129, E=16, Ev=16, mask=None, layout="contiguous",
         dtype=torch.float32, dropout=0.0),
    dict(batch=2, heads=3, kv_heads=1, L=7, S=300, E=40, Ev=24, mask="bool", layout="blhd",
         dtype=torch.float16, dropout=0.0),
    dict(batch=1, heads=2, kv_heads=2, L=16, S=200, E=16, Ev=16, mask="float_full", layout="strided",
         dtype=torch.float32, dropout=0.0),
    dict(batch=1, heads=2, kv_heads=2, L=3, S=150, E=16, Ev=16, mask=None, layout="contiguous",
         dtype=torch.float32, dropout=0.2),
    dict(batch=2, heads=1, kv_heads=1, L=1, S=257, E=64, Ev=64, mask="float_bcast", layout="transposed",
         dtype=torch.float16, dropout=0.0),
]


@pytest.mark.parametrize("case", DECODING_CASES, ids=lambda c: case_id({**c, "causal": False, "scale": None}))
def test_split_kv_decoding_matches_fp64(case):
    reason = backend_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    from bigkern.kernels import attention as attention_kernels

    case = {**case, "causal": False, "scale": None, "S": case["S"] * (32 if GPU else 1)}
    q, k, v, mask = build(case)
    assert attention_kernels.split_keys(case["batch"], case["heads"], case["L"], case["S"], False, False,
                                        q.device), "this case would not split: the test would prove nothing"
    with bigkern.use_backend("triton"):
        check(attention.compare_with_reference(q, k, v, mask, case["dropout"], False, None,
                                               case["heads"] != case["kv_heads"]))


@pytest.mark.parametrize("L,S", [(1, 129), (7, 300), (16, 200)])
def test_split_kv_decoding_bottom_right_causal(L, S):
    """Decoding over a KV cache with torch's causal_lower_right: the split key walk (each query row
    sees nearly every key) against float64, forward and gradients."""
    from torch.nn.attention.bias import causal_lower_right

    from bigkern.kernels import attention as attention_kernels

    reason = backend_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    S *= 32 if GPU else 1
    assert attention_kernels.split_keys(1, 3, L, S, 2, False, torch.device(DEVICE)), "would not split"
    q = make_tensor((1, 3, L, 16), requires_grad=True)
    k, v = (make_tensor((1, 3, S, 16), requires_grad=True) for _ in range(2))
    with bigkern.use_backend("triton"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(S - L)
    expected = torch_F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for grad, want in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(grad.double(), want, atol=1e-4, rtol=1e-4)


def test_split_kv_is_chosen_for_decoding_only(monkeypatch):
    from bigkern.kernels import attention as attention_kernels

    cpu = torch.device("cpu")
    assert attention_kernels.split_keys(1, 2, 1, 129, False, False, cpu)  # decoding
    assert attention_kernels.split_keys(1, 2, 33, 129, False, False, cpu) is None  # many query rows
    assert attention_kernels.split_keys(1, 2, 1, 129, True, False, cpu) is None  # causal: row 0 sees key 0
    assert attention_kernels.split_keys(1, 2, 1, 129, 2, False, cpu)  # bottom-right: the last row sees all
    assert attention_kernels.split_keys(1, 2, 1, 129, False, True, cpu) is None  # varlen
    assert attention_kernels.split_keys(1, 2, 1, 20, False, False, cpu) is None  # too few keys to share
    assert attention_kernels.split_keys(64, 8, 1, 129, False, False, cpu) is None  # the grid is full already
    monkeypatch.setenv(attention_kernels.SPLIT_ENV, "0")
    assert attention_kernels.split_keys(1, 2, 1, 129, False, False, cpu) is None


# ---------------------------------------------------------------------------------------------
# TMA (BIGKERN_ATTENTION_TMA=1): the forward and dQ kernels read K and V tiles, the dK/dV kernel
# Q and dO tiles, through tensor descriptors. The interpreter runs the descriptor loads (zero fill
# past the rows and past D included); a GPU runs them on Hopper's copy engine. 16-bit inputs only
# (fp16 here: bf16 tl.dot is broken in the interpreter).

TMA_CASES = [
    dict(batch=2, heads=4, kv_heads=2, L=37, S=45, E=64, Ev=64, mask=None, causal=False, layout="contiguous"),
    dict(batch=1, heads=3, kv_heads=1, L=33, S=17, E=40, Ev=24, mask=None, causal=True, layout="blhd"),
    dict(batch=2, heads=2, kv_heads=2, L=7, S=33, E=80, Ev=80, mask="bool_rows", causal=False, layout="fused_qkv"),
    dict(batch=1, heads=2, kv_heads=2, L=33, S=33, E=16, Ev=16, mask="float", causal=False, layout="fused_qkv",
         dropout=0.2),
    dict(batch=1, heads=2, kv_heads=1, L=1, S=1, E=16, Ev=16, mask=None, causal=False, layout="contiguous"),
    dict(batch=1, heads=2, kv_heads=2, L=3, S=150, E=64, Ev=64, mask="float_bcast", causal=False,
         layout="transposed"),  # decoding: split key walk
]


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: case_id({"dropout": 0.0, "scale": None, **c,
                                                                      "dtype": torch.float16}))
def test_tma_forward_and_backward_match_fp64(case, monkeypatch):
    reason = backend_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    from bigkern.kernels import attention as attention_kernels

    if GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    monkeypatch.setenv(attention_kernels.TMA_ENV, "1")
    described = []
    real = attention_kernels.tma_descriptors

    def spy(name, *args, **kwargs):
        descriptors = real(name, *args, **kwargs)
        described.append((name, descriptors is not None))
        return descriptors
    monkeypatch.setattr(attention_kernels, "tma_descriptors", spy)
    dtypes = [torch.float16, torch.bfloat16] if GPU else [torch.float16]
    for dtype in dtypes:
        scale = 32 if GPU else 1
        full = {"dropout": 0.0, "scale": None, **case, "dtype": dtype, "L": case["L"] * scale,
                "S": case["S"] * scale}
        q, k, v, mask = build(full)
        with bigkern.use_backend("triton"):
            check(attention.compare_with_reference(q, k, v, mask, full["dropout"], full["causal"], None,
                                                   full["heads"] != full["kv_heads"]))
    # every kernel took the TMA path, else the test proves nothing
    assert {name for name, _ in described} == {"forward", "dkdv", "dq"} and all(ok for _, ok in described)


@pytest.mark.parametrize("hopper", [True, False])
def test_tile_lists_fit_the_launchers_assumptions(hopper, monkeypatch):
    """The autotuning lists (kernels.attention *_tiles) on a GPU: never empty; every decoding tile
    covers the query rows and its key tile divides the split granule; under TMA the pruned list
    keeps the tiles of the key tile the launcher built its descriptors for."""
    from types import SimpleNamespace

    from bigkern.kernels import attention as attention_kernels

    monkeypatch.setattr(attention_kernels, "_interpreting", lambda: False)
    monkeypatch.setattr(attention_kernels, "_capability", lambda: (9, 0) if hopper else (8, 0))
    for d, dv in ((16, 16), (64, 64), (80, 112), (128, 128), (128, 256), (256, 256)):
        meta = dict(HEAD_DIM=d, BLOCK_D=attention_kernels._block_dim(d), BLOCK_DV=attention_kernels._block_dim(dv))
        for seq_q in (1, 9, 16, 17, 33, 64, 100, 4096):
            args = dict(meta, q_bucket=attention_kernels._bucket(seq_q))
            tiles = attention_kernels.forward_tiles(args, hopper)
            assert tiles
            if seq_q <= attention_kernels.SPLIT_MAX_QUERY_ROWS:
                assert all(t[0] >= seq_q and attention_kernels.SPLIT_KEY_GRANULE % t[1] == 0 for t in tiles)
            for name, prune, descriptor, fixed in (("forward", attention_kernels._forward_prune, "KDesc", "BLOCK_N"),
                                                   ("dkdv", attention_kernels._dkdv_prune, "QDesc", "BLOCK_M"),
                                                   ("dq", attention_kernels._dq_prune, "KDesc", "BLOCK_N")):
                rows = attention_kernels._tma_rows(name, seq_q, meta)
                described = SimpleNamespace(block_shape=[1, 1, rows, meta["BLOCK_D"]])
                kept = prune(None, dict(args, TMA=True, **{descriptor: described}))
                assert kept and all(c.kwargs[fixed] == rows for c in kept), name
        assert attention_kernels.dkdv_tiles(meta, hopper) and attention_kernels.dq_tiles(meta, hopper)


def test_tma_serves_only_what_it_can_describe(monkeypatch):
    from bigkern.kernels import attention as attention_kernels

    def describes(k, v, varlen=False):
        meta = dict(HEAD_DIM=k.shape[-1], BLOCK_D=attention_kernels._block_dim(k.shape[-1]),
                    BLOCK_DV=attention_kernels._block_dim(v.shape[-1]))
        return attention_kernels.tma_descriptors("forward", k, v, 7, meta, varlen) is not None

    k = torch.randn(2, 2, 9, 16, dtype=torch.float16, device=DEVICE)
    v = torch.randn(2, 2, 9, 16, dtype=torch.float16, device=DEVICE)
    assert not describes(k, v)  # off unless asked for
    monkeypatch.setenv(attention_kernels.TMA_ENV, "1")
    if GPU and torch.cuda.get_device_capability()[0] < 9:
        assert not describes(k, v)  # no copy engine before Hopper
        return
    assert describes(k, v)
    assert describes(k[:1], v[:1])  # batch of one: its stride is never used
    assert not describes(k, v, varlen=True)
    assert not describes(k.float(), v.float())  # 32-bit: the pointer path
    odd = torch.randn(2, 2, 9, 12, dtype=torch.float16, device=DEVICE)[..., :4]  # rows 24 bytes apart
    assert not describes(odd, odd)
    offset = torch.randn(2 * 2 * 9 * 16 + 1, dtype=torch.float16, device=DEVICE)[1:].view(2, 2, 9, 16)
    assert not describes(offset, offset)  # base not 16-byte aligned
    assert not describes(k.expand(2, 2, 9, 16).transpose(-1, -2), v)  # last dimension strided
    assert not describes(k[:, :, :0], v[:, :, :0])  # no rows: a descriptor needs positive sizes


def test_tma_with_empty_keys_or_queries(monkeypatch):
    """S = 0 or L = 0 under TMA: torch's results (TensorDescriptor refused the empty tensors)."""
    reason = backend_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    from bigkern.kernels import attention as attention_kernels

    monkeypatch.setenv(attention_kernels.TMA_ENV, "1")
    for L, S in ((5, 0), (0, 5)):
        q = make_tensor((1, 2, L, 16), torch.float16, DEVICE).requires_grad_()
        k, v = (make_tensor((1, 2, S, 16), torch.float16, DEVICE).requires_grad_() for _ in range(2))
        with bigkern.use_backend("triton"):
            out = F.scaled_dot_product_attention(q, k, v)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected = torch_F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        torch.testing.assert_close(out.float(), expected)
        for grad, t in zip(grads, (q, k, v)):
            assert grad.shape == t.shape and (grad == 0).all()


# ---------------------------------------------------------------------------------------------
# Dropout

def _dropout_pattern(p, batch=1, heads=2, L=64, S=64):
    """Read the keep pattern back through the public API: with q = 0 every weight is 1/S, and with
    v = I the output is the dropped weights themselves: out * S * (1 - p) = keep."""
    q = torch.zeros(batch, heads, L, 16, device=DEVICE)
    k = make_tensor((batch, heads, S, 16), torch.float32, DEVICE)
    v = torch.eye(S, device=DEVICE).expand(batch, heads, S, S)
    state = torch.get_rng_state()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    seed = attention._replay_seed(state, p)
    return (out * S * (1 - p)).round().to(torch.bool), seed


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_pattern(backend, p):
    if backend == "cuda":
        pytest.skip("the CUDA kernels have no dropout")
    keep, seed = _dropout_pattern(p)
    expected = attention.dropout_keep_mask(seed, 1, 2, 64, 64, p, DEVICE)
    assert torch.equal(keep, expected), "the kernel's dropout pattern is not the documented Philox pattern"
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate} for p={p}"
    assert not torch.equal(keep[0, 0], keep[0, 1])
    # rows and columns are not correlated: each row keeps about the same fraction
    assert (keep.float().mean(-1) - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / 64)


def test_dropout_reproducible_under_manual_seed(backend):
    if backend == "cuda":
        pytest.skip("the CUDA kernels have no dropout")
    q, k, v = (make_tensor((1, 2, 33, 16), torch.float32, DEVICE) for _ in range(3))
    torch.manual_seed(123)
    first = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(123)
    again = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    other = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(first, again) and not torch.equal(first, other)
    before = torch.get_rng_state()
    F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    assert torch.equal(before, torch.get_rng_state()), "no dropout must not consume random numbers"


def test_dropout_same_pattern_in_every_implementation():
    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    q, k, v = (make_tensor((2, 2, 17, 16), torch.float32, DEVICE, requires_grad=True) for _ in range(3))
    results = {}
    for name in ("triton", "torch"):
        torch.manual_seed(7)
        with bigkern.use_backend(name):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
            out.sum().backward()
        results[name] = (out.detach(), q.grad.clone())
        q.grad = None
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], atol=1e-5, rtol=1e-5)


def test_dropout_one_gives_zeros_like_torch(backend):
    if backend == "cuda":
        pytest.skip("the CUDA kernels have no dropout")
    q, k, v = (make_tensor((1, 2, 7, 16), torch.float32, DEVICE, requires_grad=True) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(v.grad, torch.zeros_like(v.grad))
    assert torch.equal(torch_F.scaled_dot_product_attention(q, k, v, dropout_p=1.0), out)


# ---------------------------------------------------------------------------------------------
# Variable-length batches

def varlen_reference(q, k, v, lens_q, lens_k, causal, scale, seed, p):
    """Per-sequence reference attention on packed tensors (differentiable), with the same dropout."""
    outs, lses = [], []
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        q4, k4, v4 = (attention._as_4d(t) for t in (q[q0:q0 + lq], k[k0:k0 + lk], v[k0:k0 + lk]))
        keep = None
        if seed is not None:
            keep = attention.dropout_keep_mask(seed, 1, q.shape[1], lq, lk, p, q.device, first_stream=b * q.shape[1])
        o, lse = attention.reference_attention(q4, k4, v4, None, causal, scale, keep, p)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("causal,gqa,p", [(False, False, 0.0), (True, True, 0.0), (True, False, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_varlen_matches_fp64(backend, causal, gqa, p, dtype):
    if backend == "cuda":
        pytest.skip("no CUDA varlen kernel")
    lens_q, lens_k = [5, 0, 33, 1, 20], [9, 3, 17, 1, 0]
    if GPU:
        lens_q, lens_k = [1000, 1, 517, 2048], [1000, 700, 1, 2048]
    heads, kv_heads = (4, 2) if gqa else (2, 2)
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = make_tensor((sum(lens_q), heads, 40), dtype, DEVICE, requires_grad=True)
    k = make_tensor((sum(lens_k), kv_heads, 40), dtype, DEVICE, requires_grad=True)
    v = make_tensor((sum(lens_k), kv_heads, 24), dtype, DEVICE, requires_grad=True)
    state = torch.get_rng_state()
    out, lse = F.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p, is_causal=causal,
                                  enable_gqa=gqa, return_lse=True)
    seed = attention._replay_seed(state, p)
    grad_out = make_tensor(out.shape, dtype, DEVICE)
    grad_lse = make_tensor(lse.shape, torch.float32, DEVICE)
    torch.autograd.backward([out, lse], [grad_out, grad_lse])
    results = {}
    for name, copy in (("fp64", testing.fp64_copy), ("same", testing.same_dtype_copy)):
        leaves = [copy(t) for t in (q, k, v)]
        o, l_ = varlen_reference(*leaves, lens_q, lens_k, causal, 1 / math.sqrt(40), seed, p)
        torch.autograd.backward([o, l_], [grad_out.to(o), grad_lse.to(l_)])
        results[name] = (o, l_, leaves)
    (o64, l64, leaves64), (ot, lt, leaves_t) = results["fp64"], results["same"]
    check([testing.compare(out, o64, ot), testing.compare(lse, l64, lt.float(), name="lse")])
    for name, mine, ref, same in zip("qkv", (q, k, v), leaves64, leaves_t):
        scale = 2 * ref.grad.abs().max().item() + 1e-3
        check([testing.compare(mine.grad, ref.grad, same.grad, name=f"grad {name}", factor=testing.GRADIENT_FACTOR,
                               scale=scale)])


def test_varlen_takes_strided_cumulative_lengths(backend):
    """cu_seqlens as a strided view (a column of a table): the kernels read it as contiguous."""
    if backend == "cuda":
        pytest.skip("no CUDA varlen kernel")
    q, k, v, cu_q, cu_k, max_q, max_k = _packed([3, 5, 2], [4, 1, 6])
    expected = F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    table_q, table_k = (torch.stack([cu, cu.flip(0)], dim=1) for cu in (cu_q, cu_k))  # columns: stride 2
    out = F.varlen_attention(q, k, v, table_q[:, 0], table_k[:, 0], max_q, max_k)
    torch.testing.assert_close(out, expected)
    for grad, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), expected_grads):
        torch.testing.assert_close(grad, want)


def test_varlen_launches_no_more_rows_than_there_are_tokens():
    """A generous max_q / max_k (a caller's upper bound) must not size the launch: 10^6 launched
    that many idle programs per head and sequence (minutes in the interpreter)."""
    from bigkern.kernels import attention as attention_kernels

    q, k, v, cu_q, cu_k, _, _ = _packed([3, 5], [4, 1])
    q4, k4, v4 = (attention._as_4d(t) for t in (q, k, v))
    assert attention_kernels._geometry(q4, k4, v4, cu_q, 10**6, 10**6) == (2, 2, 2, 8, 5)
    assert attention_kernels._geometry(q4, k4, v4, cu_q, 5, 4) == (2, 2, 2, 5, 4)
    torch.testing.assert_close(F.varlen_attention(q, k, v, cu_q, cu_k, 10**6, 10**6),
                               F.varlen_attention(q, k, v, cu_q, cu_k, 5, 4))


def _packed(lens_q, lens_k, heads=2, kv_heads=2, dtype=torch.float32):
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = make_tensor((sum(lens_q), heads, 16), dtype, DEVICE, requires_grad=True)
    k = make_tensor((sum(lens_k), kv_heads, 16), dtype, DEVICE, requires_grad=True)
    v = make_tensor((sum(lens_k), kv_heads, 8), dtype, DEVICE, requires_grad=True)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


def test_varlen_attn_has_torchs_signature():
    torch_varlen_attn = attention._TORCH_VARLEN_ATTN
    if torch_varlen_attn is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    ours = inspect.signature(F.varlen_attn).parameters
    for name, param in inspect.signature(torch_varlen_attn).parameters.items():
        assert name in ours, name
        assert (ours[name].kind, ours[name].default) == (param.kind, param.default), name


@pytest.mark.parametrize("window,gqa", [((-1, -1), False), ((-1, 0), False), ([-1, 0], True)])
def test_varlen_attn_is_varlen_attention(backend, window, gqa):
    """torch's signature over bigkern's varlen kernels: the same numbers, lse as torch lays it out."""
    if backend == "cuda":
        pytest.skip("no CUDA varlen kernel")
    lens = [5, 1, 17]
    q, k, v, cu_q, cu_k, max_q, max_k = _packed(lens, lens, 4 if gqa else 2, 2)
    try:
        from torch.nn.attention.varlen import AuxRequest
    except ImportError:  # an older torch: any object with .lse does
        AuxRequest = types.SimpleNamespace
    aux = AuxRequest(lse=True)
    out, lse = F.varlen_attn(q, k, v, cu_q, cu_k.clone(), max_q, max_k, return_aux=aux, window_size=window,
                             enable_gqa=gqa, scale=0.3, num_splits=1)
    expected, expected_lse = F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=tuple(window) == (-1, 0),
                                                enable_gqa=gqa, scale=0.3, return_lse=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    assert torch.equal(F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window, enable_gqa=gqa,
                                     scale=0.3), expected)
    explanation = bigkern.explain(F.varlen_attn, q, k, v, cu_q, cu_k, max_q, max_k, window_size=window,
                                  enable_gqa=gqa)
    assert explanation.op == "varlen_attention_forward" and explanation.backend == backend
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected.sum().backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))


def test_varlen_attn_out_writes_varlen_attn_into_out():
    q, k, v, cu, _, max_q, max_k = _packed([5, 1, 17], [5, 1, 17])
    torch_out_fn = attention._TORCH_VARLEN_ATTN_OUT
    if torch_out_fn is not None:
        ours = inspect.signature(F.varlen_attn_out).parameters
        for name, param in inspect.signature(torch_out_fn).parameters.items():
            assert (ours[name].kind, ours[name].default) == (param.kind, param.default), name
    out = torch.full((q.shape[0], q.shape[1], v.shape[2]), float("nan"), device=DEVICE)
    result, lse = F.varlen_attn_out(out, q, k, v, cu, cu, max_q, max_k, window_size=(-1, 0),
                                    return_aux=types.SimpleNamespace(lse=True))
    expected, expected_lse = F.varlen_attention(q, k, v, cu, cu, max_q, max_k, is_causal=True, return_lse=True)
    assert result is out and torch.equal(out, expected) and torch.equal(lse, expected_lse)
    with bigkern.use_backend("triton"):
        explanation = bigkern.explain(F.varlen_attn_out, out, q, k, v, cu, cu, max_q, max_k)
    assert explanation.backend == "triton"
    sentinel = object()
    with mock.patch.object(attention, "_TORCH_VARLEN_ATTN_OUT", mock.Mock(return_value=sentinel)) as fn:
        assert F.varlen_attn_out(out, q, k, v, cu, cu, max_q, max_k, window_size=(3, 0)) is sentinel
    assert fn.call_args.args[:8] == (out, q, k, v, cu, cu, max_q, max_k)


def test_varlen_attn_causal_aligns_bottom_right(backend):
    """varlen_attn's causal window (-1, 0) as torch's flash kernels align it where a sequence's query
    and key lengths differ: the last query sees the last key (queries before S - L see none: 0).
    Compiled too, with two distinct cu_seqlens tensors (a graph cannot compare their values)."""
    if backend == "cuda":
        pytest.skip("no CUDA varlen kernel")
    lens_q, lens_k = [5, 17, 1, 40, 3], [9, 4, 33, 40, 0]
    q, k, v, cu_q, cu_k, max_q, max_k = _packed(lens_q, lens_k)
    out = F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        mask = torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril(lk - lq)
        rows = torch_F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q64[q0:q0 + lq], k64[k0:k0 + lk],
                                                                                    v64[k0:k0 + lk])), attn_mask=mask)
        expected.append(rows.nan_to_num(0.0).transpose(0, 1))  # no key visible: 0, as flash gives it
        q0, k0 = q0 + lq, k0 + lk
    expected = torch.cat(expected)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for grad, want in zip(grads, torch.autograd.grad(expected.sum(), (q64, k64, v64))):
        torch.testing.assert_close(grad.double(), want, atol=1e-4, rtol=1e-4)
    compiled = torch.compile(lambda *a: F.varlen_attn(*a, max_q, max_k, window_size=(-1, 0)), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cu_q, cu_k.clone()), out)


@pytest.mark.parametrize("case", ["sliding window", "seqused_k"])
def test_varlen_attn_beyond_the_kernels(case):
    """What bigkern's kernels do not compute: UnsupportedError when forced, torch's own varlen_attn
    otherwise (with every argument passed on)."""
    q, k, v, cu_q, cu_k, max_q, max_k = _packed([5, 3], [5, 3])
    kwargs = {"sliding window": dict(window_size=(2, 0)),
              "seqused_k": dict(seqused_k=torch.tensor([4, 2], dtype=torch.int32, device=DEVICE))}[case]
    for forced in ("triton", "cuda"):
        with bigkern.use_backend(forced):
            with pytest.raises(bigkern.UnsupportedError, match="not implemented"):
                F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
            assert bigkern.explain(F.varlen_attn, q, k, v, cu_q, cu_k, max_q, max_k, **kwargs).backend is None
    with bigkern.use_backend("auto"):
        explanation = bigkern.explain(F.varlen_attn, q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    assert explanation.backend == "torch" and "not implemented" in explanation.reasons["triton"]
    sentinel = object()
    with mock.patch.object(attention, "_TORCH_VARLEN_ATTN", mock.Mock(return_value=sentinel)) as found:
        with bigkern.use_backend("auto"), bigkern.record() as calls:
            assert F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=0.5, **kwargs) is sentinel
    assert calls == {("varlen_attn", "torch"): 1}
    call = found.call_args
    assert call.args[:7] == (q, k, v, cu_q, cu_k, max_q, max_k)
    assert call.kwargs["scale"] == 0.5 and all(call.kwargs[name] is value for name, value in kwargs.items()
                                               if name != "window_size")
    assert call.kwargs["window_size"] == tuple(kwargs.get("window_size", (-1, -1)))


def test_varlen_attn_compiles_without_graph_breaks():
    q, k, v, cu, _, max_q, max_k = _packed([5, 1, 17], [5, 1, 17])

    def causal(q, k, v, cu):
        return F.varlen_attn(q, k, v, cu, cu, max_q, max_k, window_size=(-1, 0))

    compiled = torch.compile(causal, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cu), causal(q, k, v, cu))


def test_varlen_attn_bad_input_as_torch():
    q, k, v, cu_q, cu_k, max_q, max_k = _packed([5, 3], [5, 3], heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="Try setting enable_gqa=True"):
        F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=True)
    with pytest.raises(ZeroDivisionError, match="'key'"):  # torch's check divides by the kv heads
        F.varlen_attn(q, k[:, :0], v[:, :0], cu_q, cu_k, max_q, max_k, enable_gqa=True)
    q, k, v, cu_q, cu_k, max_q, max_k = _packed([5, 3], [5, 3])
    with pytest.raises(ValueError, match="window_size must have length 2"):
        F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0, 0))
    # lengths as torch's argument parser takes ints: numpy and 0-d tensor integers
    expected = F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
    for as_given in (np.int64, torch.tensor):
        torch.testing.assert_close(F.varlen_attn(q, k, v, cu_q, cu_k, as_given(max_q), as_given(max_k)), expected)
    # scalars as torch's argument parser takes them, each named when it is not one
    for name, bad, error in (("is_causal", 1, TypeError), ("enable_gqa", "yes", TypeError),
                             ("scale", "a", TypeError), ("dropout_p", "x", TypeError), ("dropout_p", 1.5, RuntimeError)):
        with pytest.raises(error, match=f"'{name}'"):
            F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, **{name: bad})
    # varlen_attn's other arguments as torch's custom-op schema parses them: RuntimeError naming the
    # argument (a float window end was truncated: (-1.0, 0.5) ran as causal)
    for name, bad in (("window_size", (-1.0, 0.5)), ("window_size", "ab"), ("num_splits", 2.0),
                      ("num_splits", "x"), ("scale", "a"), ("max_q", 5.0), ("cu_seq_q", [0, 5, 8])):
        arguments = {"cu_seq_q": cu_q, "max_q": max_q, name: bad}
        with pytest.raises(RuntimeError, match=f"'{name}'"):
            F.varlen_attn(q, k, v, arguments.pop("cu_seq_q"), cu_k, arguments.pop("max_q"), max_k, **arguments)
    torch.testing.assert_close(F.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=1, num_splits=np.int64(1)),
                               expected)
    # varlen_attn_out's out: query's dtype and device, (Tq, Hq, Dv), as torch's flash kernel checks
    for out, says in ((torch.empty(q.shape[0], 2, 8, dtype=torch.float64, device=DEVICE), "dtype"),
                      (torch.empty(q.shape[0] - 1, 2, 8, device=DEVICE), "shape"),
                      (torch.empty(q.shape[0], 2, 16, device=DEVICE), "shape"),
                      ([0.0], "Tensor")):
        with pytest.raises(TypeError if says == "Tensor" else RuntimeError, match=f"'out'.*{says}"):
            F.varlen_attn_out(out, q, k, v, cu_q, cu_k, max_q, max_k)


_BAD_CUMULATIVE_LENGTHS = {
    # name: (cu_seq_q, cu_seq_k, max_q, max_k, the argument blamed, what the message says)
    "decreasing": ([0, 5, 3, 8], [0, 3, 5, 8], 5, 5, "cu_seq_q", "decreases"),
    "past the end": ([0, 3, 12], [0, 3, 8], 9, 5, "cu_seq_q", "ends at 12"),
    "short of the end": ([0, 3, 8], [0, 3, 6], 5, 5, "cu_seq_k", "ends at 6"),
    "not from 0": ([1, 3, 8], [0, 3, 8], 5, 5, "cu_seq_q", "starts at 1"),
    "max_q too small": ([0, 3, 8], [0, 3, 8], 4, 5, "cu_seq_q", "max_q=4"),
    "max_k too small": ([0, 3, 8], [0, 3, 8], 5, 2, "cu_seq_k", "max_k=2"),
}


@pytest.mark.parametrize("case", list(_BAD_CUMULATIVE_LENGTHS), ids=str)
def test_varlen_rejects_what_is_not_cumulative_lengths(backend, case, monkeypatch):
    """Lengths that would make the kernels read past the packed tensors or skip rows raise,
    naming the argument; on a GPU the same predicate runs as a device-side assert (checked here
    by sending CPU tensors down that path, where torch._assert_async raises at once)."""
    if backend == "cuda":
        pytest.skip("no CUDA varlen kernel")
    if DEVICE != "cpu":
        pytest.skip("on a GPU the check is a device-side assert, which would end this process's CUDA context")
    cu_q, cu_k, max_q, max_k, blamed, says = _BAD_CUMULATIVE_LENGTHS[case]
    q, k, v = (make_tensor((8, 2, 16), torch.float32, DEVICE, requires_grad=True) for _ in range(3))
    cu_q, cu_k = (torch.tensor(cu, dtype=torch.int32, device=DEVICE) for cu in (cu_q, cu_k))
    with pytest.raises(RuntimeError, match=f"argument '{blamed}' .*{says}"):
        F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)
    with monkeypatch.context() as patched:
        patched.setattr(attention, "_checked_on_host", lambda t: False)
        with pytest.raises(RuntimeError, match=f"argument '{blamed}' must hold cumulative sequence lengths"):
            F.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)
    # the backward op checks its own arguments too (it is callable on its own)
    good_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(RuntimeError, match="cu_seq_k"):
        torch.ops.bigkern.varlen_attention_backward(q.detach(), None, q.detach(), k.detach(), v.detach(), q.detach(),
                                                    torch.zeros(2, 8, device=DEVICE), good_q,
                                                    torch.tensor([0, 3, 9], dtype=torch.int32, device=DEVICE), 5, 5,
                                                    0.0, False, 0.25, None)


# ---------------------------------------------------------------------------------------------
# Registration, compile, dispatch

@pytest.mark.parametrize("op_backend", ["triton", "torch"])
def test_opcheck(op_backend):
    if backend_skip_reason(op_backend):
        pytest.skip(backend_skip_reason(op_backend))
    q = make_tensor((1, 2, 5, 16), torch.float32, DEVICE, requires_grad=True)
    k = make_tensor((1, 2, 6, 16), torch.float32, DEVICE, requires_grad=True)
    v = make_tensor((1, 2, 6, 8), torch.float32, DEVICE, requires_grad=True)
    mask = make_tensor((1, 2, 5, 6), torch.float32, DEVICE, requires_grad=True)
    seed = attention.draw_dropout_seed()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    packed = [make_tensor((7, 2, 16), torch.float32, DEVICE, requires_grad=True) for _ in range(3)]
    ops = torch.ops.bigkern
    with bigkern.use_backend(op_backend), memory.poisoned_outputs(False):
        # the forward's opcheck runs the backward op too (through autograd, also under AOT, where
        # the gradient of lse arrives in a layout of its own)
        torch.library.opcheck(ops.sdpa_forward.default, (q, k, v, mask, 0.0, False, 0.25, None))
        if op_backend != "torch":
            return  # schemas and fakes do not depend on the backend: the rest once, on the fast one
        torch.library.opcheck(ops.varlen_attention_forward.default, (*packed, cu, cu, 4, 4, 0.0, True, 0.25, None))
        torch.library.opcheck(ops.sdpa_forward.default, (q, k, v, None, 0.2, True, 0.25, seed))
        out, lse = ops.sdpa_forward(q, k, v, mask, 0.0, False, 0.25, None)
        grad = make_tensor(out.shape, torch.float32, DEVICE)
        torch.library.opcheck(ops.sdpa_backward.default,
                              (grad, None, q.detach(), k.detach(), v.detach(), mask.detach(), out.detach(),
                               lse.detach(), 0.0, False, 0.25, None, True))
        out, lse = ops.varlen_attention_forward(*packed, cu, cu, 4, 4, 0.0, True, 0.25, None)
        torch.library.opcheck(ops.varlen_attention_backward.default,
                              (torch.randn_like(out), torch.randn_like(lse), *(t.detach() for t in packed),
                               out.detach(), lse.detach(), cu, cu, 4, 4, 0.0, True, 0.25, None))


class TinyTransformerBlock(torch.nn.Module):
    """A fused QKV projection, causal attention with dropout, an output projection."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           dropout_p=0.1 if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


def test_torch_compile_fullgraph_and_export():
    model = TinyTransformerBlock().eval()
    x = make_tensor((2, 9, 32))
    expected = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    model.train()
    compiled(x).sum().backward()  # dropout draws its seed inside the graph, backward runs the op
    assert model.qkv.weight.grad is not None and model.qkv.weight.grad.isfinite().all()
    exported = torch.export.export(model.eval(), (x,))
    assert any("bigkern.sdpa_forward" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), expected)


def test_head_dim_can_be_dynamic():
    """The default scale 1/sqrt(E) is taken inside the op, so E stays symbolic: one graph for several
    head dims, and export with a dynamic E (torch's does both)."""
    from torch._dynamo.testing import CompileCounter

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(attend, backend=counter, fullgraph=True, dynamic=True)
    for E in (4, 8, 16):
        q, k, v = (make_tensor((1, 2, 5, E)) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), torch_F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert counter.frame_count == 1

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return attend(q, k, v)

    E = torch.export.Dim("E", min=2, max=256)
    q, k, v = (make_tensor((1, 2, 5, 8)) for _ in range(3))
    exported = torch.export.export(Attend(), (q, k, v), dynamic_shapes=({3: E}, {3: E}, {3: E}))
    q, k, v = (make_tensor((1, 2, 5, 16)) for _ in range(3))
    torch.testing.assert_close(exported.module()(q, k, v), torch_F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_dispatch_and_explain():
    q, k, v = (make_tensor((1, 2, 5, 16)) for _ in range(3))
    explanation = bigkern.explain(F.scaled_dot_product_attention, q, k, v)
    assert explanation.backend == "torch"  # CPU tensors under auto: the reference is the fast path
    assert explanation.reasons["cuda"]
    with bigkern.use_backend("cuda"), pytest.raises(bigkern.UnsupportedError, match="cuda"):
        F.scaled_dot_product_attention(q, k, v)
    q64 = q.double()
    with bigkern.use_backend("triton"), pytest.raises(bigkern.UnsupportedError, match="float64"):
        F.scaled_dot_product_attention(q64, q64, q64)
    big = make_tensor((1, 1, 2, 300))
    with bigkern.use_backend("triton"), pytest.raises(bigkern.UnsupportedError, match="head dims"):
        F.scaled_dot_product_attention(big, big, big)
    state = torch.get_rng_state()
    bigkern.explain(F.scaled_dot_product_attention, q, k, v, dropout_p=0.5)
    assert torch.equal(state, torch.get_rng_state()), "explain() must not draw a dropout seed"


def test_fused_qkv_output_is_laid_out_like_the_projection():
    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    q, k, v, _ = attention.make_inputs(2, 3, 3, 7, 7, 16, 16, None, "fused_qkv", torch.float32, DEVICE)
    with bigkern.use_backend("triton"):
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous(), "the (B, L, H, D) reshape after attention should be free"


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception types, naming the argument.

def _bad_calls():
    t = lambda *shape, dtype=torch.float32: make_tensor(shape, dtype)  # noqa: E731
    q, k, v = t(2, 2, 3, 4), t(2, 2, 5, 4), t(2, 2, 5, 6)
    return [
        (TypeError, "'query'", lambda: F.scaled_dot_product_attention([1.0], k, v)),
        (TypeError, "'attn_mask'", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=[1.0])),
        (RuntimeError, "'query'", lambda: F.scaled_dot_product_attention(t(4), t(4), t(6))),
        (RuntimeError, "'key'", lambda: F.scaled_dot_product_attention(q, k.half(), v)),
        (RuntimeError, "'value'", lambda: F.scaled_dot_product_attention(q, k, torch.empty(2, 2, 5, 6, device="meta"))),
        (RuntimeError, "'query'", lambda: F.scaled_dot_product_attention(q.long(), k.long(), v.long())),
        (RuntimeError, "'key'", lambda: F.scaled_dot_product_attention(q, t(2, 2, 5, 5), v)),
        (RuntimeError, "'value'", lambda: F.scaled_dot_product_attention(q, k, t(2, 2, 6, 6))),
        (RuntimeError, "'key'", lambda: F.scaled_dot_product_attention(q, t(3, 2, 5, 4), t(3, 2, 5, 6))),
        (RuntimeError, "'key'", lambda: F.scaled_dot_product_attention(t(2, 4, 3, 4), t(2, 2, 5, 4), t(2, 2, 5, 6))),
        (RuntimeError, "'key'", lambda: F.scaled_dot_product_attention(t(2, 4, 3, 4), t(2, 3, 5, 4), t(2, 3, 5, 6),
                                                                      enable_gqa=True)),
        (IndexError, "'query'", lambda: F.scaled_dot_product_attention(t(3, 4), t(5, 4), t(5, 6), enable_gqa=True)),
        (IndexError, "'key'", lambda: F.scaled_dot_product_attention(t(2, 3, 4), t(5, 4), t(5, 6), enable_gqa=True)),
        (TypeError, "not numpy.bool", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=np.bool_(True))),
        (RuntimeError, "'attn_mask'", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 4, dtype=torch.bool))),
        (RuntimeError, "'attn_mask'", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.int32))),
        (RuntimeError, "'attn_mask'", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.float64))),
        (RuntimeError, "'attn_mask'", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(1, 1, 1, 3, 5, dtype=torch.bool))),
        (IndexError, "'attn_mask'", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(5, dtype=torch.bool))),
        (RuntimeError, "'attn_mask'", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool), is_causal=True)),
        (RuntimeError, "'dropout_p'", lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=1.5)),
        (RuntimeError, "'dropout_p'", lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=-0.1)),
        (TypeError, "'dropout_p'", lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=None)),
        (TypeError, "'is_causal'", lambda: F.scaled_dot_product_attention(q, k, v, is_causal="no")),
        (TypeError, "'enable_gqa'", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=1)),
        (TypeError, "'scale'", lambda: F.scaled_dot_product_attention(q, k, v, scale="0.5")),
        (NotImplementedError, "'query'", lambda: F.scaled_dot_product_attention(
            *(x.to(torch.complex64) for x in (q, k, v)))),
        (TypeError, "positional", lambda: F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.5)),
        (RuntimeError, "'key'", lambda: F.scaled_dot_product_attention(t(2, 4, 3, 4), t(2, 0, 5, 4), t(2, 0, 5, 6),
                                                                      enable_gqa=True)),
        (RuntimeError, "'key'", lambda: F.varlen_attention(t(9, 4, 8), t(9, 3, 8), t(9, 3, 8), _cu(), _cu(), 5, 5,
                                                           enable_gqa=True)),
        (RuntimeError, "'cu_seq_k'", lambda: F.varlen_attention(t(9, 2, 8), t(9, 2, 8), t(9, 2, 8), _cu(),
                                                                _cu().float(), 5, 5)),
        (RuntimeError, "'query'", lambda: F.varlen_attention(t(9, 8), t(9, 2, 8), t(9, 2, 8), _cu(), _cu(), 5, 5)),
        (TypeError, "'max_q'", lambda: F.varlen_attention(t(9, 2, 8), t(9, 2, 8), t(9, 2, 8), _cu(), _cu(), -1, 5)),
    ]


def _cu():
    return torch.tensor([0, 4, 9], dtype=torch.int32)


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input(index):
    error, name, call = _bad_calls()[index]
    with pytest.raises(error, match=name):
        call()


def test_torch_raises_the_same_types():
    """The exception types above are torch's own for the same calls."""
    t = lambda *shape: make_tensor(shape)  # noqa: E731
    q, k, v = t(2, 2, 3, 4), t(2, 2, 5, 4), t(2, 2, 5, 6)
    for error, call in [
        (TypeError, lambda: torch_F.scaled_dot_product_attention([1.0], k, v)),
        (RuntimeError, lambda: torch_F.scaled_dot_product_attention(q, k.half(), v)),
        (RuntimeError, lambda: torch_F.scaled_dot_product_attention(q, t(3, 2, 5, 4), t(3, 2, 5, 6))),
        (RuntimeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 4) > 0)),
        (RuntimeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 5).int())),
        (IndexError, lambda: torch_F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5) > 0)),
        (RuntimeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 5) > 0,
                                                                    is_causal=True)),
        (RuntimeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, dropout_p=1.5)),
        (IndexError, lambda: torch_F.scaled_dot_product_attention(t(3, 4), t(5, 4), t(5, 6), enable_gqa=True)),
        (IndexError, lambda: torch_F.scaled_dot_product_attention(t(2, 3, 4), t(5, 4), t(5, 6), enable_gqa=True)),
        (TypeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, dropout_p=None)),
        (TypeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, is_causal="no")),
        (TypeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, enable_gqa=1)),
        (TypeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, scale="0.5")),
        (NotImplementedError, lambda: torch_F.scaled_dot_product_attention(
            *(x.to(torch.complex64) for x in (q, k, v)))),
        (TypeError, lambda: torch_F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.5)),
    ]:
        with pytest.raises(error):
            call()


@pytest.mark.parametrize("L,S", [(7, 33), (33, 7), (17, 17)])
def test_causal_bias_masks_as_torch(backend, L, S):
    """torch's causal_upper_left / causal_lower_right masks (CausalBias): the kernels' causal walk,
    aligned as torch aligns each (lower-right: the last query sees the last key; rows that see no
    key give 0); the result a plain tensor (it came back as a broken CausalBias)."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    if backend == "cuda" and L != S:
        pytest.skip("the CUDA kernels align top-left only")
    q = make_tensor((2, 3, L, 16), requires_grad=True)
    k, v = (make_tensor((2, 3, S, 16), requires_grad=True) for _ in range(2))
    for bias, shift in ((causal_upper_left(L, S), 0), (causal_lower_right(L, S), S - L)):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        assert type(out) is torch.Tensor
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        mask = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(shift)
        expected = torch_F.scaled_dot_product_attention(*leaves, attn_mask=mask).nan_to_num(0.0)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        for grad, want in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
            torch.testing.assert_close(grad.double(), want, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    # under torch.func torch serves it, given the mask the bias stands for
    if backend != "torch":
        return
    mask = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(S - L)
    got = torch.func.grad(lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S)).sum())
    want = torch.func.grad(lambda q: torch_F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0).sum())
    torch.testing.assert_close(got(q.detach()), want(q.detach()))


def _tile_period():
    """Every alignment of a causal diagonal against the key blocks repeats after this many keys: the
    interpreter's tiles, or on a GPU the largest tile any config uses."""
    if testing.default_device() == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return 128
    from bigkern.kernels import attention as kernels

    return math.lcm(*(tile[b] for tile in kernels._INTERPRETER_TILES.values() for b in ("BLOCK_M", "BLOCK_N")))


def test_bottom_right_causal_at_every_offset_of_the_diagonal_in_a_tile(backend):
    """causal_lower_right shifts the diagonal by S - L: each block bound of the causal walk (the last
    key block a query block sees, the first fully visible one, the dK/dV pass's diagonal block) is
    off by one only where S - L falls on particular residues of the tile (one in 16 missed them all).
    Every residue, with several query blocks, forward and every gradient; and rows that see no key."""
    from torch.nn.attention.bias import causal_lower_right

    if backend == "cuda":
        pytest.skip("the CUDA kernels align top-left only")
    period = _tile_period()
    L = period + 1  # two query blocks, the second partial
    shapes = [(L, L + d) for d in range(period)] + [(L, L - d) for d in (1, period // 2 - 1, period // 2 + 1)]
    for L, S in shapes:
        q = make_tensor((1, 2, L, 8), requires_grad=True)
        k, v = (make_tensor((1, 2, S, 8), requires_grad=True) for _ in range(2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S))
        grad_out = make_tensor(out.shape)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        mask = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(S - L)
        expected = torch_F.scaled_dot_product_attention(*leaves, attn_mask=mask).nan_to_num(0.0)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"L={L} S={S}: {m}")
        for name, grad, want in zip("qkv", grads, torch.autograd.grad(expected, leaves, grad_out.double())):
            torch.testing.assert_close(grad.double(), want, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"L={L} S={S} d{name}: {m}")


def test_numbers_and_meta_tensors_torch_accepts():
    """A numpy or 0-d tensor scale / dropout_p, as torch's argument parser takes them, and meta
    tensors (shape inference) give torch's results."""
    q, k, v = make_tensor((1, 2, 5, 8)), make_tensor((1, 2, 7, 8)), make_tensor((1, 2, 7, 4))
    expected = torch_F.scaled_dot_product_attention(q, k, v, scale=0.3)
    for scale, dropout_p in ((np.float32(0.3), 0.0), (torch.tensor(0.3), torch.tensor(0.0)), (0.3, np.float64(0))):
        got = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    meta = [t.to("meta") for t in (q, k, v)]
    assert F.scaled_dot_product_attention(*meta).shape == expected.shape
    mha = bigkern.nn.MultiheadAttention(8, 2, batch_first=True).to("meta")
    x = torch.empty((3, 5, 8), device="meta")
    assert mha(x, x, x, need_weights=False)[0].shape == (3, 5, 8)


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, and memory linear in sequence length.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_verification_cases(dtype):
    with bigkern.use_backend("triton"):
        for description, run in attention.verification_cases("cuda", dtype):
            for result in run():
                assert result.ok, f"{description}: {result}"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_sequence_64k_memory_is_linear(causal):
    """64k tokens, 8 heads, hd 64, bf16: the (L, S) matrix alone would be 64 GiB; forward and
    backward must stay within a few times the inputs' size."""
    L, heads, dim = 65536, 8, 64
    q, k, v = (torch.randn(1, heads, L, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    inputs_bytes = 3 * q.numel() * q.element_size()
    grad = torch.randn_like(q)
    with bigkern.use_backend("triton"):
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)  # autotuning: not measured
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 4 * inputs_bytes, f"peak {peak / 2**20:.0f} MiB for {inputs_bytes / 2**20:.0f} MiB of inputs"
    assert out.isfinite().all() and q.grad.isfinite().all()
    # spot-check one head's first rows against float64
    rows = 64
    ref = torch_F.scaled_dot_product_attention(
        q[:, :1, :rows].double(), k[:, :1].double(), v[:, :1].double(),
        attn_mask=torch.ones(rows, L, dtype=torch.bool, device="cuda").tril() if causal else None)
    torch.testing.assert_close(out[:, :1, :rows].double(), ref, atol=2e-2, rtol=2e-2)


def test_benchmark_suite_runs_end_to_end_on_cpu(tmp_path):
    """The harness and the attention cases, timed on the CPU (no real figures: it tests the suite)."""
    import json

    from bigkern import benchmark

    shapes = {"attention": {"sweep": [dict(batch=1, heads=2, seq=17, head_dim=16, causal=True, quick=True),
                                      dict(batch=1, heads=2, seq=4096, head_dim=16, causal=True)],
                            "decoding": [dict(batch=1, q_heads=4, kv_heads=2, q_len=1, kv_len=33, head_dim=16,
                                              quick=True)]}}
    shapes_path = tmp_path / "shapes.json"
    shapes_path.write_text(json.dumps(shapes))
    rc = benchmark.main(["--cpu", "--quick", "--family", "attention", "--shapes", str(shapes_path), "--results",
                         str(tmp_path / "results"), "--provider", "bigkern-triton", "bigkern-cuda", "torch-math"])
    assert rc == 0
    [path] = (tmp_path / "results").glob("*/*.json")
    rows = json.loads(path.read_text())["rows"]
    statuses = {(r["case"], r["mode"], r["provider"]): r["status"] for r in rows}
    # timed on the CPU (--cpu), where Triton runs only in the interpreter
    triton_status = "ok" if backend_skip_reason("triton", "cpu") is None else "unavailable"
    assert statuses[("hd16 seq17 causal", "forward+backward", "bigkern-triton")] == triton_status
    assert statuses[("decode B1 4/2 kv33", "forward", "torch-math")] == "ok"
    assert statuses[("hd16 seq17 causal", "forward", "bigkern-cuda")] == "unavailable"
    row = next(r for r in rows if r["provider"] == "bigkern-triton" and r["mode"] == "forward")
    # causal: row i sees i + 1 of the 17 keys, 153 scores of 289
    assert row["flops"] == 4 * 2 * 153 * 16 and (triton_status != "ok" or "torch-math" in row["speedup"])


_COMPILE_CHECK = """
from bigkern.codegen import compile_for_gpu, resource_usage
from bigkern.kernels import attention as kernels

types = {"Mask": "*fp32", "Lse": "*fp32", "Stats": "*fp32", "Delta": "*fp32", "GradLse": "*fp32", "GradMask": "*fp32",
         "CuSeqQ": "*i32", "CuSeqK": "*i32", "Part": "*fp32", "PartLse": "*fp32",
         "qk_scale": "fp32", "dropout_scale": "fp32", "sm_scale": "fp32", "dropout_threshold": "i64"}
meta = dict(HEAD_DIM=80, HEAD_DIM_V=80, BLOCK_D=128, BLOCK_DV=128, MASK_KIND=2, IS_CAUSAL=False, VARLEN=False,
            DROPOUT=True, PRECISION="tf32")
for kernel, tile, extra in ((kernels.attention_forward_kernel, (128, 64), {"SPLIT": False, "TMA": False}),
                            (kernels.attention_forward_kernel, (16, 128), {"SPLIT": True, "TMA": False}),
                            (kernels.attention_forward_kernel, (128, 64), {"SPLIT": False, "TMA": True}),
                            (kernels.attention_forward_kernel, (16, 128), {"SPLIT": True, "TMA": True}),
                            (kernels.attention_split_combine_kernel, (16, 0), {}),
                            (kernels.attention_backward_row_stats_kernel, (64, 64), {}),
                            (kernels.attention_backward_dkdv_kernel, (32, 128), {"TMA": False}),
                            (kernels.attention_backward_dq_kernel, (128, 32), {"MASK_GRAD": True, "TMA": False}),
                            (kernels.attention_backward_dkdv_kernel, (32, 128), {"TMA": True}),
                            (kernels.attention_backward_dq_kernel, (128, 32), {"MASK_GRAD": True, "TMA": True})):
    constexprs = {name: value for name, value in dict(meta, BLOCK_M=tile[0], BLOCK_N=tile[1], **extra).items()
                  if name in kernel.arg_names}
    walked = tile[0] if kernel is kernels.attention_backward_dkdv_kernel else tile[1]
    descriptor = f"tensordesc<bf16[1,1,{walked},{meta['BLOCK_D']}]>"
    descriptors = {name: descriptor for name in ("KDesc", "VDesc", "QDesc", "GradOutDesc")}
    kernel_types = dict(types, **descriptors) if extra.get("TMA") else types
    compiled = compile_for_gpu(kernel, constexprs, 90, types=kernel_types, is_pointer=lambda name: name[0].isupper(),
                               num_warps=8, num_stages=2)
    usage = resource_usage(compiled)
    assert 0 < usage["shared_bytes"] <= 227 * 1024, (kernel.__name__, usage)
    if "BLOCK_N" in constexprs and tile[0] >= 64:  # the matmuls run on Hopper's tensor cores
        assert usage["wgmma"] > 0, (kernel.__name__, usage)
    if extra.get("TMA"):  # the walked tiles come through the copy engine
        assert usage["tma"] > 0, (kernel.__name__, usage)
    print(kernel.__name__, extra, usage)
"""


# The first tile of each kernel at fp32 (what a launch with autotuning off runs, as the GPU test
# suite's) must fit the architecture's shared memory: compiled for sm_90 (227 KB) and sm_80 (163 KB).
_FP32_FIRST_TILES_FIT = """
from bigkern import codegen
from bigkern.kernels import attention as kernels

limits = {90: 227 * 1024, 80: 163 * 1024}
for arch, limit in limits.items():
    for launch in codegen.launches("attention", arch):
        if "TMA" in launch.name:  # 16-bit only
            continue
        tiles = {"forward": kernels.forward_tiles, "dK/dV": kernels.dkdv_tiles, "dQ": kernels.dq_tiles}
        pick = next(tiles[name] for name in tiles if name in launch.name)
        buckets = [1] if "decoding" in launch.name else [32, 4096] if "forward" in launch.name else [4096]
        firsts = {pick(dict(launch.constexprs, fp32=True, q_bucket=bucket), arch >= 90)[0] for bucket in buckets}
        for block_m, block_n, warps, stages in sorted(firsts):
            types = {k: ("*fp32" if v.startswith("*bf16") else v) for k, v in launch.types.items()}
            compiled = codegen.compile_for_gpu(launch.kernel, dict(launch.constexprs, BLOCK_M=block_m,
                                                                   BLOCK_N=block_n, PRECISION="ieee"),
                                               arch, types=types, pointer="*fp32", is_pointer=launch.is_pointer,
                                               aligned=launch.aligned, num_warps=warps, num_stages=stages)
            shared = compiled.metadata.shared
            assert shared <= limit, (arch, launch.name, (block_m, block_n, warps, stages), shared)
            print(arch, launch.name, (block_m, block_n), shared // 1024, "KB")
"""


@pytest.mark.skipif(GPU, reason="on a GPU every test compiles the kernels for real")
def test_fp32_first_tiles_fit_shared_memory():
    """With autotuning off (the GPU test suite) a launch runs its first tile: at fp32 that tile must
    fit (sm_90's first hd256 forward tile needed 288 KB, sm_80's hd256 dK/dV 164 KB: OutOfResources)."""
    _compile_in_a_subprocess(_FP32_FIRST_TILES_FIT, timeout=900)


def _compile_in_a_subprocess(script, timeout):
    """Run a script that compiles kernels with Triton's compiler (no GPU needed). In a subprocess:
    in this one, TRITON_INTERPRET made the kernels interpreter functions."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode and ("ASTSource" in result.stderr or "GPUTarget" in result.stderr):
        pytest.skip(f"this Triton's compiler API differs: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]


_ROWS_PAST_2_31 = """
import torch, bigkern
from bigkern.ops import attention
# q, k, v and dO rows 2^30 elements apart in one 4 GiB (virtual, barely touched) buffer: row 2 sits
# at 2^31, past int32 (an MHA view of (L, N, E) memory has row stride N * E: L 16k, N 32, E 4096)
buffer = torch.empty(2**31 + 4096, dtype=torch.float16)
q, k, v, grad_out = (buffer[64 * i:].as_strided((1, 1, 3, 16), (0, 0, 2**30, 1)) for i in range(4))
for t in (q, k, v, grad_out):
    t.copy_(torch.randn(1, 1, 3, 16) / 2)
dense = [t.contiguous() for t in (q, k, v, grad_out)]
with bigkern.use_backend("triton"):
    for causal in (0, 1):
        out, lse = attention.sdpa_forward_op(q, k, v, None, 0.0, causal, None, None)
        grads = attention.sdpa_backward_op(grad_out, None, q, k, v, None, out, lse, 0.0, causal, None, None, False)
        ref_out, ref_lse = attention.sdpa_forward_op(*dense[:3], None, 0.0, causal, None, None)
        ref_grads = attention.sdpa_backward_op(dense[3], None, *dense[:3], None, ref_out, ref_lse, 0.0, causal, None,
                                               None, False)
        torch.testing.assert_close(out, ref_out)
        for got, want in zip(grads[:3], ref_grads[:3]):
            torch.testing.assert_close(got, want)
print("ok")
"""


def test_dropout_inside_cuda_graph_capture(monkeypatch):
    """Inside CUDA graph capture bigkern's host-drawn dropout seed would be captured: every replay
    would drop the same elements. torch's own SDPA (graph-safe) serves it under auto; forced
    backends and varlen (torch has no varlen dropout) raise. Fake CUDA tensors stand in."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with FakeTensorMode():
        q = torch.empty(1, 2, 5, 8, device="cuda")
        packed = torch.empty(5, 2, 8, device="cuda")
        cu = torch.tensor([0, 5], dtype=torch.int32, device="cuda")
    for forced in ("triton", "cuda"):
        with bigkern.use_backend(forced), pytest.raises(bigkern.UnsupportedError, match="CUDA graph capture"):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    with bigkern.record() as calls:
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    assert calls == {("scaled_dot_product_attention", "torch"): 1} and out.shape == q.shape
    with pytest.raises(bigkern.UnsupportedError, match="CUDA graph capture"):
        F.varlen_attention(packed, packed, packed, cu, cu, 5, 5, dropout_p=0.1)


@pytest.mark.parametrize("causal", [1, 2])
def test_mask_gradient_is_zero_where_causal_hides_the_score(causal):
    """The ops take a float mask and a causal diagonal together (the public function refuses that
    pair, torch's contract; MHA-style callers of the ops need not): the mask's gradient is 0 where
    the diagonal hides a score (the kernels never visit those key blocks: they were left unwritten)."""
    reason = backend_skip_reason("triton")
    if reason:
        pytest.skip(reason)
    L, S = 5, 55
    q = make_tensor((1, 2, L, 16))
    k, v = (make_tensor((1, 2, S, 16)) for _ in range(2))
    mask = make_tensor((1, 2, L, S))
    with bigkern.use_backend("triton"):
        out, lse = attention.sdpa_forward_op(q, k, v, mask, 0.0, causal, None, None)
        grad_out = make_tensor(out.shape)
        grads = attention.sdpa_backward_op(grad_out, None, q, k, v, mask, out, lse, 0.0, causal, None, None, True)
    with bigkern.use_backend("torch"):
        expected = attention.sdpa_backward_op(grad_out, None, q, k, v, mask, out, lse, 0.0, causal, None, None, True)
    hidden = ~attention.causal_mask(L, S, causal, q.device)
    assert (grads[3][..., hidden] == 0).all()
    torch.testing.assert_close(grads[3], expected[3], atol=1e-5, rtol=1e-4)


def test_triton_refuses_more_heads_or_batch_than_a_grid_holds():
    """Heads and batch elements (sequences, packed) beyond CUDA's 65535 programs per grid dimension:
    forced Triton refuses with the reason (a GPU launch failed with 'invalid argument'), auto
    serves the call elsewhere."""
    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    many = dispatch.GRID_YZ_LIMIT + 1
    for shape in ((many, 1, 4), (many, 1, 1, 4), (1, many, 1, 4)):  # 3-d: (N, L, E) runs as (1, N, L, E)
        q = make_tensor(shape)
        with bigkern.use_backend("triton"), pytest.raises(bigkern.UnsupportedError, match="65535"):
            F.scaled_dot_product_attention(q, q, q)
        assert bigkern.explain(F.scaled_dot_product_attention, q, q, q).backend == "torch"
    packed = make_tensor((many, 1, 4))
    cu = torch.arange(many + 1, dtype=torch.int32, device=DEVICE)
    with bigkern.use_backend("triton"), pytest.raises(bigkern.UnsupportedError, match="65535"):
        F.varlen_attention(packed, packed, packed, cu, cu, 1, 1)
    q = make_tensor((dispatch.GRID_YZ_LIMIT, 1, 1, 4))
    with bigkern.use_backend("triton"):
        assert bigkern.explain(F.scaled_dot_product_attention, q, q, q).backend == "triton"


def test_triton_kernels_address_rows_past_2_31_elements():
    """Row offsets (row * row stride) in 64 bits: in int32 they wrapped past 2^31 elements and read
    (or wrote) 4 GiB before the tensor. In a subprocess: a wrapped read there ended the process."""
    import os
    import subprocess
    import sys

    reason = backend_skip_reason("triton")
    if reason or GPU:
        pytest.skip(reason or "the interpreter's case (a GPU run would need 4 GiB of real memory)")
    result = subprocess.run([sys.executable, "-c", _ROWS_PAST_2_31], env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-3000:])


@pytest.mark.skipif(GPU, reason="on a GPU every test compiles the kernels for real")
def test_kernels_compile_for_hopper():
    """The interpreter never runs Triton's compiler: compile each kernel for sm_90 (to PTX, then
    ptxas; no GPU needed) with every feature on, so a construct only the compiler rejects fails
    here."""
    _compile_in_a_subprocess(_COMPILE_CHECK, timeout=600)


def test_autocast_casts_like_torch():
    """Under torch.autocast the inputs run in the autocast dtype, as torch's SDPA would (CPU: bf16;
    the torch implementation serves CPU tensors under auto, so no bf16 tl.dot is involved)."""
    q, k, v = (make_tensor((1, 2, 7, 16)) for _ in range(3))
    mask = make_tensor((7, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.scaled_dot_product_attention(q, k, v, mask)
        expected = torch_F.scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_autocast_leaves_float64_alone():
    """torch's autocast never casts float64: float64 attention under CPU autocast stays float64
    (it was cast to bfloat16, losing precision silently; a float64 MultiheadAttention crashed)."""
    q, k, v = (make_tensor((1, 2, 7, 16), torch.float64) for _ in range(3))
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    mha = bigkern.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    reference = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    reference.load_state_dict(mha.state_dict())
    x = make_tensor((2, 7, 16), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        varlen = F.varlen_attention(*packed, cu, cu, 4, 4)
        mha_out, _ = mha(x, x, x, need_weights=False)
        expected_mha, _ = reference(x, x, x, need_weights=False)
    assert out.dtype == varlen.dtype == mha_out.dtype == torch.float64
    torch.testing.assert_close(out, torch_F.scaled_dot_product_attention(q, k, v, is_causal=True))
    expected_first = torch_F.scaled_dot_product_attention(*(t[:3].transpose(0, 1) for t in packed))
    torch.testing.assert_close(varlen[:3], expected_first.transpose(0, 1))
    torch.testing.assert_close(mha_out, expected_mha)


def test_outputs_in_the_layout_the_fakes_promise():
    """Every implementation returns out and gradients laid out as the fake implementations say
    (in_layout_of re-lays an implementation's contiguous result when it must)."""
    q, k, v, _ = attention.make_inputs(2, 3, 3, 7, 7, 16, 16, None, "fused_qkv", torch.float32, DEVICE)
    contiguous = torch.randn(2, 3, 7, 16)
    relaid = attention.in_layout_of(contiguous, q.detach())
    assert torch.equal(relaid, contiguous) and relaid.transpose(1, 2).is_contiguous()
    assert attention.in_layout_of(relaid, q.detach()) is relaid
    real = [t.detach() for t in (q, k, v)]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_q, fake_k, fake_v = (mode.from_tensor(t) for t in real)
        fake_out, _ = torch.ops.bigkern.sdpa_forward(fake_q, fake_k, fake_v, None, 0.0, False, 0.25, None)
    out, _ = torch.ops.bigkern.sdpa_forward(q, k, v, None, 0.0, False, 0.25, None)
    assert out.stride() == fake_out.stride()


# ---------------------------------------------------------------------------------------------
# Found by mutating the kernels: cases the tests above could not tell apart.

@pytest.mark.parametrize("seq_k", [6, 40])
@pytest.mark.parametrize("masked", [-1e4, -3e4, -1e5, -1e9, -1e30])
def test_large_finite_float_masks_in_fp32(seq_k, masked):
    """Rows a large finite mask value dominates: every key masked (torch averages the values), every
    other key masked, and large unequal values.
    - `(1 - mask) * -10000`-style values, added to base-2 scores (times log2 e), rounded at twice
      torch's step and failed FlashAttention's rule for 2 seeds in 5: the kernels keep masked
      scores in natural units until the row's max is subtracted.
    - masked_fill(-1e9)-style values put lse far from 0, which the backward handles by recomputing
      the row's statistics (ROW_STATS_RECOMPUTE_FROM): skipping that gave each key of a fully
      masked row p = 1 instead of 1/n, which only the lowest finite value's test had covered."""
    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    q = make_tensor((2, 2, 5, 16), torch.float32, DEVICE, requires_grad=True)
    k, v = (make_tensor((2, 2, seq_k, 16), torch.float32, DEVICE, requires_grad=True) for _ in range(2))
    mask = torch.zeros(2, 1, 5, seq_k, device=DEVICE)
    mask[:, :, 1] = masked
    mask[:, :, 2, ::2] = masked
    mask[:, :, 4] = masked + 3 * torch.randn(seq_k, device=DEVICE)
    mask.requires_grad_()
    with bigkern.use_backend("triton"):
        results = attention.compare_with_reference(q, k, v, mask)
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]


def test_fp32_attention_runs_ieee_dots_unless_tf32_is_allowed(monkeypatch):
    """The interpreter computes tl.dot in full precision whatever input_precision says, so a float32
    call launched with TF32 would pass every CPU comparison: check what the launches ask for."""
    if backend_skip_reason("triton"):
        pytest.skip(backend_skip_reason("triton"))
    from bigkern.kernels import attention as kernels

    asked = []
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda name, kernel, grid, args, meta: (
        asked.append(meta["PRECISION"]), launch(name, kernel, grid, args, meta))[1])
    q, k, v = (make_tensor((1, 1, 8, 16), torch.float32, DEVICE, requires_grad=True) for _ in range(3))
    with bigkern.use_backend("triton"):
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert asked and set(asked) == {"ieee"}, asked
