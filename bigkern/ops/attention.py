"""Scaled dot-product attention: torch's `scaled_dot_product_attention`, fused, in O(L + S) memory.

Registered ops (torch.library, with fake implementations and autograd):

    bigkern::sdpa_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed) -> (out, lse)
    bigkern::sdpa_backward(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal,
                           scale, seed, mask_grad) -> (grad_q, grad_k, grad_v, grad_mask)
    bigkern::varlen_attention_forward / _backward: the same for a packed batch of unequal sequences

each dispatching at run time to the Triton kernels (kernels/attention.py), the CUDA kernels
(bigkern/ops/attention_cuda.py, once built) or a pure-PyTorch implementation.

The kernel-level contract every implementation keeps:
  q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev): unit stride in the last dimension, any
  other strides (0 where broadcast); Hq % Hkv == 0 and query head h reads kv head h // (Hq // Hkv).
  attn_mask: None, or a (B, Hq, L, S) view, bool (True = attend) or float (added to the scores).
  is_causal: 0 none; 1 (CAUSAL_TOP_LEFT, torch's is_causal): query i sees keys j <= i, also when
  L != S; 2 (CAUSAL_BOTTOM_RIGHT: torch's causal_lower_right, varlen_attn's causal window): keys
  j <= i + S - L, the last query seeing the last key (rows i < L - S see none: output 0).
  out (B, Hq, L, Ev) in q's dtype, with q's order of dimensions in memory (a transposed view of a
  fused QKV projection gives an output laid out like it: the reshape after it is free).
  lse (B, Hq, L): natural-log logsumexp of the scaled, masked scores, float32 (float64 for float64
  inputs); +inf for a row whose every key is masked, whose output is 0 as in torch.
  dropout: `seed` is a CPU int64 tensor [seed_lo, seed_hi] (31 bits each) drawn from torch's
  default generator; `dropout_keep_mask` below gives the exact keep pattern of every implementation.

The Python entry point `scaled_dot_product_attention` validates like torch (torch's exception
types, naming the argument), broadcasts the batch dimensions of query, key, value and the mask
(stride 0, no copies), and folds them into the 4-D form above.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from bigkern import amp, dispatch, memory
from bigkern.ops.checks import as_int, as_real, check_like, check_tensor, type_name

# ---------------------------------------------------------------------------------------------
# Dropout: counter-based random numbers, identical in every implementation.

_M32 = 0xFFFFFFFF


def draw_dropout_seed() -> Tensor:
    """A fresh dropout seed from torch's default (CPU) generator: reproducible under
    torch.manual_seed, and no GPU synchronization to read it."""
    return torch.randint(0, 2**31, (2,), dtype=torch.int64)


def dropout_capture_reason(query, dropout_p) -> Optional[str]:
    """Why dropout cannot run here: inside CUDA graph capture the host-drawn seed is captured with
    the graph, and every replay would drop the same elements. None elsewhere."""
    if ((as_real(dropout_p) or 0.0) > 0.0 and isinstance(query, Tensor) and query.is_cuda
            and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()):
        return ("dropout inside CUDA graph capture: bigkern draws its dropout seed on the host, so every replay "
                "would drop the same elements")
    return None


def _mulhilo(a: Tensor, multiplier: int):
    """(high, low) 32-bit halves of a * multiplier for uint32 values held in int64 tensors, exactly
    (split in 16-bit halves so that no product leaves int64)."""
    low_part = a * (multiplier & 0xFFFF)
    high_part = a * (multiplier >> 16)
    return (high_part + (low_part >> 16)) >> 16, (low_part + ((high_part & 0xFFFF) << 16)) & _M32


def philox_word(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> Tensor:
    """The first word of Philox4x32-10, the same function as kernels/attention.py philox_word."""
    for _ in range(10):
        high0, low0 = _mulhilo(c0, 0xD2511F53)
        high2, low2 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = high2 ^ c1 ^ k0, low2, high0 ^ c3 ^ k1, low0
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0


def dropout_threshold(p: float) -> int:
    """Dropout keeps an element when its 32-bit random word is >= this: probability 1 - p."""
    return min(int(round(p * 2.0**32)), 2**32)


def dropout_keep_mask(seed: Tensor, batch: int, heads: int, seq_q: int, seq_k: int, p: float,
                      device=None, first_stream: int = 0) -> Tensor:
    """The (batch, heads, seq_q, seq_k) bool keep pattern the kernels draw for `seed`: Philox
    counter (key column, query row, first_stream + b * heads + h, 0)."""
    seed_lo, seed_hi = (int(s) for s in seed.tolist())
    rows = torch.arange(seq_q, dtype=torch.int64, device=device).view(1, 1, -1, 1)
    cols = torch.arange(seq_k, dtype=torch.int64, device=device).view(1, 1, 1, -1)
    streams = (first_stream + torch.arange(batch * heads, dtype=torch.int64, device=device)).view(batch, heads, 1, 1)
    shape = (batch, heads, seq_q, seq_k)
    word = philox_word(cols.expand(shape), rows.expand(shape), streams.expand(shape),
                       torch.zeros(shape, dtype=torch.int64, device=device), seed_lo, seed_hi)
    return word >= dropout_threshold(p)


def dropout_multiplier(keep: Tensor, p: float, dtype) -> Tensor:
    """keep / (1 - p) as a tensor (0 everywhere when p = 1, as torch's dropout gives)."""
    return keep.to(dtype) * (0.0 if p >= 1.0 else 1.0 / (1.0 - p))


# ---------------------------------------------------------------------------------------------
# The math, in torch ops: the "torch" implementation and the float64 reference of the tests.

def _expand_kv_heads(t: Tensor, heads: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, Hq, S, D) with query head h reading kv head h // (Hq // Hkv)."""
    kv_heads = t.shape[1]
    if kv_heads == heads:
        return t
    group = heads // kv_heads
    return t[:, :, None].expand(t.shape[0], kv_heads, group, *t.shape[2:]).reshape(t.shape[0], heads, *t.shape[2:])


def _sum_kv_heads(t: Tensor, kv_heads: int) -> Tensor:
    if t.shape[1] == kv_heads:
        return t
    return t.view(t.shape[0], kv_heads, t.shape[1] // kv_heads, *t.shape[2:]).sum(2)


CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 1, 2


def _masked_scores(q, k, attn_mask, is_causal, scale):
    """scale * q k^T + mask (B, Hq, L, S). Masks add (-inf for a False), so a NaN score stays NaN as
    in torch's math; the causal mask replaces, as torch's flash kernels do."""
    s = torch.matmul(q, _expand_kv_heads(k, q.shape[1]).transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s + torch.zeros((), dtype=s.dtype, device=s.device).masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~causal_mask(L, S, is_causal, s.device), float("-inf"))
    return s


def _causal_alignment(is_causal: bool, bottom_right: bool) -> int:
    """The ops' is_causal (the contract above) for a call's is_causal and alignment."""
    return (CAUSAL_BOTTOM_RIGHT if bottom_right else CAUSAL_TOP_LEFT) if is_causal else 0


def causal_mask(L, S, is_causal, device):
    """The (L, S) bool mask (True = attend) of a causal alignment (is_causal as in the contract)."""
    shift = S - L if is_causal == CAUSAL_BOTTOM_RIGHT else 0
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(shift)


def default_scale(scale: Optional[float], q: Tensor) -> float:
    """The softmax scale: `scale`, or torch's default 1/sqrt(E) (1 for E = 0, where every score is 0)."""
    if scale is not None:
        return scale
    E = q.shape[-1]
    return 1.0 / math.sqrt(E) if E else 1.0


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, keep=None, dropout_p=0.0):
    """(out, lse) of attention on normalized 4-D tensors, in their own dtype, differentiable.
    keep: the dropout keep pattern (B, Hq, L, S) or None. Rows with every key masked give 0 and
    lse +inf, exactly like the kernels (torch gives the same 0)."""
    scale = default_scale(scale, q)
    p, lse = _probabilities(_masked_scores(q, k, attn_mask, is_causal, scale))
    if keep is not None:
        p = p * dropout_multiplier(keep, dropout_p, p.dtype)
    out = torch.matmul(p, _expand_kv_heads(v, q.shape[1]))
    return out, lse


def _probabilities(s):
    """softmax(s) and logsumexp(s) along the keys, with every key masked giving p = 0 and lse = +inf.
    p is exp(s - max) / sum, not exp(s - lse): with scores near the float range's end (a finite
    mask of finfo.min on every key, as Hugging Face builds) lse = max + log(sum) rounds to max, and
    exp(s - lse) would weigh every key 1 instead of 1/n."""
    all_masked = (s == float("-inf")).all(-1, keepdim=True)
    # the shift cancels (softmax is shift-invariant): no gradient through it, which would only add
    # inf - inf at the argmax when a value is infinite
    top = torch.where(all_masked, 0.0, s.amax(-1, keepdim=True) if s.shape[-1] else s.sum(-1, keepdim=True)).detach()
    weights = torch.exp(s - top)  # s = -inf everywhere in a fully masked row: 0
    total = weights.sum(-1, keepdim=True)
    p = weights / torch.where(all_masked, 1.0, total)
    lse = torch.where(all_masked, float("inf"), top + torch.log(total))
    return p, lse.squeeze(-1)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_keep(seed, q, seq_k, dropout_p, first_stream=0):
    if seed is None or dropout_p <= 0:
        return None
    return dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], seq_k, dropout_p, q.device, first_stream)


