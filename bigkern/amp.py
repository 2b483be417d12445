"""Autocast and TF32: torch's mixed-precision settings, applied by bigkern's entry points.

Custom ops are opaque to autocast, so each entry point applies torch's policy itself before calling
its op: convolution, LSTM and attention are on autocast's lower-precision list (their floating
inputs are cast to the autocast dtype); pointwise ops such as bias_act run in their input dtype.
"""

import torch

_TF32_SETTINGS = {  # kind -> (torch's legacy flag, torch's newer fp32_precision setting or None)
    "matmul": (lambda: torch.backends.cuda.matmul.allow_tf32,
               lambda: getattr(torch.backends.cuda.matmul, "fp32_precision", None)),
    "conv": (lambda: torch.backends.cudnn.allow_tf32,
             lambda: getattr(torch.backends.cudnn.conv, "fp32_precision", None)),
}


def tf32_allowed(kind: str) -> bool:
    """Whether torch lets float32 matmuls ("matmul") or convolutions ("conv") use TF32. Read from
    the newer `fp32_precision` setting, which follows the legacy flags too ("tf32" once allow_tf32
    is set; "none" or "ieee" otherwise): once a program used the newer setting, torch raises on a
    read of the legacy flag (and a raise per call costs ~30 us). The legacy flag where torch has
    no newer setting."""
    legacy, newer = _TF32_SETTINGS[kind]
    precision = newer()
    return bool(legacy()) if precision is None else precision == "tf32"


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for devices autocast does not know (meta:
    shape inference, where torch's ops run and asking would raise)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_dtype(*tensors):
    """The dtype autocast would run a lower-precision op in for these tensors, or None."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            device_type = t.device.type
            if autocast_enabled(device_type):
                return torch.get_autocast_dtype(device_type)
            return None
    return None


def cast_inputs(*tensors):
    """tensors, with floating ones cast to the autocast dtype when autocast is on (None passes).
    float64 is left as it is: torch's autocast never casts it."""
    dtype = autocast_dtype(*tensors)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if is_castable(t) else t for t in tensors)


def is_castable(t) -> bool:
    """Whether autocast casts this argument of a lower-precision op: a floating tensor, not float64."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
