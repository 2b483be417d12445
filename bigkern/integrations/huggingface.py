"""bigkern as a Hugging Face transformers attention implementation: `attn_implementation="bigkern"`.

    import bigkern.integrations.huggingface as hf
    hf.register()                                   # once; bigkern.patch(model) does it for you
    model = AutoModel.from_config(config, attn_implementation="bigkern")

The function follows transformers' own SDPA integration (query, key, value as (batch, heads, seq,
head_dim); returns (batch, seq, heads, head_dim) and no weights) with bigkern's
scaled_dot_product_attention doing the work; GQA goes to the kernel directly instead of repeating
the key/value heads. Calls that change the attention itself (sinks, soft-capping, ALiBi) take the
model's own eager attention under `auto`, and raise UnsupportedError with a forced backend.
"""

import functools
import inspect
import re
import sys
import warnings

import torch

NAME = "bigkern"

# Model code that tests the implementation's name -- `config._attn_implementation == "sdpa"`, `in
# ("eager", "sdpa")` -- takes another path under any other name: DeepSeek-V3.2's sparse attention
# passes its key selection as `indices=` instead of folding it into the mask; Gemma 4's KV-shared
# layers trim their queries where SDPA's mask was skipped for is_causal. Such models stay on SDPA.
_TESTS_THE_SDPA_NAME = re.compile(r"""_attn_implementation[^\n]{0,60}?(==|!=|\bin\b)[^\n]{0,40}?["']sdpa["']""")

# Keyword arguments with which some models change the attention itself -- attention sinks (gpt-oss),
# logit soft-capping (Gemma 2), ALiBi biases -- which neither bigkern's kernel nor transformers' SDPA
# path computes: those calls take the model's own eager attention.
EAGER_ONLY = ("s_aux", "sinks", "softcap", "alibi")


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    from bigkern import dispatch
    from bigkern.nn import functional

    if kwargs.get("block_indices") is not None:
        raise dispatch.UnsupportedError(f"{type(module).__name__} passes block_indices (block-sparse attention), which "
                                        f"bigkern's attention does not compute: use attn_implementation='sdpa'")
    indices = kwargs.pop("indices", None)
    if indices is not None:  # sparse attention (DeepSeek-V3.2): the selected keys, as the SDPA path masks them
        causal = attention_mask is None and query.shape[2] > 1 and (
            is_causal if is_causal is not None else getattr(module, "is_causal", True))
        attention_mask = _keep_selected_keys(_top_left_causal(query, key) if causal else attention_mask, indices,
                                             query, key)
    eager_only = [k for k in EAGER_ONLY if kwargs.get(k) is not None]
    if eager_only:
        return _model_eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      eager_only, **kwargs)
    if kwargs.get("output_attentions"):  # as transformers' SDPA path: no weights, said once
        warnings.warn("bigkern attention does not return attention weights (output_attentions=True): use "
                      "attn_implementation='eager' for them")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers does: causal only for a prefill without an explicit mask
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style relative position biases: one additive mask
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    output = functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None


def _keep_selected_keys(attention_mask, indices, query, key):
    """The mask with only the keys `indices` (B, L, top-k) selects per query row kept (True keeps)."""
    keep = torch.zeros((*indices.shape[:2], key.shape[2]), dtype=torch.bool, device=key.device)
    keep = keep.scatter(-1, indices.long(), True).unsqueeze(1)
    if attention_mask is None:
        return keep
    if attention_mask.dtype == torch.bool:
        return attention_mask & keep
    return attention_mask.masked_fill(~keep, torch.finfo(query.dtype).min)


def _position_bias_mask(position_bias, attention_mask, is_causal, query, key):
    """The bias added to the logits, with the attention mask folded in (boolean: True keeps a key;
    float: added) or, without one, causality when asked."""
    lowest = torch.finfo(key.dtype).min
    if attention_mask is None and is_causal:
        attention_mask = _top_left_causal(query, key)
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, lowest)
    return position_bias + attention_mask


def _top_left_causal(query, key):
    """SDPA's is_causal as a boolean mask (True keeps): query i sees keys 0..i."""
    return torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()


def _model_eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, eager_only,
                           **kwargs):
    """The attention of the model's own `eager_attention_forward` (what attn_implementation="eager"
    runs), given the mask bigkern's mask interface built for SDPA: boolean, or None for plain causal."""
    from bigkern import dispatch

    reason = (f"{type(module).__name__} passes {', '.join(eager_only)}, which bigkern's attention kernels do not "
              f"compute")
    if dispatch.requested_backend() in ("triton", "cuda"):
        raise dispatch.UnsupportedError(f"{reason}: use the auto or torch backend (the model's eager attention)")
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise dispatch.UnsupportedError(f"{reason}, and {type(module).__module__} has no eager_attention_forward "
                                        f"to leave it to")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and is_causal and query.shape[2] > 1:
        attention_mask = _top_left_causal(query, key)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager masks are additive
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def tests_the_sdpa_name(model: torch.nn.Module) -> bool:
    """Whether code of the model's modules compares the attention implementation's name with "sdpa"."""
    return any(_module_tests_the_sdpa_name(type(m).__module__) for m in model.modules())


@functools.lru_cache(maxsize=None)
def _module_tests_the_sdpa_name(module_name: str) -> bool:
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):  # no source to read: nothing known to branch
        return False
    return _TESTS_THE_SDPA_NAME.search(source) is not None


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
