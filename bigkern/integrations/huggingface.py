"""bigkern as a Hugging Face transformers attention implementation: `attn_implementation="bigkern"`.

    import bigkern.integrations.huggingface as hf
    hf.register()                                   # once; bigkern.patch(model) does it for you
    model = AutoModel.from_config(config, attn_implementation="bigkern")

The function follows transformers' own SDPA integration (query, key, value as (batch, heads, seq,
head_dim); returns (batch, seq, heads, head_dim) and no weights) with bigkern's
scaled_dot_product_attention doing the work; GQA goes to the kernel directly instead of repeating
the key/value heads.
"""

import torch

NAME = "bigkern"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    from bigkern.nn import functional

    unsupported = [k for k in ("softcap", "position_bias", "cache") if kwargs.get(k) is not None]
    if unsupported or kwargs.get("output_attentions"):
        # transformers' own SDPA path handles these (it calls torch's SDPA)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers does: causal only for a prefill without an explicit mask
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    output = functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None


def register() -> bool:
    """Register bigkern with transformers' attention and mask interfaces; False without transformers
    (or without bigkern's attention)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    from bigkern.nn import functional

    if not hasattr(functional, "scaled_dot_product_attention"):
        return False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def set_attention(model: torch.nn.Module, implementation: str):
    """Switch a transformers model (and its sub-models) to an attention implementation."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers
        model.config._attn_implementation = implementation
