"""One line to make a model use bigkern: `bigkern.patch(model)`, `bigkern.unpatch(model)`, and the
scoped switch `with bigkern.enable():` for code that calls torch.nn.functional directly.

Patching swaps each matching module's class in place (`module.__class__ = drop_in`): every drop-in
subclasses its torch module with the same state, so the parameters, buffers, hooks, training mode,
device, dtype and state_dict keys stay exactly what they were. Only modules whose type is exactly
a registered torch class are swapped: a user's subclass with its own forward is left alone.
"""

import contextlib
import fnmatch
import threading
import warnings
import weakref
from typing import Iterable, Optional

import torch

from bigkern.nn import DROP_INS

_ORIGINAL_CLASS = "_bigkern_original_class"


def _matches(name: str, module: torch.nn.Module, patterns) -> bool:
    for pattern in patterns:
        if isinstance(pattern, type) and isinstance(module, pattern):
            return True
        if isinstance(pattern, str) and (fnmatch.fnmatchcase(name, pattern) or type(module).__name__ == pattern):
            return True
    return False


def _selected(name: str, modules: dict, patterns) -> bool:
    """Whether the module called `name`, or one it sits in, matches a pattern: a pattern names a
    subtree, so including a Transformer layer includes its attention, and excluding it (or a
    container) leaves everything inside it torch's."""
    parts = name.split(".") if name else []
    for depth in range(len(parts) + 1):
        ancestor = ".".join(parts[:depth])
        if ancestor in modules and _matches(ancestor, modules[ancestor], patterns):
            return True
    return False


def _patterns(value):
    """include / exclude as a list: one pattern (a string, a class) is a list of one, not its characters."""
    return [value] if isinstance(value, (str, type)) else list(value)


def patch(model: torch.nn.Module, include: Optional[Iterable] = None, exclude: Optional[Iterable] = None):
    """Swap every torch module bigkern has a drop-in for (Conv2d, LSTM, LSTMCell,
    MultiheadAttention, Transformer{Encoder,Decoder}Layer) for bigkern's, in place; returns model.

    include / exclude: torch module classes, class names, or fnmatch patterns of qualified module
    names (as in `model.named_modules()`, "" for the root), e.g. exclude=["encoder.layers.0"]. A
    pattern covers the module it matches and everything inside it: include=[nn.TransformerEncoderLayer]
    swaps the layers and their attention, exclude=["*.self_attn"] leaves the attention torch's (it
    then runs as torch's module, hooks and all, inside a swapped layer).
    Hugging Face models (at any depth) that transformers runs on SDPA are also switched to bigkern's
    attention (attn_implementation="bigkern"); others keep theirs. transformers' switch is per model,
    not per layer: a model switches when include/exclude select every attention module in it
    (exclude=["*.self_attn"] or ["model.layers.0"] keeps it on SDPA); a composite whose parts run
    different attentions switches its SDPA parts only.
    """
    include = _patterns(include) if include is not None else None
    exclude = _patterns(exclude or [])
    modules = dict(model.named_modules())
    for name, module in modules.items():
        drop_in = DROP_INS.get(_module_class(module))
        if drop_in is None:
            continue
        if include is not None and not _selected(name, modules, include):
            continue
        if _selected(name, modules, exclude):
            continue
        setattr(module, _ORIGINAL_CLASS, _module_class(module))
        _swap_class(module, drop_in)
        if isinstance(module, torch.nn.RNNBase):
            _let_dynamo_trace_rnn_modules(module)
    _patch_huggingface(modules, include, exclude)
    return model


