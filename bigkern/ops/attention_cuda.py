"""The `cuda` implementation of scaled_dot_product_attention: hand-written flash attention in
csrc/attention/ (mma.sync tensor cores, ldmatrix, cp.async; sm_80 and later), forward and a
deterministic backward. On Hopper, BIGKERN_ATTENTION_SM90=1 also turns on a TMA + wgmma forward
for head dims 64 and 128 (opt-in until it has run on a GPU; anything it cannot take falls back).

bigkern/ops/attention.py registers `forward`/`backward` with `unsupported` as its reason; it
normalizes every call first, so these see q (B, Hq, L, D), k and v (B, Hkv, S, D) with Hq % Hkv == 0
(query head h reads kv head h // (Hq // Hkv)). Causal masking is torch's top-left alignment: query i
sees key j iff j <= i, also when L != S. Rows that see no key get out = 0 and lse = -inf.

Nothing here assumes bigkern._C exists: without it `unsupported` says why and nothing else runs.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from bigkern import dispatch, memory

DTYPES = (torch.float16, torch.bfloat16)
# head dims compiled into bigkern._C (csrc/attention/attention.cu, attention_head_dim_supported)
HEAD_DIMS = (32, 64, 96, 128, 256)
# Dynamic shared memory (bytes) of the largest launch per head dim: (forward, backward). From the
# tile configs of csrc/attention/flash_forward.cuh (kSmem) and flash_backward.cuh (kDqSmem,
# kKvSmem); the CPU emulator checks them against the launches (test_attention_cuda). sm_80/sm_90
# allow 163/227 KB per block; sm_86/sm_89/sm_120 (RTX 30xx/40xx/50xx, A10, L4, L40) only 99 KB.
SHARED_BYTES = {32: (25600, 31744), 64: (55296, 74752), 96: (79872, 79872), 128: (104448, 104448),
                256: (101376, 135680)}
_GRID_LIMIT = 65535  # CUDA's limit on gridDim.y (heads) and gridDim.z (batch)
_SEQ_LIMIT = 2**30  # row indices (plus a block) stay in 32 bits
_ROW_LIMIT = 2**33  # the delta kernel's grid (8 rows a CTA) stays within gridDim.x


def kernel_unsupported(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> Optional[str]:
    """Why the kernels cannot compute this call whatever the device (dtype, shapes, features), or None."""
    if q.dtype not in DTYPES:
        return f"the CUDA attention kernels take float16 or bfloat16, not {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the CUDA attention kernels need q, k and v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if attn_mask is not None:
        return "the CUDA attention kernels take no attn_mask yet (is_causal is supported)"
    if dropout_p:
        return "the CUDA attention kernels have no dropout yet"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "the CUDA attention kernels take 4-d (batch, heads, seq, head_dim) q, k and v"
    if v.shape[-1] != q.shape[-1]:
        return (f"the CUDA attention kernels need v's head dim to equal q's, got {v.shape[-1]} and "
                f"{q.shape[-1]}")
    if q.shape[-1] not in HEAD_DIMS:
        return (f"the CUDA attention kernels are compiled for head dims {', '.join(map(str, HEAD_DIMS))}, "
                f"not {q.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"the CUDA attention kernels need q's heads ({q.shape[1]}) to be a multiple of k's ({k.shape[1]})"
    if q.shape[0] > _GRID_LIMIT or q.shape[1] > _GRID_LIMIT:
        return f"the CUDA attention kernels take at most {_GRID_LIMIT} batches and heads"
    if max(q.shape[2], k.shape[2]) > _SEQ_LIMIT or q.shape[0] * q.shape[1] * q.shape[2] > _ROW_LIMIT:
        return f"the CUDA attention kernels take sequences of at most {_SEQ_LIMIT} and {_ROW_LIMIT} rows in all"
    return None


def unsupported(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, backward=False
                ) -> Optional[str]:
    """Why the CUDA kernels cannot serve this call (its backward, with backward=True), or None."""
    reason = dispatch.cuda_unsupported(q, k, v)
    if reason:
        return reason
    if not hasattr(torch.ops.bigkern, "attention_forward_cuda"):
        return "bigkern._C was built without the attention kernels (csrc/attention/)"
    return kernel_unsupported(q, k, v, attn_mask, dropout_p, is_causal, scale) or shared_memory_reason(q, backward)


def shared_memory_reason(q: Tensor, backward: bool) -> Optional[str]:
    """Why q's GPU cannot hold the kernels' tiles in shared memory (the launch would fail), or None."""
    needed = SHARED_BYTES[q.shape[-1]][1 if backward else 0]
    allowed = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    if needed > allowed:
        return (f"the CUDA attention {'backward' if backward else 'forward'} kernels at head dim {q.shape[-1]} need "
                f"{needed} bytes of shared memory per block; this GPU allows {allowed}")
    return None


def _aligned(t: Tensor) -> Tensor:
    """t itself when the kernels can read it in place (16-byte aligned, contiguous rows, strides in
    whole 16-byte chunks: e.g. transposed views of a fused QKV projection), else a contiguous copy."""
    sizes, strides = t.shape, t.stride()
    in_place = (t.data_ptr() % 16 == 0 and (sizes[-1] <= 1 or strides[-1] == 1)
                and all(size <= 1 or stride % 8 == 0 for size, stride in zip(sizes[:-1], strides[:-1])))
    return t if in_place else t.clone(memory_format=torch.contiguous_format)


def _scale(scale, q):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def forward(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: Optional[float]):
    """(out (B, Hq, L, D) in q's dtype, lse (B, Hq, L) fp32, natural log)."""
    return run_forward(torch.ops.bigkern.attention_forward_cuda, q, k, v, is_causal, scale)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool,
             scale: Optional[float]):
    """(dq, dk, dv), contiguous, in q's dtype; dk and dv summed over the query heads of each kv head.
    Deterministic: no atomics."""
    return run_backward(torch.ops.bigkern.attention_backward_cuda, grad_out, q, k, v, out, lse, is_causal, scale)


# The calls around the kernels, for any `kernel` with the registered op's signature (the tests pass
# the CPU emulator's, tests/cuda_emulation/).

def run_forward(kernel, q, k, v, is_causal, scale):
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = memory.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = memory.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    kernel(q, k, v, out, lse, _scale(scale, q), bool(is_causal))
    return out, lse


def run_backward(kernel, grad_out, q, k, v, out, lse, is_causal, scale):
    grad_out, q, k, v, out = (_aligned(t) for t in (grad_out, q, k, v, out))
    lse = lse.to(torch.float32).contiguous()
    dq = memory.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = memory.empty(k.shape, dtype=q.dtype, device=q.device)
    dv = memory.empty(v.shape, dtype=q.dtype, device=q.device)
    kernel(grad_out, q, k, v, out, lse, dq, dk, dv, _scale(scale, q), bool(is_causal))
    return dq, dk, dv