def torch_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, first_stream=0):
    """The pure-PyTorch forward: the math above in fp32 (fp64 for fp64 inputs)."""
    c = _compute_dtype(q.dtype)
    keep = _torch_keep(seed, q, k.shape[2], dropout_p, first_stream)
    out, lse = reference_attention(q.to(c), k.to(c), v.to(c), attn_mask, is_causal, scale, keep, dropout_p)
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


def torch_backward(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, seed,
                   mask_grad, first_stream=0):
    """The pure-PyTorch backward, FlashAttention-2's formulas (p recomputed as softmax(s)):
    dV = (p Z)^T dO; dS = p (dO V^T Z - delta); dQ = scale dS K; dK = scale dS^T Q."""
    c = _compute_dtype(q.dtype)
    qc, kc, vc, go = q.to(c), k.to(c), v.to(c), grad_out.to(c)
    heads, kv_heads = q.shape[1], k.shape[1]
    p, _ = _probabilities(_masked_scores(qc, kc, attn_mask, is_causal, scale))  # recomputed: see _probabilities
    keep = _torch_keep(seed, q, k.shape[2], dropout_p, first_stream)
    z = dropout_multiplier(keep, dropout_p, c) if keep is not None else None
    grad_v = torch.matmul((p if z is None else p * z).transpose(-1, -2), go)
    dp = torch.matmul(go, _expand_kv_heads(vc, heads).transpose(-1, -2))
    if z is not None:
        dp = dp * z
    delta = (go * out.to(c)).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(c).unsqueeze(-1)
    ds = p * (dp - delta)
    grad_q = torch.matmul(ds, _expand_kv_heads(kc, heads)) * scale
    grad_k = torch.matmul(ds.transpose(-1, -2), qc) * scale
    grad_mask = ds.to(attn_mask.dtype) if mask_grad else q.new_empty((0,))
    return (grad_q.to(q.dtype), _sum_kv_heads(grad_k, kv_heads).to(k.dtype),
            _sum_kv_heads(grad_v, kv_heads).to(v.dtype), grad_mask)


# ---------------------------------------------------------------------------------------------
# Output layouts: an output keeps the order of dimensions its model input has in memory.

def _dim_order(shape, stride):
    """Dims 0..2 outermost first by stride (broadcast and size-1 dims outermost), then dim 3."""
    def key(d):
        return (-(stride[d] if stride[d] and shape[d] > 1 else math.inf), d)
    return sorted(range(len(shape) - 1), key=key) + [len(shape) - 1]


def empty_like_layout(like: Tensor, shape, dtype, allocate=memory.empty_strided):
    """A dense tensor of `shape` whose dimensions lie in memory in the order `like`'s do. Allocated
    with those strides, not permuted from a contiguous one: a view would be an output autograd
    forbids changing in place (torch's outputs may be)."""
    order = _dim_order(like.shape, like.stride())
    stride = dict(zip(order, memory.contiguous_strides([shape[d] for d in order])))
    return allocate(tuple(shape), tuple(stride[d] for d in range(len(shape))), dtype=dtype, device=like.device)


def _plain_empty(shape, stride, dtype, device):
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _fake_like_layout(like, shape, dtype):
    return empty_like_layout(like, shape, dtype, allocate=_plain_empty)


def in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """t itself if it lies in memory as empty_like_layout(like, ...) would, else such a copy: the
    layout every implementation returns (the fake implementations promise it to torch.compile)."""
    want = empty_like_layout(like, t.shape, t.dtype, allocate=lambda shape, stride, dtype, device:
                             torch.empty_strided(shape, stride, dtype=dtype, device="meta"))
    if all(size <= 1 or a == b for size, a, b in zip(t.shape, t.stride(), want.stride())):
        return t
    return empty_like_layout(like, t.shape, t.dtype).copy_(t)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Implementations and the reasons each cannot serve a call.

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _kernel_reason(q, k, v, attn_mask):
    if q.dtype not in KERNEL_DTYPES:
        return f"the kernels take float16, bfloat16 or float32, not {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM} (got {q.shape[-1]} and {v.shape[-1]})"
    return None


def _grid_reason(batch, heads):
    """The Triton kernels put the heads and the batch (a packed batch's sequences) along the grid's
    second and third dimensions."""
    return dispatch.grid_reason(heads, "heads") or dispatch.grid_reason(batch, "batch elements (or sequences)")


def _triton_forward_unsupported(q, k, v, attn_mask, *rest):
    return (dispatch.triton_unsupported(q, k, v, attn_mask) or dispatch.triton_dot_unsupported(q)
            or _kernel_reason(q, k, v, attn_mask) or _grid_reason(q.shape[0], q.shape[1]))


def _triton_backward_unsupported(grad_out, grad_lse, q, k, v, attn_mask, *rest):
    return (dispatch.triton_unsupported(grad_out, q, k, v, attn_mask) or dispatch.triton_dot_unsupported(q)
            or _kernel_reason(q, k, v, attn_mask) or _grid_reason(q.shape[0], q.shape[1]))


def _always(*args):
    return None


def _cuda_module():
    """(bigkern.ops.attention_cuda, None), or (None, why not): the CUDA kernels' Python side is
    written separately and may not be in this tree yet."""
    try:
        from bigkern.ops import attention_cuda
    except ImportError as error:
        return None, f"not built yet (bigkern.ops.attention_cuda: {error})"
    return attention_cuda, None


