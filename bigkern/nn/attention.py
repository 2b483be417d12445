"""Drop-in MultiheadAttention, TransformerEncoderLayer and TransformerDecoderLayer.

Each subclasses torch's class with the identical constructor, parameters, buffers and state_dict,
and computes exactly what torch's module computes -- projections, bias_k/bias_v, add_zero_attn,
key_padding_mask merged into attn_mask, the is_causal hint, dropout in training -- with the
attention itself in bigkern's fused scaled_dot_product_attention (O(L + S) memory).

need_weights=True asks for the (L, S) attention matrix, which a fused kernel never forms: under
`auto` (or the torch backend) such a call takes torch's own path; with triton or cuda forced it
raises UnsupportedError. So do NestedTensor inputs to MultiheadAttention, which only torch's fast path
takes; a batch_first TransformerEncoderLayer runs a NestedTensor (what torch.nn.TransformerEncoder makes
of a padded batch in inference) as the padded batch and its padding mask, through bigkern's attention.

The class-swap protocol (DEVELOPING.md): these classes keep no state of their own, so a torch
instance whose __class__ is swapped works at once. A layer calls its attention child as a module,
whatever its class: a child left torch's (bigkern.patch(..., exclude=["*.self_attn"])) runs as
torch's, its hooks with it.
"""

import functools

import torch
import torch.nn.functional as torch_F
from torch import Tensor

from bigkern import dispatch
from bigkern.nn import register_drop_in
from bigkern.ops import attention as ops
from bigkern.ops.checks import check_tensor

_NEED_WEIGHTS = ("MultiheadAttention with need_weights=True returns the (L, S) attention weights, which the fused "
                 "kernels never form: pass need_weights=False, or use the auto or torch backend")
_NESTED = "MultiheadAttention takes NestedTensor inputs only on torch's fast path: use the auto or torch backend"
_NESTED_LAYER = ("TransformerEncoderLayer takes NestedTensor inputs with a mask or causal hint, or not batch_first, "
                 "only on torch's fast path: use the auto or torch backend")


def _torch_path_reason(query, key, value, need_weights):
    if need_weights:
        return _NEED_WEIGHTS
    if query.is_nested or key.is_nested or value.is_nested:
        return _NESTED
    return None


def _sdpa_arguments(module, query, key, value, key_padding_mask, attn_mask, is_causal):
    """What torch's MultiheadAttention (need_weights=False) does before its attention call, step for
    step: returns the SDPA arguments and what is needed to finish (shapes, batch_first, batched)."""
    is_batched = query.dim() == 3
    for mask, name in ((key_padding_mask, "key_padding_mask"), (attn_mask, "attn_mask")):
        check_tensor(mask, name, "MultiheadAttention.forward()", optional=True)  # (torch: a TypeError too)
    key_padding_mask = torch_F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                               other_type=torch_F._none_or_dtype(attn_mask), other_name="attn_mask",
                                               target_type=query.dtype)
    attn_mask = torch_F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                        target_type=query.dtype, check_other=False)
    if module.batch_first and is_batched:
        # keep self-attention's identities (torch does): the packed projection is then one matmul.
        # `is`, never id(): dynamo guards an id() on the very tensor object, recompiling each call
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))

    num_heads = module.num_heads
    is_batched = torch_F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]

    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None:
        attn_mask = None  # the hint stands for the mask: the kernels apply causality themselves
    elif key_padding_mask is not None:
        is_causal = False  # padding merged into the mask: no longer causal
    if embed_dim != module.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {module.embed_dim}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if module._qkv_same_embed_dim:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = torch_F._in_projection_packed(query, key, value, module.in_proj_weight, module.in_proj_bias)
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        b_q = b_k = b_v = None
        if module.in_proj_bias is not None:
            b_q, b_k, b_v = module.in_proj_bias.chunk(3)
        q, k, v = torch_F._in_projection(query, key, value, module.q_proj_weight, module.k_proj_weight,
                                         module.v_proj_weight, b_q, b_k, b_v)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, module.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, module.bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = torch_F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = torch_F.pad(key_padding_mask, (0, 1))

    # (L, N, E) -> (N * H, L, hd): a view; the kernels take its strides as they are
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if module.add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros], dim=1)
        if attn_mask is not None:
            attn_mask = torch_F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = torch_F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)

    if key_padding_mask is not None:
        # torch's checks, in its wording (typo included: users match on it)
        for dim, expected in enumerate((bsz, src_len)):
            if key_padding_mask.dim() <= dim or key_padding_mask.shape[dim] != expected:
                got = key_padding_mask.shape[dim] if key_padding_mask.dim() > dim else None
                raise AssertionError(f"Expected key_padded_mask.shape[{dim}] to be {expected}, but got {got} "
                                     f"(key_padding_mask of shape {tuple(key_padding_mask.shape)})")
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    dropout_p = module.dropout if module.training else 0.0
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, attn_mask.shape[-2], src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    return (q, k, v, attn_mask, dropout_p, is_causal), (tgt_len, bsz, embed_dim, is_batched)