def _module_class(module):
    """The module's class, under the class layer torch.nn.utils.parametrize adds (ParametrizedX(X),
    which holds the parametrized tensors' properties)."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return type(module).__bases__[0]
    return type(module)


def _swap_class(module, new_class):
    """module.__class__ = new_class, keeping a parametrization's layer on top of it (rebuilt over
    new_class, so the parametrized weight stays a property and removing the parametrization later
    leaves new_class)."""
    if not torch.nn.utils.parametrize.is_parametrized(module):
        module.__class__ = new_class
        return
    layer = type(module)
    namespace = {key: value for key, value in vars(layer).items() if key not in ("__dict__", "__weakref__")}
    module.__class__ = type(layer.__name__, (new_class,), namespace)


# the patched LSTMs alive, and whether patch turned allow_rnn on (so unpatch turns it back off)
_PATCHED_RNNS = weakref.WeakSet()
_RNN_FLAG_SET_BY_PATCH = [False]


def _let_dynamo_trace_rnn_modules(module):
    """Dynamo refuses every torch.nn.LSTM instance (subclasses too) unless allow_rnn is set; bigkern's
    LSTM is one opaque op per layer, so with the flag a patched model compiles without graph breaks.
    The flag is process-wide and also lets dynamo trace into torch's own LSTMs (experimental in
    torch: on CPU it fails): say so once, and turn it back off when the last patched LSTM is unpatched."""
    import logging

    import torch._dynamo

    _PATCHED_RNNS.add(module)
    if not torch._dynamo.config.allow_rnn:
        torch._dynamo.config.allow_rnn = True
        _RNN_FLAG_SET_BY_PATCH[0] = True
        logging.getLogger("bigkern").info(
            "bigkern.patch set torch._dynamo.config.allow_rnn = True so patched LSTMs compile without graph "
            "breaks (unpatched torch RNNs compiled in this process now use dynamo's experimental RNN tracing) "
            "until they are unpatched")


def _unpatched_rnn(module):
    import torch._dynamo

    _PATCHED_RNNS.discard(module)
    if _RNN_FLAG_SET_BY_PATCH[0] and not len(_PATCHED_RNNS):
        torch._dynamo.config.allow_rnn = False
        _RNN_FLAG_SET_BY_PATCH[0] = False


def unpatch(model: torch.nn.Module):
    """Undo `patch`: every swapped module gets its torch class back; returns model."""
    for _, module in model.named_modules():
        original = module.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is not None:
            _swap_class(module, original)
            if isinstance(module, torch.nn.RNNBase):
                _unpatched_rnn(module)
    _unpatch_huggingface(model)
    return model


def patched_modules(model: torch.nn.Module):
    """(qualified name, module) of every module `patch` swapped."""
    return [(name, m) for name, m in model.named_modules() if _ORIGINAL_CLASS in m.__dict__]


# ---------------------------------------------------------------------------------------------
# torch.nn.functional calls

# (torch module, name): the torch functions enable() routes through bigkern's of the same name
_FUNCTIONAL_NAMES = (("torch.nn.functional", "scaled_dot_product_attention"), ("torch.nn.functional", "conv2d"),
                     ("torch.nn.attention.varlen", "varlen_attn"), ("torch.nn.attention.varlen", "varlen_attn_out"))


# torch's functions enable() replaced, while any enable() block is open: blocks may nest and, in
# several threads, overlap and end in any order; the last one to end puts torch's back
_ENABLED = {"depth": 0, "saved": []}
_ENABLE_LOCK = threading.Lock()


@contextlib.contextmanager
def enable():
    """Route torch.nn.functional.scaled_dot_product_attention and conv2d, and
    torch.nn.attention.varlen.varlen_attn and varlen_attn_out, through bigkern inside the block (for
    models that call them directly). Code that imported the function object itself before the block
    (`from torch.nn.functional import ...`) is not affected. Like use_backend and torch's sdpa_kernel,
    the switch is process-wide: other threads see it while any block is open."""
    with _ENABLE_LOCK:
        if _ENABLED["depth"] == 0:
            _ENABLED["saved"] = _install_bigkern_functions()
        _ENABLED["depth"] += 1
    try:
        yield
    finally:
        with _ENABLE_LOCK:
            _ENABLED["depth"] -= 1
            if _ENABLED["depth"] == 0:
                for module, name, original in _ENABLED["saved"]:
                    setattr(module, name, original)
                _ENABLED["saved"] = []


def _install_bigkern_functions():
    import importlib

    import bigkern.nn.functional as bigkern_functional

    saved = []
    for module_name, name in _FUNCTIONAL_NAMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an older torch
            continue
        if hasattr(module, name) and hasattr(bigkern_functional, name):
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, getattr(bigkern_functional, name))
    return saved


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers

def _is_huggingface_model(module) -> bool:
    """A transformers PreTrainedModel (its layers often hold the config too, but are not models)."""
    return (any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__)
            and hasattr(getattr(module, "config", None), "_attn_implementation"))


def _inside(name: str, container: str) -> bool:
    """Whether the module called `name` sits strictly inside the one called `container`."""
    return name != container and (container == "" or name.startswith(container + "."))


def _runs_on_sdpa(module) -> bool:
    return module.config._attn_implementation == "sdpa" and getattr(module, "_supports_sdpa", True)


def _attention_selected(name, modules, include, exclude) -> bool:
    """Whether include/exclude select every attention module of the model called `name` (its
    modules whose class names say Attention; the model itself when none do)."""
    attention = [n for n, m in modules.items()
                 if (n == name or _inside(n, name)) and "Attention" in type(m).__name__]
    return all((include is None or _selected(n, modules, include)) and not _selected(n, modules, exclude)
               for n in attention or [name])


def _patch_huggingface(modules, include, exclude):
    """Switch each transformers model in the tree that runs on SDPA to bigkern's attention, outermost
    first: a model whose inner models all run on SDPA switches as a whole (transformers passes the
    choice down); a composite with an inner model on another attention (eager, for the weights, say)
    is left as it is and its SDPA parts switch on their own."""
    models = [(name, m) for name, m in modules.items() if _is_huggingface_model(m)]
    if not models:
        return
    from bigkern.integrations import huggingface

    if any(getattr(m.config, "_attn_implementation", None) == huggingface.NAME for _, m in models):
        huggingface.register()  # switched by an earlier patch, perhaps in another process (torch.save)
    # bigkern's attention is an SDPA drop-in: a model transformers does not run on SDPA (built with
    # eager attention, which returns the weights; flash; one whose attention SDPA cannot take; or
    # already bigkern's, by an earlier patch) keeps its own attention
    switched, left = [], []  # (left on SDPA by the check below: its inner models too, said once)
    for name, model in models:
        if any(_inside(name, outer) for outer in switched + left):
            continue
        inner = [m for n, m in models if _inside(n, name)]
        if not all(_runs_on_sdpa(m) for m in [model] + inner):
            continue
        if not _attention_selected(name, modules, include, exclude) or not huggingface.register():
            continue
        if huggingface.tests_the_sdpa_name(model):  # it would compute something else under another name
            warnings.warn(f"bigkern.patch leaves {type(model).__name__} on transformers' SDPA attention: its code "
                          f"takes another path when the attention implementation is not named 'sdpa'", stacklevel=3)
            left.append(name)
            continue
        setattr(model, "_bigkern_original_attn_implementation", model.config._attn_implementation)
        huggingface.set_attention(model, "bigkern")
        switched.append(name)


def _unpatch_huggingface(model):
    from bigkern.integrations import huggingface

    for _, module in model.named_modules():
        original = module.__dict__.pop("_bigkern_original_attn_implementation", None)
        if original is not None:
            huggingface.set_attention(module, original)