def _cuda_forward_unsupported(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    module, reason = _cuda_module()
    if module is None:
        return reason
    return (module.unsupported(q, k, v, attn_mask, dropout_p, is_causal, scale)  # device, dtype, shapes
            or _cuda_causal_reason(is_causal))


def _cuda_causal_reason(is_causal):
    if is_causal == CAUSAL_BOTTOM_RIGHT:
        return "the CUDA kernels align a causal mask top-left only (not causal_lower_right)"
    return None


def _cuda_backward_unsupported(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, seed,
                               mask_grad):
    module, reason = _cuda_module()
    if module is None:
        return reason
    if mask_grad:
        return "the CUDA kernels give no gradient for attn_mask"
    if grad_lse is not None:
        return "the CUDA kernels take no gradient through lse"
    return (module.unsupported(q, k, v, attn_mask, dropout_p, is_causal, scale, backward=True)
            or _cuda_causal_reason(is_causal))


def _dropout_arg(dropout_p, seed):
    if seed is None or dropout_p <= 0:
        return None
    seed_lo, seed_hi = (int(s) for s in seed.tolist())
    return (float(dropout_p), seed_lo, seed_hi)


def _allow_tf32():
    return amp.tf32_allowed("matmul")


SDPA_FORWARD = dispatch.Op("sdpa_forward")
SDPA_BACKWARD = dispatch.Op("sdpa_backward")


@SDPA_FORWARD.register("triton", _triton_forward_unsupported)
def _forward_triton(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    from bigkern.kernels import attention as kernels

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    B, H, L, _ = q.shape
    out = empty_like_layout(q, (B, H, L, v.shape[-1]), q.dtype)
    lse = memory.empty((B, H, L), dtype=torch.float32, device=q.device)
    kernels.attention_forward(q, k, v, attn_mask, out, lse, scale=scale, is_causal=is_causal,
                              dropout=_dropout_arg(dropout_p, seed), allow_tf32=_allow_tf32())
    return out, lse


@SDPA_FORWARD.register("cuda", _cuda_forward_unsupported, auto=False)
def _forward_cuda(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    module, _ = _cuda_module()
    out, lse = module.forward(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), is_causal, scale)
    out = in_layout_of(out, q)
    if k.shape[2] == 0:  # the only rows that see no key under the CUDA kernels' (mask-free) contract
        lse.fill_(float("inf"))  # bigkern._C stores -inf there; this op's lse says +inf
    return out, lse


@SDPA_FORWARD.register("torch", _always)
def _forward_torch(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    out, lse = torch_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed)
    return empty_like_layout(q, out.shape, out.dtype, allocate=_plain_empty).copy_(out), lse


def _backward_outputs(q, k, v, attn_mask, mask_grad, allocate=memory.empty_strided):
    grad_q = empty_like_layout(q, q.shape, q.dtype, allocate)
    grad_k = empty_like_layout(k, k.shape, k.dtype, allocate)
    grad_v = empty_like_layout(v, v.shape, v.dtype, allocate)
    if mask_grad:
        shape = tuple(attn_mask.shape)
        grad_mask = allocate(shape, memory.contiguous_strides(shape), dtype=attn_mask.dtype, device=q.device)
    else:
        grad_mask = allocate((0,), (1,), dtype=q.dtype, device=q.device)
    return grad_q, grad_k, grad_v, grad_mask


@SDPA_BACKWARD.register("triton", _triton_backward_unsupported)
def _backward_triton(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    from bigkern.kernels import attention as kernels

    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    # the kernels read lse, grad_lse and delta with one set of (contiguous) strides
    lse = lse.contiguous()
    grad_lse = grad_lse.contiguous() if grad_lse is not None else None
    grad_q, grad_k, grad_v, grad_mask = _backward_outputs(q, k, v, attn_mask, mask_grad)
    if mask_grad and is_causal:  # the kernels write only the key blocks a row block visits
        grad_mask.zero_()
    delta = memory.empty(lse.shape, dtype=torch.float32, device=q.device)
    kernels.attention_backward(grad_out, q, k, v, attn_mask, out, lse, grad_lse, delta, grad_q, grad_k, grad_v,
                               grad_mask if mask_grad else None, scale=scale, is_causal=is_causal,
                               dropout=_dropout_arg(dropout_p, seed), allow_tf32=_allow_tf32())
    return grad_q, grad_k, grad_v, grad_mask


@SDPA_BACKWARD.register("cuda", _cuda_backward_unsupported, auto=False)
def _backward_cuda(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    module, _ = _cuda_module()
    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    grad_q, grad_k, grad_v = module.backward(grad_out, q, k, v, out, lse, is_causal, scale)
    return (in_layout_of(grad_q, q), in_layout_of(grad_k, k), in_layout_of(grad_v, v),
            memory.empty((0,), dtype=q.dtype, device=q.device))


@SDPA_BACKWARD.register("torch", _always)
def _backward_torch(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    grads = torch_backward(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, seed,
                           mask_grad)
    layouts = _backward_outputs(q, k, v, attn_mask, mask_grad, _plain_empty)
    return tuple(layout.copy_(grad) for layout, grad in zip(layouts, grads))


# ---------------------------------------------------------------------------------------------
# Registered ops: what torch.compile, torch.export and autograd see.

@torch.library.custom_op("bigkern::sdpa_forward", mutates_args=())
def sdpa_forward_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                    is_causal: int, scale: Optional[float], seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return SDPA_FORWARD(q, k, v, attn_mask, dropout_p, is_causal, default_scale(scale, q), seed)


@sdpa_forward_op.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    B, H, L, _ = q.shape
    return (_fake_like_layout(q, (B, H, L, v.shape[-1]), q.dtype),
            q.new_empty((B, H, L), dtype=lse_dtype(q.dtype)))


@torch.library.custom_op("bigkern::sdpa_backward", mutates_args=())
def sdpa_backward_op(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                     attn_mask: Optional[Tensor], out: Tensor, lse: Tensor, dropout_p: float, is_causal: int,
                     scale: Optional[float], seed: Optional[Tensor],
                     mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return SDPA_BACKWARD(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal,
                         default_scale(scale, q), seed, mask_grad)


@sdpa_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    return _backward_outputs(q, k, v, attn_mask, mask_grad, _plain_empty)


def _sdpa_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
    ctx.args = (dropout_p, is_causal, scale)
    ctx.set_materialize_grads(False)


def _sdpa_backward(ctx, grad_out, grad_lse):
    q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale = ctx.args
    if dispatch.backward_is_differentiated():
        def forward(q, k, v, attn_mask):  # the same math (and dropout pattern) in torch's ops
            return torch_forward(q, k, v, attn_mask, dropout_p, is_causal, default_scale(scale, q), seed)

        grads = dispatch.gradients_by_torch("sdpa", forward, (q, k, v, attn_mask), (grad_out, grad_lse),
                                            ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None)
    mask_grad = bool(attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3])
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v, grad_mask = sdpa_backward_op(grad_out, grad_lse, q, k, v, attn_mask, out, lse,
                                                         dropout_p, is_causal, scale, seed, mask_grad)
    return grad_q, grad_k, grad_v, (grad_mask if mask_grad else None), None, None, None, None


sdpa_forward_op.register_autograd(_sdpa_backward, setup_context=_sdpa_setup_context)


# ---------------------------------------------------------------------------------------------
# The Python entry point: validates like torch, broadcasts, folds the batch dims, calls the op.

_NAME = "scaled_dot_product_attention()"


def _broadcast(shapes_by_name, what):
    try:
        return tuple(torch.broadcast_shapes(*shapes_by_name.values()))
    except RuntimeError:
        described = ", ".join(f"'{name}' {tuple(shape)}" for name, shape in shapes_by_name.items())
        raise RuntimeError(f"{_NAME}: the {what} of {described} do not broadcast together") from None


def _check_like_query(op_name, query, key, value):
    """key and value share query's dtype and device; query is floating point (torch: RuntimeError)."""
    for t, name in ((key, "key"), (value, "value")):
        check_like(t, name, query, "query", op_name)
    if query.is_complex():  # torch's kernels have no complex implementation: NotImplementedError
        raise NotImplementedError(f"{op_name}: argument 'query' is {query.dtype}: not implemented for complex tensors")
    if not query.is_floating_point():
        raise RuntimeError(f"{op_name}: expected argument 'query' to be a floating-point tensor, not {query.dtype}")


def check_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Raise what torch raises for bad input (its exception types), naming the argument."""
    for position, (t, name) in enumerate(((query, "query"), (key, "key"), (value, "value")), 1):
        check_tensor(t, name, _NAME, position=position)
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.dim() < 2:
            raise RuntimeError(f"{_NAME}: expected argument '{name}' to be at least 2-dimensional, "
                               f"but got a {t.dim()}-d tensor")
    _check_like_query(_NAME, query, key, value)
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"{_NAME}: argument 'key' must have the embedding size of 'query' "
                           f"({query.shape[-1]}) in its last dimension, but has {key.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"{_NAME}: argument 'value' must have the sequence length of 'key' "
                           f"({key.shape[-2]}) in dimension -2, but has {value.shape[-2]}")
    if enable_gqa:
        if query.dim() < 3:
            raise IndexError(f"{_NAME}: enable_gqa=True needs a heads dimension (-3) in 'query', "
                             f"which is {query.dim()}-dimensional")
        for t, name in ((key, "key"), (value, "value")):
            if t.dim() < 3:
                raise IndexError(f"{_NAME}: enable_gqa=True needs a heads dimension (-3) in '{name}', "
                                 f"which is {t.dim()}-dimensional")
            if t.shape[-3] == 0 or query.shape[-3] % t.shape[-3]:
                heads = t.shape[-3]
                raise RuntimeError(f"{_NAME}: the number of heads in '{name}' ({heads}) must divide the number of "
                                   f"heads in 'query' ({query.shape[-3]}) with enable_gqa=True")
    if attn_mask is not None:
        check_tensor(attn_mask, "attn_mask", _NAME)
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, query.dtype):
            raise RuntimeError(f"{_NAME}: expected argument 'attn_mask' to be bool, float32 or the dtype of 'query' "
                               f"({query.dtype}), but got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise RuntimeError(f"{_NAME}: expected argument 'attn_mask' on the device of 'query' ({query.device}), "
                               f"but it is on {attn_mask.device}")
        if attn_mask.dim() < 2:
            raise IndexError(f"{_NAME}: argument 'attn_mask' must have at least 2 dimensions (L, S), "
                             f"but has {attn_mask.dim()}")
        if is_causal:
            raise RuntimeError(f"{_NAME}: explicit 'attn_mask' should not be set when is_causal=True")
    _check_flags(_NAME, is_causal=is_causal, enable_gqa=enable_gqa)
    dropout_p = _real(dropout_p, "dropout_p")
    if scale is not None:
        _real(scale, "scale")
    if not 0.0 <= dropout_p <= 1.0:
        # torch's wording. torch itself is of two minds about dropout_p < 0: its math path ignores it,
        # its CPU flash path raises RuntimeError; never a silent answer here
        raise RuntimeError(f"{_NAME}: argument 'dropout_p': dropout probability has to be between 0 and 1, "
                           f"but got {dropout_p}")


def _real(value, name, op=_NAME) -> float:
    if as_real(value) is None:
        raise TypeError(f"{op}: argument '{name}' must be float, not {type_name(value)}")
    return as_real(value)


def _check_flags(op, **flags):
    for name, flag in flags.items():
        if not isinstance(flag, bool):  # torch's argument parser: a bool, not anything truthy
            raise TypeError(f"{op}: argument '{name}' must be bool, not {type_name(flag)}")


def _lcm(a, b):
    return a * b // math.gcd(a, b)


def _torch_lifts_3d_inputs() -> bool:
    """Whether this torch's scaled_dot_product_attention takes 3-d inputs as (1, N, L, E), so that a
    (1, N, L, S) mask fits them (2.14 does; 2.11 refuses): asked once, of a tiny CPU call."""
    t = torch.zeros(1, 1, 1)
    try:
        _TORCH_SDPA(t, t, t, attn_mask=torch.zeros(1, 1, 1, 1))
        return True
    except RuntimeError:
        return False


def prepare_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                 seed=None, bottom_right=False):
    """Validate and normalize a call: (op arguments, (batch shape, L, Ev)) with the op arguments
    (q, k, v, attn_mask, dropout_p, is_causal, scale, seed) in the 4-D form of the contract.
    `seed`: the dropout seed to use (drawn from torch's generator when None and dropout_p > 0)."""
    check_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    gqa = enable_gqa and (key.shape[-3] != query.shape[-3] or value.shape[-3] != query.shape[-3])
    if gqa:
        kv_heads = _lcm(key.shape[-3], value.shape[-3])
        if key.shape[-3] != kv_heads:
            key = key.repeat_interleave(kv_heads // key.shape[-3], -3)
        if value.shape[-3] != kv_heads:
            value = value.repeat_interleave(kv_heads // value.shape[-3], -3)
        outer = _broadcast({"query": query.shape[:-3], "key": key.shape[:-3], "value": value.shape[:-3]},
                           "batch dimensions")
        batch_shape = outer + (query.shape[-3],)
        kv_batch = outer + (kv_heads,)
    else:
        batch_shape = _broadcast({"query": query.shape[:-2], "key": key.shape[:-2], "value": value.shape[:-2]},
                                 "batch dimensions")
        kv_batch = batch_shape
    heads = batch_shape[-1] if batch_shape else 1
    batch = math.prod(batch_shape[:-1]) if batch_shape else 1
    kv_heads = kv_batch[-1] if kv_batch else 1
    q = query.expand(batch_shape + (L, E)).reshape(batch, heads, L, E)
    k = key.expand(kv_batch + (S, E)).reshape(batch, kv_heads, S, E)
    v = value.expand(kv_batch + (S, Ev)).reshape(batch, kv_heads, S, Ev)
    mask = None
    if attn_mask is not None:
        if len(batch_shape) == 1 and attn_mask.dim() == 4 and attn_mask.shape[0] == 1 and _TORCH_LIFTS_3D_INPUTS:
            attn_mask = attn_mask[0]  # torch takes 3-d inputs as (1, N, L, E): a mask may say so
        try:
            if attn_mask.dim() > len(batch_shape) + 2:
                raise RuntimeError
            mask = attn_mask.expand(batch_shape + (L, S))
        except RuntimeError:
            raise RuntimeError(f"{_NAME}: argument 'attn_mask' of shape {tuple(attn_mask.shape)} does not broadcast "
                               f"to the attention weights' shape {batch_shape + (L, S)}") from None
        mask = mask.reshape(batch, heads, L, S)
    scale = float(scale) if scale is not None else None  # None: the op takes 1/sqrt(E) (E may be symbolic)
    dropout_p = float(dropout_p)
    if dropout_p > 0 and seed is None:
        seed = draw_dropout_seed()
    if dropout_p <= 0:
        seed = None
    return (q, k, v, mask, dropout_p, _causal_alignment(is_causal, bottom_right), scale, seed), (batch_shape, L, Ev)


# torch's own function (F.scaled_dot_product_attention is this binding), which bigkern.enable()
# leaves in place: F.scaled_dot_product_attention is bigkern's inside its block
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
_TORCH_LIFTS_3D_INPUTS = _torch_lifts_3d_inputs()


try:
    from torch.nn.attention.bias import CausalBias as _CausalBias, CausalVariant as _CausalVariant
except ImportError:  # an older torch
    _CausalBias = _CausalVariant = None


def _causal_bias(attn_mask, is_causal):
    """torch's CausalBias masks (torch.nn.attention.bias.causal_upper_left / causal_lower_right) as
    (None, is_causal=True, bottom_right), chosen as torch chooses: lower-right only where the
    bias's lengths differ. Any other mask: (attn_mask, is_causal, False)."""
    if _CausalBias is None or not isinstance(attn_mask, _CausalBias):
        return attn_mask, is_causal, False
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")  # torch's error
    lower_right = attn_mask.variant == _CausalVariant.LOWER_RIGHT and attn_mask.seq_len_q != attn_mask.seq_len_kv
    return None, True, lower_right


def _nested_reason(*tensors):
    if any(isinstance(t, Tensor) and t.is_nested for t in tensors):
        return "NestedTensor inputs (jagged batches) are served by torch's own scaled_dot_product_attention"
    return None


@dispatch.entry_point
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, fused: same signature, same results.

    query (..., L, E), key (..., S, E), value (..., S, Ev); batch dims broadcast; masks bool
    (True = attend) or float (added), broadcastable to (..., L, S); is_causal as torch aligns it
    (query i sees keys j <= i); enable_gqa: key/value heads (dim -3) may divide the query's.
    Dropout draws its seed from torch's default generator (torch.manual_seed reproduces it).
    Memory O(L + S) per head: the (L, S) matrix is never stored (except a float mask's gradient).
    Under torch.autocast, floating inputs (a float mask too) are cast as torch casts them.
    attn_mask may be torch's causal_upper_left / causal_lower_right (no (L, S) matrix either).
    """
    attn_mask, is_causal, bottom_right = _causal_bias(attn_mask, is_causal)
    reason = (dispatch.autodiff_transform_reason(query, key, value, attn_mask) or _nested_reason(query, key, value)
              or dropout_capture_reason(query, dropout_p))  # torch's own dropout is graph-safe
    if reason is not None:
        if bottom_right:  # torch's own function takes it as the mask it stands for
            attn_mask, is_causal = causal_mask(query.shape[-2], key.shape[-2], CAUSAL_BOTTOM_RIGHT, query.device), False
        return dispatch.served_by_torch("scaled_dot_product_attention", reason, _TORCH_SDPA, query, key, value,
                                        attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    query, key, value, attn_mask = amp.cast_inputs(query, key, value, attn_mask)
    args, (batch_shape, L, Ev) = prepare_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                              bottom_right=bottom_right)
    out, _ = sdpa_forward_op(*args)
    return out.reshape(batch_shape + (L, Ev))


# ---------------------------------------------------------------------------------------------
# Variable-length batches: sequences packed along the first dimension, delimited by cu_seqlens.
#   q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev), cu_seq_q / cu_seq_k (N + 1,) cumulative lengths
#   -> out (Tq, Hq, Ev), lse (Hq, Tq). Each sequence attends only to its own keys, as one
#   scaled_dot_product_attention call per sequence would (is_causal aligned top-left per sequence).

VARLEN_FORWARD = dispatch.Op("varlen_attention_forward")
VARLEN_BACKWARD = dispatch.Op("varlen_attention_backward")


def _as_4d(t: Tensor) -> Tensor:
    """(T, H, D) -> the (1, H, T, D) view the kernels walk."""
    return t.unsqueeze(0).transpose(1, 2)


def _varlen_triton_unsupported(q, k, v, cu_seq_q, *rest):
    return (dispatch.triton_unsupported(q, k, v) or dispatch.triton_dot_unsupported(q) or _kernel_reason(q, k, v, None)
            or _grid_reason(cu_seq_q.numel() - 1, q.shape[1]))


def _varlen_backward_triton_unsupported(grad_out, grad_lse, q, k, v, out, lse, cu_seq_q, *rest):
    return (dispatch.triton_unsupported(grad_out, q, k, v) or dispatch.triton_dot_unsupported(q)
            or _kernel_reason(q, k, v, None) or _grid_reason(cu_seq_q.numel() - 1, q.shape[1]))


def _cu32(cu, device):
    """cu_seqlens as the kernels read them: int32, one entry after another (a strided view read as
    contiguous gave other sequences' lengths)."""
    return cu.to(device=device, dtype=torch.int32).contiguous()


@VARLEN_FORWARD.register("triton", _varlen_triton_unsupported)
def _varlen_forward_triton(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, scale, seed):
    from bigkern.kernels import attention as kernels

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    out = memory.empty((q.shape[0], q.shape[1], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = memory.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    kernels.attention_forward(_as_4d(q), _as_4d(k), _as_4d(v), None, _as_4d(out), lse.unsqueeze(0), scale=scale,
                              is_causal=is_causal, dropout=_dropout_arg(dropout_p, seed), allow_tf32=_allow_tf32(),
                              cu_seqlens_q=_cu32(cu_seq_q, q.device), cu_seqlens_k=_cu32(cu_seq_k, q.device),
                              max_seqlen_q=max_q, max_seqlen_k=max_k)
    return out, lse


def _sequences(cu_seq_q, cu_seq_k):
    bounds_q, bounds_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    return list(zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]))


@VARLEN_FORWARD.register("torch", _always)
def _varlen_forward_torch(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, scale, seed):
    """One torch_forward per sequence, concatenated (differentiable: varlen_attention's path under
    forward-mode AD and torch.func too). The lengths are checked: the sequences tile q."""
    outs = [q.new_empty((0, q.shape[1], v.shape[-1]))]
    lses = [torch.empty((q.shape[1], 0), dtype=lse_dtype(q.dtype), device=q.device)]
    for b, (q0, q1, k0, k1) in enumerate(_sequences(cu_seq_q, cu_seq_k)):
        o, l_ = torch_forward(_as_4d(q[q0:q1]), _as_4d(k[k0:k1]), _as_4d(v[k0:k1]), None, dropout_p, is_causal,
                              scale, seed, first_stream=b * q.shape[1])
        outs.append(o[0].transpose(0, 1))
        lses.append(l_[0])
    return torch.cat(outs), torch.cat(lses, 1)


@VARLEN_BACKWARD.register("triton", _varlen_backward_triton_unsupported)
def _varlen_backward_triton(grad_out, grad_lse, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p,
                            is_causal, scale, seed):
    from bigkern.kernels import attention as kernels

    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    lse = lse.contiguous()
    grad_q, grad_k, grad_v = (memory.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    delta = memory.empty(lse.shape, dtype=torch.float32, device=q.device)
    kernels.attention_backward(
        _as_4d(grad_out), _as_4d(q), _as_4d(k), _as_4d(v), None, _as_4d(out), lse.unsqueeze(0),
        None if grad_lse is None else grad_lse.contiguous().unsqueeze(0), delta.unsqueeze(0),
        _as_4d(grad_q), _as_4d(grad_k), _as_4d(grad_v), None, scale=scale, is_causal=is_causal,
        dropout=_dropout_arg(dropout_p, seed), allow_tf32=_allow_tf32(), cu_seqlens_q=_cu32(cu_seq_q, q.device),
        cu_seqlens_k=_cu32(cu_seq_k, q.device), max_seqlen_q=max_q, max_seqlen_k=max_k)
    return grad_q, grad_k, grad_v


@VARLEN_BACKWARD.register("torch", _always)
def _varlen_backward_torch(grad_out, grad_lse, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p,
                           is_causal, scale, seed):
    grad_q, grad_k, grad_v = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    for b, (q0, q1, k0, k1) in enumerate(_sequences(cu_seq_q, cu_seq_k)):
        gl = None if grad_lse is None else grad_lse[:, q0:q1].unsqueeze(0)
        dq, dk, dv, _ = torch_backward(_as_4d(grad_out[q0:q1]), gl, _as_4d(q[q0:q1]), _as_4d(k[k0:k1]),
                                       _as_4d(v[k0:k1]), None, _as_4d(out[q0:q1]), lse[:, q0:q1].unsqueeze(0),
                                       dropout_p, is_causal, scale, seed, False, first_stream=b * q.shape[1])
        grad_q[q0:q1] = dq[0].transpose(0, 1)
        grad_k[k0:k1] = dk[0].transpose(0, 1)
        grad_v[k0:k1] = dv[0].transpose(0, 1)
    return grad_q, grad_k, grad_v


def _checked_on_host(t: Tensor) -> bool:
    return t.device.type == "cpu"


def check_cumulative_lengths(cu_seq: Tensor, total: int, longest: int, name: str, longest_name: str):
    """cu_seq must start at 0, never decrease, end at `total` tokens, and hold no sequence longer than
    `longest`: else the kernels would read past the packed tensors or leave rows unwritten. Checked
    at once (RuntimeError naming the argument) on the CPU; on a GPU as torch checks indices there,
    with an asynchronous device-side assert (no host sync, so it also runs in CUDA graphs)."""
    if _checked_on_host(cu_seq):
        bounds = cu_seq.tolist()
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        problem = None
        if bounds[0] != 0:
            problem = f"starts at {bounds[0]}, not 0"
        elif any(length < 0 for length in lengths):
            problem = f"decreases (sequence {next(i for i, n in enumerate(lengths) if n < 0)})"
        elif bounds[-1] != total:
            problem = f"ends at {bounds[-1]} where the packed tensor has {total} tokens"
        elif lengths and max(lengths) > longest:
            problem = f"has a sequence of {max(lengths)} tokens, longer than {longest_name}={longest}"
        if problem is not None:
            raise RuntimeError(f"{_VARLEN}: argument '{name}' must hold cumulative sequence lengths, but it {problem}")
        return
    lengths = cu_seq[1:] - cu_seq[:-1]
    valid = (cu_seq[0] == 0) & (cu_seq[-1] == total)
    if lengths.numel():
        valid = valid & (lengths.min() >= 0) & (lengths.max() <= longest)
    torch._assert_async(valid, f"{_VARLEN}: argument '{name}' must hold cumulative sequence lengths: start at 0, "
                               f"never decrease, end at {total}, no step above {longest_name}={longest}")


def _check_varlen_lengths(q, k, cu_seq_q, cu_seq_k, max_q, max_k):
    check_cumulative_lengths(cu_seq_q, q.shape[0], max_q, "cu_seq_q", "max_q")
    if not (cu_seq_k is cu_seq_q and k.shape[0] == q.shape[0] and max_k == max_q):  # self-attention: checked
        check_cumulative_lengths(cu_seq_k, k.shape[0], max_k, "cu_seq_k", "max_k")


@torch.library.custom_op("bigkern::varlen_attention_forward", mutates_args=())
def varlen_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int,
                      dropout_p: float, is_causal: int, scale: Optional[float],
                      seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check_varlen_lengths(q, k, cu_seq_q, cu_seq_k, max_q, max_k)
    return VARLEN_FORWARD(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, default_scale(scale, q),
                          seed)


@varlen_forward_op.register_fake
def _(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, scale, seed):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[-1])),
            q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype)))


@torch.library.custom_op("bigkern::varlen_attention_backward", mutates_args=())
def varlen_backward_op(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                       lse: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int, dropout_p: float,
                       is_causal: int, scale: Optional[float],
                       seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    _check_varlen_lengths(q, k, cu_seq_q, cu_seq_k, max_q, max_k)
    return VARLEN_BACKWARD(grad_out, grad_lse, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p,
                           is_causal, default_scale(scale, q), seed)


@varlen_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, scale, seed):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seq_q, cu_seq_k, seed)
    ctx.args = (max_q, max_k, dropout_p, is_causal, scale)
    ctx.set_materialize_grads(False)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seq_q, cu_seq_k, seed = ctx.saved_tensors
    max_q, max_k, dropout_p, is_causal, scale = ctx.args
    if dispatch.backward_is_differentiated():
        def forward(q, k, v):
            return _varlen_forward_torch(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal,
                                         default_scale(scale, q), seed)

        grads = dispatch.gradients_by_torch("varlen_attention", forward, (q, k, v), (grad_out, grad_lse),
                                            ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None, None, None)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = varlen_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q,
                                                max_k, dropout_p, is_causal, scale, seed)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None


varlen_forward_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)

_VARLEN = "varlen_attention()"


def check_varlen_args(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, enable_gqa,
                      is_causal=False, scale=None):
    _check_flags(_VARLEN, is_causal=is_causal, enable_gqa=enable_gqa)
    dropout_p = _real(dropout_p, "dropout_p", _VARLEN)
    if scale is not None:
        _real(scale, "scale", _VARLEN)
    for position, (t, name) in enumerate(((query, "query"), (key, "key"), (value, "value"),
                                          (cu_seq_q, "cu_seq_q"), (cu_seq_k, "cu_seq_k")), 1):
        check_tensor(t, name, _VARLEN, position=position)
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.dim() != 3:
            raise RuntimeError(f"{_VARLEN}: expected argument '{name}' to be 3-dimensional (total tokens, heads, "
                               f"head dim), but got a {t.dim()}-d tensor")
    _check_like_query(_VARLEN, query, key, value)
    if key.shape[2] != query.shape[2]:
        raise RuntimeError(f"{_VARLEN}: argument 'key' must have the head dim of 'query' ({query.shape[2]}), "
                           f"but has {key.shape[2]}")
    if value.shape[:2] != key.shape[:2]:
        raise RuntimeError(f"{_VARLEN}: argument 'value' must have the tokens and heads of 'key' "
                           f"{tuple(key.shape[:2])}, but has {tuple(value.shape[:2])}")
    if key.shape[1] != query.shape[1] and not (enable_gqa and key.shape[1] and query.shape[1] % key.shape[1] == 0):
        raise RuntimeError(f"{_VARLEN}: argument 'key' has {key.shape[1]} heads and 'query' {query.shape[1]}: "
                           f"they must be equal, or divide them with enable_gqa=True")
    for t, name in ((cu_seq_q, "cu_seq_q"), (cu_seq_k, "cu_seq_k")):
        if t.dim() != 1 or t.numel() < 1 or t.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"{_VARLEN}: argument '{name}' must be a 1-d int32 or int64 tensor of N + 1 cumulative "
                               f"sequence lengths, but got shape {tuple(t.shape)} and dtype {t.dtype}")
        if t.device != query.device:
            raise RuntimeError(f"{_VARLEN}: expected argument '{name}' on the device of 'query' ({query.device}), "
                               f"but it is on {t.device}")
    if cu_seq_q.numel() != cu_seq_k.numel():
        raise RuntimeError(f"{_VARLEN}: arguments 'cu_seq_q' and 'cu_seq_k' must describe the same number of "
                           f"sequences, but have {cu_seq_q.numel()} and {cu_seq_k.numel()} entries")
    for value_, name in ((max_q, "max_q"), (max_k, "max_k")):
        if as_int(value_) is None or as_int(value_) < 0:  # (numpy and 0-d tensor integers as torch takes them)
            raise TypeError(f"{_VARLEN}: argument '{name}' must be a non-negative int, not {value_!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"{_VARLEN}: argument 'dropout_p': dropout probability has to be between 0 and 1, "
                           f"but got {dropout_p}")


def prepare_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False, bottom_right=False):
    check_varlen_args(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, enable_gqa, is_causal, scale)
    scale = float(scale) if scale is not None else None  # None: the op takes 1/sqrt(E)
    dropout_p = float(dropout_p)
    seed = draw_dropout_seed() if dropout_p > 0 else None
    return (query, key, value, cu_seq_q, cu_seq_k, int(max_q), int(max_k), dropout_p,
            _causal_alignment(is_causal, bottom_right), scale, seed)


@dispatch.entry_point
def varlen_attention(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int,
                     max_k: int, *, dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                     enable_gqa: bool = False, return_lse: bool = False):
    """Attention over a packed batch of unequal sequences, without padding (forward and backward).

    query (Tq, Hq, E), key (Tk, Hkv, E), value (Tk, Hkv, Ev); cu_seq_q / cu_seq_k (N + 1,) int32
    cumulative lengths (cu[0] = 0, cu[N] = total tokens); max_q / max_k the longest sequences.
    Sequence b's queries attend to sequence b's keys only, exactly as a scaled_dot_product_attention
    call per sequence would (is_causal top-left aligned within each sequence). Returns out
    (Tq, Hq, Ev), and lse (Hq, Tq) float32 too with return_lse=True (differentiable). Lengths that
    are not that (not from 0, decreasing, not ending at T, a sequence longer than max_q / max_k)
    raise RuntimeError on the CPU and trip a device-side assert on a GPU (check_cumulative_lengths).
    """
    return _varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p=dropout_p,
                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse)


