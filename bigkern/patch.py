"""One line to make a model use bigkern: `bigkern.patch(model)`, `bigkern.unpatch(model)`, and the
scoped switch `with bigkern.enable():` for code that calls torch.nn.functional directly.

Patching swaps each matching module's class in place (`module.__class__ = drop_in`): every drop-in
subclasses its torch module with the same state, so the parameters, buffers, hooks, training mode,
device, dtype and state_dict keys stay exactly what they were. Only modules whose type is exactly
a registered torch class are swapped: a user's subclass with its own forward is left alone.
"""

import contextlib
import fnmatch
from typing import Iterable, Optional

import torch

from bigkern.nn import DROP_INS

_ORIGINAL_CLASS = "_bigkern_original_class"


def _selected(name: str, module: torch.nn.Module, patterns) -> bool:
    for pattern in patterns:
        if isinstance(pattern, type) and isinstance(module, pattern):
            return True
        if isinstance(pattern, str) and (fnmatch.fnmatchcase(name, pattern) or type(module).__name__ == pattern):
            return True
    return False


def patch(model: torch.nn.Module, include: Optional[Iterable] = None, exclude: Optional[Iterable] = None):
    """Swap every torch module bigkern has a drop-in for (Conv2d, LSTM, LSTMCell,
    MultiheadAttention, Transformer{Encoder,Decoder}Layer) for bigkern's, in place; returns model.

    include / exclude: torch module classes, class names, or fnmatch patterns of qualified module
    names (as in `model.named_modules()`, "" for the root), e.g. exclude=["encoder.layers.0.*"].
    Hugging Face models are also switched to bigkern's attention (attn_implementation="bigkern").
    """
    include = list(include) if include is not None else None
    exclude = list(exclude or [])
    for name, module in model.named_modules():
        drop_in = DROP_INS.get(type(module))
        if drop_in is None:
            continue
        if include is not None and not _selected(name, module, include):
            continue
        if _selected(name, module, exclude):
            continue
        setattr(module, _ORIGINAL_CLASS, type(module))
        module.__class__ = drop_in
    _patch_huggingface(model)
    return model


def unpatch(model: torch.nn.Module):
    """Undo `patch`: every swapped module gets its torch class back; returns model."""
    for _, module in model.named_modules():
        original = module.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is not None:
            module.__class__ = original
    _unpatch_huggingface(model)
    return model


def patched_modules(model: torch.nn.Module):
    """(qualified name, module) of every module `patch` swapped."""
    return [(name, m) for name, m in model.named_modules() if _ORIGINAL_CLASS in m.__dict__]


# ---------------------------------------------------------------------------------------------
# torch.nn.functional calls

_FUNCTIONAL_NAMES = ("scaled_dot_product_attention", "conv2d")


@contextlib.contextmanager
def enable():
    """Route torch.nn.functional.scaled_dot_product_attention and conv2d through bigkern inside the
    block (for models that call them directly). Code that imported the function object itself
    before the block (`from torch.nn.functional import ...`) is not affected."""
    import bigkern.nn.functional as bigkern_functional

    functional = torch.nn.functional
    saved = {}
    for name in _FUNCTIONAL_NAMES:
        replacement = getattr(bigkern_functional, name, None)
        if replacement is not None:
            saved[name] = getattr(functional, name)
            setattr(functional, name, replacement)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(functional, name, original)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers

def _patch_huggingface(model):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return
    from bigkern.integrations import huggingface

    if huggingface.register():
        setattr(model, "_bigkern_original_attn_implementation", config._attn_implementation)
        huggingface.set_attention(model, "bigkern")


def _unpatch_huggingface(model):
    original = model.__dict__.pop("_bigkern_original_attn_implementation", None)
    if original is not None:
        from bigkern.integrations import huggingface

        huggingface.set_attention(model, original)
