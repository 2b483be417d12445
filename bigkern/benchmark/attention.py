"""Benchmark cases for scaled dot-product attention, with every torch SDPA backend on the machine
(flash, memory-efficient, cuDNN, math), each forced through torch.nn.attention.sdpa_kernel, as
baselines measured in the same run. Each timing is rated against the machine's roofline
(harness.roofline): the long sequences are compute-bound, decoding (a few query rows over a long
cache) is bound by reading the cache.

FLOPs (FlashAttention's convention): forward 4 * B * Hq * L * S * D (two matmuls of 2 * L * S * D
each per head), times the fraction of the (L, S) matrix a causal mask keeps ((L + 1) / 2L when L = S,
where FlashAttention takes exactly 1/2: +0.2% at seq 512);
backward 2.5x the forward (five matmuls to the forward's two); "forward+backward" counts both.
Bytes: the forward reads q, k, v and writes o; the backward reads q, k, v, o, dO and writes dq,
dk, dv, so forward+backward moves 3x the forward's bytes. Shapes: bench/shapes.json "attention"
(FlashAttention's sweep at 16k tokens per batch, GQA, odd head dims, decoding).
"""

import torch

from bigkern.benchmark.harness import Case, Unavailable
from bigkern.benchmark.providers import bigkern_backends, with_environment
from bigkern.ops import attention

# the math backend materializes (B, H, L, S) scores (and their gradient): beyond this it only
# measures the allocator
MATH_MAX_SCORES = 2**30


def causal_fraction(L, S):
    """The fraction of an (L, S) score matrix that is_causal=True keeps: torch aligns the diagonal
    top-left, so query row i sees keys 0..i (all S of them once i >= S - 1)."""
    kept = sum(min(i + 1, S) for i in range(min(L, S))) + max(L - S, 0) * S
    return kept / (L * S)


def _torch_backends():
    """name -> SDPBackend for each torch backend this torch knows."""
    from torch.nn.attention import SDPBackend

    names = {"torch-flash": "FLASH_ATTENTION", "torch-efficient": "EFFICIENT_ATTENTION",
             "torch-cudnn": "CUDNN_ATTENTION", "torch-math": "MATH"}
    return {name: getattr(SDPBackend, member) for name, member in names.items() if hasattr(SDPBackend, member)}


def _torch_provider(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v, is_causal, gqa):
        with sdpa_kernel(backend):
            try:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                                        enable_gqa=gqa)
            except RuntimeError as error:
                if "No available kernel" in str(error) or "No viable backend" in str(error):
                    raise Unavailable(f"torch's {backend.name} backend cannot run this case") from None
                raise
    return call


def _bigkern_call(q, k, v, is_causal, gqa):
    return attention.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)


def _triton_variants(device, seq_q, causal):
    """The Triton kernel's switches, timed beside its default in the same run: the TMA key/value
    loads (Hopper, opt-in until measured) and, where it would split, the unsplit decoding walk."""
    from bigkern.kernels import attention as kernels

    variants = {}
    if torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        variants["bigkern-triton-tma"] = {kernels.TMA_ENV: "1"}
    if seq_q <= kernels.SPLIT_MAX_QUERY_ROWS and not causal:
        variants["bigkern-triton-nosplit"] = {kernels.SPLIT_ENV: "0"}
    return variants


def _entries(shapes, quick):
    """(name, batch, q_heads, kv_heads, L, S, head_dim, causal, modes) for every case (with quick,
    only the entries marked "quick")."""
    section = shapes["attention"]
    both = ("forward", "forward+backward")
    out = []
    for e in section.get("sweep", []) + section.get("odd_head_dims", []):
        out.append((e, f"hd{e['head_dim']} seq{e['seq']}{' causal' if e['causal'] else ''}", e["batch"], e["heads"],
                    e["heads"], e["seq"], e["seq"], e["head_dim"], e["causal"], both))
    for e in section.get("gqa", []):
        out.append((e, f"gqa {e['q_heads']}/{e['kv_heads']} hd{e['head_dim']} seq{e['seq']}"
                    f"{' causal' if e['causal'] else ''}", e["batch"], e["q_heads"], e["kv_heads"], e["seq"],
                    e["seq"], e["head_dim"], e["causal"], both))
    for e in section.get("decoding", []):
        out.append((e, f"decode B{e['batch']} {e['q_heads']}/{e['kv_heads']} kv{e['kv_len']}", e["batch"],
                    e["q_heads"], e["kv_heads"], e["q_len"], e["kv_len"], e["head_dim"], False, ("forward",)))
    return [entry[1:] for entry in out if entry[0].get("quick") or not quick]


def cases(shapes, device, dtypes, quick=False):
    for name, B, Hq, Hkv, L, S, D, causal, modes in _entries(shapes, quick):
        for dtype in dtypes:
            forward_flops = 4.0 * B * Hq * L * S * D * (causal_fraction(L, S) if causal else 1.0)
            params = dict(batch=B, q_heads=Hq, kv_heads=Hkv, seq_q=L, seq_k=S, head_dim=D, causal=causal)
            for mode in modes:
                training = mode != "forward"
                flops = forward_flops * (3.5 if training else 1.0)
                size = torch.finfo(dtype).bits // 8
                bytes_moved = size * (B * Hq * L * D * 2 + B * Hkv * S * D * 2) * (3 if training else 1)

                def timed(call, wrap=lambda step: step, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, causal=causal,
                          dtype=dtype, training=training):
                    """`wrap` (a forced backend, a kernel switch) covers the whole step, backward included."""
                    def make():
                        q = torch.randn(B, Hq, L, D, device=device, dtype=dtype, requires_grad=training)
                        k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=training)
                        v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=training)
                        gqa = Hq != Hkv
                        if not training:
                            return wrap(lambda: call(q, k, v, causal, gqa))
                        grad = torch.randn(B, Hq, L, D, device=device, dtype=dtype)

                        def step():
                            q.grad = k.grad = v.grad = None
                            out = call(q, k, v, causal, gqa)
                            out.backward(grad)
                            return out, q.grad, k.grad, v.grad  # for the check against the reference
                        return wrap(step)
                    return make

                backends = bigkern_backends(("triton", "cuda"))
                providers = {f"bigkern-{backend}": timed(_bigkern_call, wrap) for backend, wrap in backends.items()}
                for variant, env in _triton_variants(device, L, causal).items():
                    providers[variant] = timed(_bigkern_call, lambda step, env=env: backends["triton"](
                        with_environment(step, **env)))
                for provider, backend in _torch_backends().items():
                    if provider == "torch-math" and B * Hq * L * S > MATH_MAX_SCORES:
                        def skipped():
                            raise Unavailable("the math backend materializes the (L, S) scores: skipped at this size")
                        providers[provider] = skipped
                        continue
                    providers[provider] = timed(_torch_provider(backend))
                baselines = tuple(p for p in providers if p.startswith("torch-"))
                yield Case("attention", name, params, dtype, mode, flops=flops, bytes=bytes_moved,
                           providers=providers, baselines=baselines, references=baselines)


__all__ = ["cases", "Unavailable"]