def _varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, dropout_p, is_causal, scale,
                      enable_gqa, return_lse, bottom_right=False):
    """varlen_attention; bottom_right: a causal diagonal aligned to each sequence's last key."""
    reason = dropout_capture_reason(query, dropout_p)
    if reason is not None:  # (torch has no varlen dropout of its own to leave it to)
        raise dispatch.UnsupportedError(f"varlen_attention: {reason}")
    query, key, value = amp.cast_inputs(query, key, value)
    args = prepare_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, bottom_right=bottom_right)
    reason = dispatch.autodiff_transform_reason(query, key, value)
    if reason is None:
        out, lse = varlen_forward_op(*args)
    else:
        _check_varlen_lengths(*args[:2], *args[3:7])
        out, lse = dispatch.served_by_torch("varlen_attention", reason, _varlen_forward_torch, *args)
    return (out, lse) if return_lse else out


def _find_torch_varlen(name):
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    return getattr(varlen, name, None)


# torch's own functions (varlen_attn from torch 2.11, varlen_attn_out from 2.14; None before),
# taken when bigkern is imported, before bigkern.enable() can put bigkern's in their place
_TORCH_VARLEN_ATTN = _find_torch_varlen("varlen_attn")
_TORCH_VARLEN_ATTN_OUT = _find_torch_varlen("varlen_attn_out")