def multi_head_attention_forward(module, query, key, value, key_padding_mask=None, need_weights=True,
                                 attn_mask=None, average_attn_weights=True, is_causal=False):
    """MultiheadAttention.forward of `module` (a torch.nn.MultiheadAttention of either class) with
    bigkern's attention: (attn_output, None), or torch's path for need_weights / NestedTensor."""
    reason = _torch_path_reason(query, key, value, need_weights)
    if reason is not None:
        return dispatch.served_by_torch("MultiheadAttention", reason, torch.nn.MultiheadAttention.forward, module,
                                        query, key, value, key_padding_mask=key_padding_mask,
                                        need_weights=need_weights, attn_mask=attn_mask,
                                        average_attn_weights=average_attn_weights, is_causal=is_causal)
    sdpa_args, (tgt_len, bsz, embed_dim, is_batched) = _sdpa_arguments(module, query, key, value, key_padding_mask,
                                                                       attn_mask, is_causal)
    out = ops.scaled_dot_product_attention(*sdpa_args)
    # (N, H, L, hd) laid out like q, i.e. (L, N, H, hd) in memory: this reshape is a view
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = torch_F.linear(out, module.out_proj.weight, module.out_proj.bias)
    out = out.view(tgt_len, bsz, out.shape[-1])  # (not -1: a batch of 0 leaves it undetermined)
    if not is_batched:
        return out.squeeze(1), None
    if module.batch_first:
        out = out.transpose(1, 0)
    return out, None


# torch.fx keeps torch.nn's MultiheadAttention and Transformer layers whole (they are leaves of its
# default tracer); bigkern's are traced into, and their shape checks branch on what a tracer cannot
# know. Recorded as one node each (the module an argument), a patched model traces as torch's does.
torch.fx.wrap("multi_head_attention_forward")


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with bigkern's fused attention (same constructor and state)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        return multi_head_attention_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                            average_attn_weights, is_causal)


def _swap_attention_children(layer, *names):
    for name in names:
        child = getattr(layer, name)
        if type(child) is torch.nn.MultiheadAttention:
            child.__class__ = MultiheadAttention


def encoder_layer_forward(layer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    """TransformerEncoderLayer.forward of `layer` without torch's inference fast path."""
    if src.is_nested:
        if (src.dim() == 3 and layer.self_attn.batch_first and src_mask is None and src_key_padding_mask is None
                and not is_causal):
            return _nested_through_padding(layer, src)
        return dispatch.served_by_torch("TransformerEncoderLayer", _NESTED_LAYER,
                                        torch.nn.TransformerEncoderLayer.forward, layer, src, src_mask,
                                        src_key_padding_mask, is_causal)
    src_key_padding_mask = torch_F._canonical_mask(
        mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=torch_F._none_or_dtype(src_mask),
        other_name="src_mask", target_type=src.dtype)
    src_mask = torch_F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                       target_type=src.dtype, check_other=False)
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        x = x + layer._ff_block(layer.norm2(x))
    else:
        x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        x = layer.norm2(x + layer._ff_block(x))
    return x


def _nested_through_padding(layer, src):
    """A batch_first layer on a NestedTensor of sequences (what torch.nn.TransformerEncoder makes of
    a padded batch and its padding mask in inference): the padded batch and that mask through
    bigkern's layer, each sequence's rows taken back out (torch's fast path computes the same)."""
    lengths = [t.shape[0] for t in src.unbind()]
    padded = src.to_padded_tensor(0.0)
    positions = torch.arange(padded.shape[1], device=padded.device)
    padding = positions[None, :] >= torch.tensor(lengths, device=padded.device)[:, None]
    out = encoder_layer_forward(layer, padded, None, padding, False)
    return torch.nested.as_nested_tensor([out[i, :n] for i, n in enumerate(lengths)], layout=src.layout)


torch.fx.wrap("encoder_layer_forward")


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer with bigkern's attention (same constructor and state). torch's
    inference fast path is not taken (bigkern's kernels are the fast path); NestedTensor inputs run as
    their padded batch and padding mask (batch_first, no src_mask or causal hint; else torch's path)."""

    @functools.wraps(torch.nn.TransformerEncoderLayer.__init__)  # torch's signature: config tools read it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _swap_attention_children(self, "self_attn")

    def forward(self, src: Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False) -> Tensor:
        return encoder_layer_forward(self, src, src_mask, src_key_padding_mask, is_causal)


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer with bigkern's attention (same constructor and state): torch's
    forward, whose attention children are bigkern's."""

    @functools.wraps(torch.nn.TransformerDecoderLayer.__init__)  # torch's signature: config tools read it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _swap_attention_children(self, "self_attn", "multihead_attn")


register_drop_in(torch.nn.MultiheadAttention, MultiheadAttention)
register_drop_in(torch.nn.TransformerEncoderLayer, TransformerEncoderLayer)
register_drop_in(torch.nn.TransformerDecoderLayer, TransformerDecoderLayer)
