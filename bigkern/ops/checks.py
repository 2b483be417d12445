"""Argument checks every family's entry point shares: torch's exception types, with messages that
name the argument. `op` is the call as torch names it in its messages, e.g. "conv2d()"."""

import numbers
import operator
from typing import Optional

import torch
from torch import Tensor


def type_name(value) -> str:
    """The type of `value` as torch's argument parser names it (C's tp_name): 'int', 'numpy.bool',
    'MyClass' (a class written in Python)."""
    t = type(value)
    if t.__module__ == "builtins" or t.__flags__ & (1 << 9):  # Py_TPFLAGS_HEAPTYPE: defined in Python
        return t.__name__
    return f"{t.__module__}.{t.__name__}"


def check_tensor(t, name: str, op: str, *, optional: bool = False, position=None):
    """torch's TypeError for an argument that is not a Tensor (None passes when optional)."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        where = f" (position {position})" if position else ""
        raise TypeError(f"{op}: argument '{name}'{where} must be Tensor, not {type_name(t)}")


def check_same_device(t, name: str, ref: Tensor, ref_name: str, op: str):
    """Same device as the reference tensor (None passes), else torch's RuntimeError naming both."""
    if t is not None and t.device != ref.device:
        raise RuntimeError(f"{op}: expected argument '{name}' on the device of '{ref_name}' ({ref.device}), "
                           f"but it is on {t.device}")


def check_like(t, name: str, ref: Tensor, ref_name: str, op: str):
    """Same device and dtype as the reference tensor (None passes), else torch's RuntimeError naming both."""
    if t is None:
        return
    check_same_device(t, name, ref, ref_name, op)
    if t.dtype != ref.dtype:
        raise RuntimeError(f"{op}: expected argument '{name}' to have the dtype of '{ref_name}' ({ref.dtype}), "
                           f"but got {t.dtype}")


def as_int(value) -> Optional[int]:
    """An int as torch's argument parser takes one -- an int (not a bool), a numpy integer, a 0-d
    integer tensor -- or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Tensor):
        integral = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        return int(value) if value.dim() == 0 and integral else None
    # (no try/except TypeError: torch 2.11's dynamo cannot trace one around operator.index)
    return operator.index(value) if hasattr(type(value), "__index__") else None


def as_real(value) -> Optional[float]:
    """A float as torch's argument parser takes one -- a Python or numpy real, a 0-d real tensor --
    or None."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        return float(value)
    return None


def check_negative_slope(negative_slope, op: str) -> float:
    """A leaky_relu slope as torch takes it -- a Number, not a string or a bool -- as a float."""
    slope = as_real(negative_slope)
    if slope is None or isinstance(negative_slope, bool):
        raise TypeError(f"{op}: argument 'negative_slope' must be Number, not {type_name(negative_slope)}")
    return slope