def _varlen_attn_unsupported(cu_seq_q, cu_seq_k, window_size, seqused_k, block_table):
    """Why bigkern's kernels cannot compute a varlen_attn call as torch defines it, or None."""
    if cu_seq_k is None or seqused_k is not None or block_table is not None:
        return "varlen_attn with a paged or partly used KV cache (cu_seq_k=None, seqused_k, block_table)"
    if window_size not in ((-1, -1), (-1, 0)):
        return f"varlen_attn with a sliding window (window_size={window_size})"
    return None


def _check_varlen_attn_types(op, **arguments):
    """torch's varlen_attn passes these through its custom op's schema, whose parser raises
    RuntimeError for a value of another type (a float window end was silently truncated here)."""
    def is_int(value):  # (a bool is an int there)
        return isinstance(value, int) or as_int(value) is not None

    expected = {  # name: (the schema's type, whether a value is one; None passes where Optional)
        "cu_seq_q": ("Tensor", lambda value: isinstance(value, Tensor)),
        "cu_seq_k": ("Optional[Tensor]", lambda value: isinstance(value, Tensor)),
        "max_q": ("int", is_int), "max_k": ("int", is_int),
        "scale": ("Optional[float]", lambda value: as_real(value) is not None),
        "window_size": ("List[int]", lambda value: isinstance(value, (tuple, list)) and all(map(is_int, value))),
        "num_splits": ("Optional[int]", is_int),
    }
    for name, value_ in arguments.items():
        kind, is_kind = expected[name]
        if not (value_ is None and kind.startswith("Optional")) and not is_kind(value_):
            raise RuntimeError(f"{op}: expected a value of type '{kind}' for argument '{name}' but instead found "
                               f"type '{type(value_).__name__}'")


