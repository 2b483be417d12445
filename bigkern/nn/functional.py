"""Drop-in replacements for torch.nn.functional calls, plus bigkern's fused extras."""

from bigkern.ops.attention import scaled_dot_product_attention, varlen_attention, varlen_attn, varlen_attn_out
from bigkern.ops.conv import conv2d
from bigkern.ops.epilogue import bias_act
from bigkern.ops.lstm import lstm, lstm_cell, lstm_layer

__all__ = ["bias_act", "conv2d", "lstm", "lstm_cell", "lstm_layer", "scaled_dot_product_attention", "varlen_attention",
           "varlen_attn", "varlen_attn_out"]
