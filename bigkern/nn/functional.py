"""Drop-in replacements for torch.nn.functional calls, plus bigkern's fused extras."""

from bigkern.ops.attention import scaled_dot_product_attention, varlen_attention
from bigkern.ops.epilogue import bias_act

__all__ = ["bias_act", "scaled_dot_product_attention", "varlen_attention"]