def _varlen_attn(torch_fn, out, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux, scale, window_size,
                 enable_gqa, seqused_k, block_table, num_splits):
    """varlen_attn (out None) and varlen_attn_out (out given): torch's checks, then bigkern's
    kernels, or `torch_fn` (torch's own function) for what they do not compute."""
    num_heads_q = query.size(1)
    num_heads_k = key.size(2) if block_table is not None else key.size(1)
    # torch's checks and messages
    if not enable_gqa and num_heads_q != num_heads_k:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={num_heads_q} "
                         f"and Hkv={num_heads_k}. Try setting enable_gqa=True for GQA.")
    if enable_gqa and num_heads_k == 0:  # torch's own check divides by it
        raise ZeroDivisionError(f"varlen_attn: enable_gqa=True with 0 heads in argument 'key' (Hq={num_heads_q})")
    if enable_gqa and num_heads_q % num_heads_k != 0:
        raise ValueError(f"Expect number of query heads to be a multiple of kv heads for GQA but got "
                         f"Hq={num_heads_q} and Hkv={num_heads_k}.")
    # then, as torch, its op's schema checks the types, and the op the window's length
    _check_varlen_attn_types("varlen_attn()" if out is None else "varlen_attn_out()", cu_seq_q=cu_seq_q,
                             cu_seq_k=cu_seq_k, max_q=max_q, max_k=max_k, scale=scale, window_size=window_size,
                             num_splits=num_splits)
    enable_gqa = bool(enable_gqa)  # torch's takes any truthy value
    max_q, max_k = (int(m) if isinstance(m, bool) else m for m in (max_q, max_k))  # its schema's ints take bools
    if len(window_size) != 2:
        raise ValueError(f"window_size must have length 2, got {len(window_size)}")
    window_size = tuple(int(w) for w in window_size)
    reason = _varlen_attn_unsupported(cu_seq_q, cu_seq_k, window_size, seqused_k, block_table)
    if reason is not None:
        reason = f"{reason} is not implemented in bigkern's kernels"
        if torch_fn is None and dispatch.requested_backend() not in ("triton", "cuda"):
            raise dispatch.UnsupportedError(f"{reason}, and this torch ({torch.__version__}) has no function to "
                                            f"leave it to")
        extra = dict(enable_gqa=enable_gqa, seqused_k=seqused_k, block_table=block_table, num_splits=num_splits)
        extra = {name: value_ for name, value_ in extra.items() if value_ is not None and value_ is not False}
        args = (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
        return dispatch.served_by_torch("varlen_attn" if out is None else "varlen_attn_out", reason, torch_fn,
                                        *(args if out is None else (out, *args)), return_aux=return_aux,
                                        scale=scale, window_size=window_size, **extra)
    if out is not None:
        _check_varlen_out(out, query, value)
    # causal (-1, 0) as torch's flash kernels align it: bottom-right, the last query of a sequence
    # seeing its last key (top-left too where a sequence's query and key lengths are equal)
    result, lse = _varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p=0.0,
                                    is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa,
                                    return_lse=True, bottom_right=True)
    if out is not None:  # torch's varlen_attn_out is inference-only too: no autograd through out
        with torch.no_grad():
            out.copy_(result)
        result = out
    if return_aux is not None and return_aux.lse:
        return result, lse
    return result


