"""Drop-in replacements for torch.nn.functional calls, plus bigkern's fused extras."""

from bigkern.ops.conv import conv2d
from bigkern.ops.epilogue import bias_act

__all__ = ["bias_act", "conv2d"]
