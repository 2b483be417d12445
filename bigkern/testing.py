"""Verification helpers shared by the tests, `bigkern verify` and the GPU check.

The rule (FlashAttention's): against a float64 reference, a kernel's largest error may be at most
`factor` times the largest error of PyTorch's own computation in the same dtype (2x for outputs,
3x for gradients), plus a small floor in units of the dtype's epsilon at the reference's largest
magnitude: half a unit for 16-bit types (the rounding of the output itself, which no kernel can
beat), a few for fp32 (where a GPU's fast exp may lose an ulp or two that torch's does not).
NaN and Inf must appear exactly where the reference has them.
"""

import dataclasses
import os
import random
from typing import Optional, Sequence

import torch

OUTPUT_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


def default_floor_ulps(dtype: torch.dtype) -> float:
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The Triton 3.x interpreter truncates fp32 -> bf16 casts instead of rounding to nearest
        # (measured: about half of random values land one ulp low); GPUs round. Allow that ulp.
        return 1.0
    return 0.5 if torch.finfo(dtype).bits <= 16 else 4.0


@dataclasses.dataclass
class Comparison:
    name: str
    error: float  # max |actual - reference| over finite reference elements
    torch_error: float  # the same for PyTorch's own computation in the same dtype
    bound: float
    ok: bool
    detail: str = ""

    def __str__(self):
        status = "ok" if self.ok else "FAIL"
        return (f"{self.name}: {status} error {self.error:.3g} vs torch {self.torch_error:.3g} "
                f"(bound {self.bound:.3g}){' ' + self.detail if self.detail else ''}")


def _max_abs_error(actual, reference, finite):
    if not finite.any():
        return 0.0
    return (actual.double() - reference)[finite].abs().max().item()


def _same_value(x, y):
    """Elementwise: equal, or both NaN (so +-Inf must match in sign)."""
    return (x == y) | (torch.isnan(x) & torch.isnan(y))


def compare(actual: torch.Tensor, reference: torch.Tensor, torch_result: torch.Tensor, *, name: str = "output",
            factor: float = OUTPUT_FACTOR, floor_ulps: Optional[float] = None,
            scale: Optional[float] = None) -> Comparison:
    """Compare `actual` and PyTorch's same-dtype `torch_result` against a float64 `reference`.

    `scale` is the magnitude the floor is measured in; by default the reference's largest. A sum
    whose terms cancel should pass the magnitude of its terms (sum of |terms|): its rounding error
    scales with them, not with the small result.
    """
    reference = reference.detach().double().cpu()
    actual = actual.detach().cpu()
    torch_result = torch_result.detach().cpu()
    for what, tensor in (("", actual), ("torch's result: ", torch_result)):
        if tensor.shape != reference.shape:
            return Comparison(name, float("inf"), 0.0, 0.0, False,
                              f"{what}shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}")
    if actual.dtype != torch_result.dtype:
        return Comparison(name, float("inf"), 0.0, 0.0, False,
                          f"dtype {actual.dtype}, where torch's own computation gives {torch_result.dtype}")
    finite = torch.isfinite(reference)
    actual64, torch64 = actual.double(), torch_result.double()
    actual_finite, torch_finite = torch.isfinite(actual64), torch.isfinite(torch64)
    error = _max_abs_error(actual, reference, finite & actual_finite)
    torch_error = _max_abs_error(torch_result, reference, finite & torch_finite)
    eps = torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
    ulps = floor_ulps if floor_ulps is not None else (default_floor_ulps(actual.dtype) if eps else 0.0)
    if scale is None:
        scale = reference[finite].abs().max().item() if finite.any() else 0.0
    bound = factor * torch_error + ulps * eps * scale
    # Where the reference is finite, a result must be finite (a poisoned, unwritten element is NaN)
    # and within the bound -- or torch's own non-finite value there (fp16 overflowing past 65504).
    as_torch_overflows = _same_value(actual64, torch64) & ~torch_finite
    stray = (finite & ~actual_finite & ~as_torch_overflows).sum().item()
    # Where it is not (NaN, +-Inf), a result must be that value, or what torch gives where torch
    # departs from the math (fp32 gelu(+inf) is NaN on some CPUs): its non-finite value exactly, its
    # finite one within the bound.
    near_torch = torch_finite & actual_finite & ((actual64 - torch64).abs() <= bound)
    special_wrong = (~finite & ~(_same_value(actual64, reference) | as_torch_overflows | near_torch)).sum().item()
    detail = ""
    if stray:
        detail = f"{stray} non-finite element(s) where the reference is finite (unwritten output?)"
    elif special_wrong:
        detail = f"{special_wrong} element(s) where the reference is NaN/Inf: neither its value nor torch's"
    ok = error <= bound and not special_wrong and not stray
    return Comparison(name, error, torch_error, bound, ok, detail)


def assert_close(actual, reference, torch_result, *, name="output", factor=OUTPUT_FACTOR, floor_ulps=None,
                 scale=None):
    result = compare(actual, reference, torch_result, name=name, factor=factor, floor_ulps=floor_ulps, scale=scale)
    assert result.ok, str(result)
    return result


def assert_gradients_close(actual: Sequence, reference: Sequence, torch_result: Sequence, names: Sequence[str],
                           factor: float = GRADIENT_FACTOR, scales: Optional[Sequence] = None):
    scales = scales if scales is not None else [None] * len(names)
    for a, r, t, n, s in zip(actual, reference, torch_result, names, scales):
        if r is None:
            assert a is None, f"{n}: expected no gradient"
            continue
        assert a is not None, f"{n}: gradient missing"
        assert_close(a, r, t, name=f"grad {n}", factor=factor, scale=s)


# ---------------------------------------------------------------------------------------------
# Inputs.

def seed_everything(seed: Optional[int] = None) -> int:
    """Seed torch and random with a fresh seed (or the given one); returns it for the failure message."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


def make_tensor(shape, dtype=torch.float32, device="cpu", *, layout="contiguous", scale=1.0,
                requires_grad=False) -> torch.Tensor:
    """Random normal values (never zeros) in one of several memory layouts:
    "contiguous", "channels_last" (4-d), "transposed" (last two dims swapped in storage),
    "strided" (every other element of a larger buffer: not dense)."""
    shape = tuple(shape)
    if layout == "strided" and len(shape):
        big = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, device=device) * scale
        t = big.to(dtype)[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:
        t = (torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64, device=device) * scale)
        t = t.to(dtype).transpose(-1, -2)
    else:
        t = (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)
        if layout == "channels_last" and len(shape) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def fp64_copy(t: Optional[torch.Tensor], requires_grad=None) -> Optional[torch.Tensor]:
    """A float64 CPU leaf copy of t (keeping its requires_grad unless told otherwise)."""
    if t is None:
        return None
    rg = t.requires_grad if requires_grad is None else requires_grad
    return t.detach().double().cpu().requires_grad_(rg)


def same_dtype_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A leaf copy of t, same dtype, device and layout, for PyTorch's own computation."""
    if t is None:
        return None
    return t.detach().clone().requires_grad_(t.requires_grad)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