def _check_varlen_out(out, query, value):
    """varlen_attn_out's `out` as torch's flash kernel takes it: query's dtype and device, (Tq, Hq, Dv)."""
    name = "varlen_attn_out()"
    check_tensor(out, "out", name, position=1)
    check_like(out, "out", query, "query", name)
    expected = (query.shape[0], query.shape[1], value.shape[-1]) if value.dim() == 3 else None
    if expected is not None and tuple(out.shape) != expected:
        raise RuntimeError(f"{name}: argument 'out' must have shape {expected} (tokens, heads, value head dim), "
                           f"but got {tuple(out.shape)}")


@dispatch.entry_point
def varlen_attn(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Optional[Tensor], max_q: int,
                max_k: int, *, return_aux=None, scale: Optional[float] = None, window_size=(-1, -1),
                enable_gqa: bool = False, seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                num_splits: Optional[int] = None):
    """torch.nn.attention.varlen.varlen_attn, fused: same signature, same results.

    query (Tq, Hq, D), key (Tk, Hkv, D), value (Tk, Hkv, Dv); window_size (-1, -1) for full
    attention, (-1, 0) for causal; returns out (Tq, Hq, Dv), and lse (Hq, Tq) float32 too when
    return_aux.lse. num_splits is accepted and has nothing to change: bigkern's varlen kernels never
    split the keys, so every sequence's result is the same whatever else is in the batch. Causal is
    aligned as torch's flash kernels align it, bottom-right (a sequence's last query sees its last
    key). Sliding windows and paged KV caches (seqused_k, block_table) are not in bigkern's kernels:
    a forced triton/cuda backend raises UnsupportedError, otherwise torch's own varlen_attn serves
    the call. cu_seq_q / cu_seq_k are checked (see varlen_attention); a packed
    buffer with tokens past cu_seq_q[-1], whose rows torch's kernels leave unwritten, is refused.
    """
    return _varlen_attn(_TORCH_VARLEN_ATTN, None, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux,
                        scale, window_size, enable_gqa, seqused_k, block_table, num_splits)


@dispatch.entry_point
def varlen_attn_out(out: Tensor, query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor,
                    cu_seq_k: Optional[Tensor], max_q: int, max_k: int, *, return_aux=None,
                    scale: Optional[float] = None, window_size=(-1, -1), enable_gqa: bool = False,
                    seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                    num_splits: Optional[int] = None):
    """torch.nn.attention.varlen.varlen_attn_out: varlen_attn writing its output into `out`
    (Tq, Hq, Dv), which it returns (with lse when return_aux.lse). Inference-only, as torch's."""
    return _varlen_attn(_TORCH_VARLEN_ATTN_OUT, out, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                        return_aux, scale, window_size, enable_gqa, seqused_k, block_table, num_splits)



# ---------------------------------------------------------------------------------------------
# Verification against float64, shared by tests/test_attention.py and `bigkern verify`.

def _replay_seed(rng_state_before, dropout_p):
    """The dropout seed a call made with torch's generator in `rng_state_before` drew."""
    if dropout_p <= 0:
        return None
    after = torch.get_rng_state()
    torch.set_rng_state(rng_state_before)
    seed = draw_dropout_seed()
    torch.set_rng_state(after)
    return seed


