"""Drop-in replacements for torch.nn.functional calls, plus bigkern's fused extras."""

from bigkern.ops.epilogue import bias_act
from bigkern.ops.lstm import lstm, lstm_cell, lstm_layer

__all__ = ["bias_act", "lstm", "lstm_cell", "lstm_layer"]
