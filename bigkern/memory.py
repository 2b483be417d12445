"""Output allocation and tensor layout helpers shared by every op.

With poisoning on (BIGKERN_POISON_OUTPUTS=1, or the `poisoned_outputs()` block the tests use), every
output a bigkern op allocates is filled with NaN (integers: their largest value) before the kernel
runs, so an element the kernel forgets to write fails the comparison instead of passing by luck.
Each such output also sits between two guard bands filled with a sentinel; `check_guards()` (run
by the tests after each test) raises if a kernel wrote past either end of an output.
"""

import contextlib
import math
import os

import torch

_poison = [os.environ.get("BIGKERN_POISON_OUTPUTS", "0") not in ("", "0")]
GUARD_ELEMENTS = 256
_SENTINEL = -12345.0
# (whole buffer, output span, what it was for): held until the next check, so that even an output
# freed before then (a scratch buffer) gets checked.
_guarded = []
_MAX_HELD = 4096


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    _poison.append(enabled)
    try:
        yield
    finally:
        _poison.pop()


def _poison_value(dtype):
    if dtype.is_floating_point or dtype.is_complex:  # (torch's CPU paths serve complex calls)
        return complex(math.nan, math.nan) if dtype.is_complex else math.nan
    return True if dtype == torch.bool else torch.iinfo(dtype).max


def _sentinel(dtype):
    if dtype.is_floating_point or dtype.is_complex:
        return complex(_SENTINEL, _SENTINEL) if dtype.is_complex else _SENTINEL
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def empty_strided(shape, stride, *, dtype, device):
    if not _poison[-1]:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    span = 1 + sum((size - 1) * st for size, st in zip(shape, stride)) if all(shape) else 0
    buffer = torch.empty(span + 2 * GUARD_ELEMENTS, dtype=dtype, device=device)
    buffer.fill_(_sentinel(dtype))
    # the buffer's storage, but not a view of it (as_strided would be one): autograd must see a fresh
    # tensor, which callers may modify in place as they may torch's outputs
    out = torch.empty(0, dtype=dtype, device=device).set_(buffer.untyped_storage(), GUARD_ELEMENTS, shape, stride)
    out.fill_(_poison_value(dtype))
    if len(_guarded) >= _MAX_HELD:
        check_guards()
    _guarded.append((buffer, span, f"{tuple(shape)} {dtype} output"))
    return out


def contiguous_strides(shape) -> tuple:
    """The strides torch gives a contiguous tensor of `shape`."""
    stride, step = [], 1
    for size in reversed(tuple(shape)):
        stride.insert(0, step)
        step *= max(size, 1)
    return tuple(stride)


def empty(shape, *, dtype, device):
    return empty_strided(tuple(shape), contiguous_strides(shape), dtype=dtype, device=device)


def empty_like(t, **kwargs):
    if not _poison[-1]:
        return torch.empty_like(t, **kwargs)
    template = torch.empty_like(t, device="meta", **kwargs)
    return empty_strided(template.shape, template.stride(), dtype=template.dtype, device=t.device)


def check_guards():
    """Raise if any output allocated since the last check was written out of bounds."""
    broken = []
    for buffer, span, what in _guarded:
        sentinel = torch.tensor(_sentinel(buffer.dtype), dtype=buffer.dtype, device=buffer.device)
        guards = torch.cat([buffer[:GUARD_ELEMENTS], buffer[GUARD_ELEMENTS + span:]])
        if not torch.equal(guards, sentinel.expand_as(guards)):
            broken.append(what)
    _guarded.clear()
    if broken:
        raise AssertionError(f"a kernel wrote out of bounds of: {', '.join(broken)}")


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a block of storage exactly, in some order of its dimensions
    (contiguous, channels_last, any transpose), so a kernel can walk its storage as a flat array."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when dense, else a dense copy in t's order of dimensions (torch's elementwise ops lay
    their outputs out so: a sliced channels_last tensor gives a channels_last one)."""
    if is_dense(t):
        return t
    copy = torch.empty_like(t, memory_format=torch.preserve_format)
    return copy.copy_(t)