def _gradient_term_scales(args64, out64, grad_out64, users):
    """For each input, the largest sum of |terms| its gradient adds up (the floor's magnitude: the
    gradients are sums whose terms cancel). `users` maps input name -> user tensor (for the
    broadcast multiplicity: a broadcast input's gradient sums over the copies too)."""
    q, k, v, mask, dropout_p, is_causal, scale, seed = args64
    scale = default_scale(scale, q)
    with torch.no_grad():
        heads = q.shape[1]
        ke, ve = _expand_kv_heads(k, heads), _expand_kv_heads(v, heads)
        p = _probabilities(_masked_scores(q, k, mask, is_causal, scale))[0].nan_to_num(0.0)
        z = torch.ones_like(p)
        if seed is not None:
            z = dropout_multiplier(dropout_keep_mask(seed, *q.shape[:3], k.shape[2], dropout_p, q.device), dropout_p,
                                   p.dtype)
        go = grad_out64.nan_to_num(0.0)
        dp = torch.matmul(go, ve.transpose(-1, -2)) * z
        delta = (go * out64.nan_to_num(0.0)).sum(-1, keepdim=True)
        terms = (p * (dp.abs() + delta.abs())).nan_to_num(0.0)
        magnitudes = {
            "query": (terms @ ke.abs()) * abs(scale),
            "key": _sum_kv_heads((terms.transpose(-1, -2) @ q.abs()) * abs(scale), k.shape[1]),
            "value": _sum_kv_heads((p * z).transpose(-1, -2) @ go.abs(), k.shape[1]),
            "attn_mask": terms,
        }
    scales = {}
    for name, tensor in magnitudes.items():
        user = users.get(name)
        if user is None or tensor.numel() == 0 or user.numel() == 0:
            scales[name] = None
            continue
        copies = max(1, tensor.numel() // user.numel())
        scales[name] = tensor.nan_to_num(0.0, posinf=0.0).max().item() * copies
    return scales


def compare_with_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False):
    """Run scaled_dot_product_attention forward and backward on leaf tensors with whatever backend
    is requested; the Comparisons of the output and of every gradient against float64 (the
    dropout pattern replayed from the seed the call drew)."""
    from bigkern import testing

    rng_before = torch.get_rng_state()
    out = scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                       enable_gqa=enable_gqa)
    seed = _replay_seed(rng_before, dropout_p)
    grad_out = testing.make_tensor(out.shape, out.dtype, out.device)
    if out.requires_grad:
        out.backward(grad_out)

    def reference(copy):
        tensors = [copy(t) for t in (query, key, value)]
        mask = attn_mask
        if attn_mask is not None and attn_mask.is_floating_point():
            mask = copy(attn_mask)
        elif attn_mask is not None:
            mask = attn_mask.to(tensors[0].device)
        args, (batch_shape, L, Ev) = prepare_sdpa(*tensors, mask, dropout_p, is_causal, scale, enable_gqa,
                                                  seed=seed)
        q4, k4, v4, m4, p, causal, sc, sd = args
        keep = dropout_keep_mask(sd, *q4.shape[:3], k4.shape[2], p, q4.device) if sd is not None else None
        out4, lse4 = reference_attention(q4, k4, v4, m4, causal, sc, keep, p)
        result = out4.reshape(batch_shape + (L, Ev))
        if result.requires_grad:
            result.backward(grad_out.to(device=result.device, dtype=result.dtype))
        return result, tensors + [mask], args, out4, lse4

    out64, leaves64, args64, out4_64, lse4_64 = reference(testing.fp64_copy)
    out_t, leaves_t, *_ = reference(testing.same_dtype_copy)
    results = [testing.compare(out, out64, out_t)]
    names = ("query", "key", "value", "attn_mask")
    users = {name: t for name, t in zip(names, (query, key, value, attn_mask)) if t is not None}
    grad_out4 = grad_out.double().cpu().reshape(out4_64.shape)
    scales = _gradient_term_scales(args64, out4_64.detach(), grad_out4, users)
    floor_ulps = testing.default_floor_ulps(query.dtype) * max(1.0, _recomputed_lse_magnitude(lse4_64))
    for name, user, ref, same in zip(names, (query, key, value, attn_mask), leaves64, leaves_t):
        if user is None or not user.requires_grad:
            continue
        results.append(testing.compare(user.grad, ref.grad, same.grad, name=f"grad {name}",
                                       factor=testing.GRADIENT_FACTOR, scale=scales[name], floor_ulps=floor_ulps))
    return results


def _recomputed_lse_magnitude(lse64):
    """The largest |lse| a flash backward recomputes P from: P = exp(s - lse), with s recomputed in
    another summation order and lse rounded at its own magnitude, carries a relative error of about
    eps * |lse| where torch's math backward keeps P itself (a decoding row over 129 keys: ~10 ulps of
    P; test_torch_samples' _attention_gradient_floor, the same rule). Rows of |lse| from 1024 on
    do not count: a backward must recompute those from their max (the Triton kernels'
    ROW_STATS_RECOMPUTE_FROM), and a floor scaled by their lse would hide one that does not."""
    finite = lse64[lse64.isfinite() & (lse64.abs() < 1024.0)]
    return finite.abs().max().item() if finite.numel() else 0.0


# (B, Hq, Hkv, L, S, E, Ev, is_causal, mask kind, dropout_p, layout)
_CPU_CASES = [
    (2, 3, 3, 33, 65, 40, 40, False, None, 0.0, "contiguous"),
    (1, 4, 2, 65, 33, 64, 16, True, None, 0.0, "fused_qkv"),
    (2, 2, 2, 7, 33, 16, 16, False, "bool", 0.0, "contiguous"),
    (1, 2, 1, 33, 7, 40, 64, False, "float", 0.0, "contiguous"),
    (2, 2, 2, 1, 65, 64, 64, False, None, 0.0, "contiguous"),
    (1, 2, 2, 33, 33, 16, 16, True, None, 0.25, "contiguous"),
]
_GPU_CASES = [
    (2, 8, 8, 1024, 1024, 128, 128, False, None, 0.0, "fused_qkv"),
    (2, 8, 2, 1000, 1000, 128, 128, True, None, 0.0, "contiguous"),
    (1, 4, 4, 777, 1025, 80, 80, False, "bool", 0.0, "contiguous"),
    (1, 4, 4, 513, 300, 256, 256, False, "float", 0.0, "contiguous"),
    (2, 8, 8, 1, 4096, 64, 64, False, None, 0.0, "contiguous"),
    (1, 4, 4, 512, 512, 96, 96, True, None, 0.1, "contiguous"),
]


def make_inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim, head_dim_v, mask_kind, layout, dtype, device,
                requires_grad=True):
    """Random q, k, v (B, H, L, D) in `layout` ("contiguous" or "fused_qkv": views of one
    (B, L, 3, H, D) projection, transposed) and a mask of `mask_kind` (None, "bool", "float")."""
    from bigkern import testing

    if layout == "fused_qkv" and seq_q == seq_k and heads == kv_heads and head_dim == head_dim_v:
        qkv = testing.make_tensor((batch, seq_q, 3, heads, head_dim), dtype, device)
        q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_(requires_grad) for i in range(3))
    else:
        q = testing.make_tensor((batch, heads, seq_q, head_dim), dtype, device, requires_grad=requires_grad)
        k = testing.make_tensor((batch, kv_heads, seq_k, head_dim), dtype, device, requires_grad=requires_grad)
        v = testing.make_tensor((batch, kv_heads, seq_k, head_dim_v), dtype, device, requires_grad=requires_grad)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, seq_q, seq_k, device=device) > 0.3
    elif mask_kind == "float":
        mask = testing.make_tensor((seq_q, seq_k), dtype, device, requires_grad=requires_grad)
    return q, k, v, mask


def verification_cases(device, dtype):
    """(description, thunk returning Comparisons) on fresh random inputs: what `bigkern verify` runs."""
    if device == "cpu" and dtype == torch.bfloat16 and dispatch.triton_interpreter_enabled():
        return  # tl.dot on bf16 is broken in the Triton 3.8 interpreter: bf16 is verified on GPUs
    for case in (_CPU_CASES if device == "cpu" else _GPU_CASES):
        B, Hq, Hkv, L, S, E, Ev, causal, mask_kind, dropout_p, layout = case

        def run(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, causal=causal, mask_kind=mask_kind,
                dropout_p=dropout_p, layout=layout):
            q, k, v, mask = make_inputs(B, Hq, Hkv, L, S, E, Ev, mask_kind, layout, dtype, device)
            return compare_with_reference(q, k, v, mask, dropout_p, causal, enable_gqa=Hq != Hkv)
        yield (f"B={B} H={Hq}/{Hkv} L={L} S={S} E={E} Ev={Ev}{' causal' if causal else ''}"
               f"{' mask=' + mask_kind if mask_kind else ''}{f' dropout={dropout_p}' if dropout_p else ''} {layout}"), run
