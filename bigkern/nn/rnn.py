"""Drop-in torch.nn.LSTM and torch.nn.LSTMCell on bigkern's fused recurrence.

Same constructor, parameters, state_dict and return values as torch's; only forward differs: every
layer and direction is one input-projection GEMM plus the `bigkern::lstm_layer` op (fused Triton
step kernels, or the persistent CUDA kernel), with multi-layer, bidirectional, dropout,
batch_first, unbatched input and PackedSequence handled here exactly as torch does. Everything is
read from torch's own attributes, so a torch module whose class is swapped (bigkern.patch) works.

torch.compile: Dynamo refuses to trace any torch.nn.LSTM instance, subclasses included, unless
`torch._dynamo.config.allow_rnn = True`; with it, this module traces into one opaque op per layer
and direction (fullgraph). LSTMCell and the functional API need nothing.
"""

import torch
from torch.nn.utils.rnn import PackedSequence

from bigkern import dispatch
from bigkern.nn import register_drop_in
from bigkern.ops import lstm as ops


class LSTM(torch.nn.LSTM):
    __doc__ = "bigkern's drop-in for torch.nn.LSTM (fused kernels).\n\n" + (torch.nn.LSTM.__doc__ or "")

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_bigkern_original_class" in self.__dict__:
            # a copy of a patched LSTM (deepcopy, pickle, torch.save) is one more patched LSTM: it
            # needs dynamo's allow_rnn as long as it lives, as the original did
            from bigkern.patch import _let_dynamo_trace_rnn_modules

            _let_dynamo_trace_rnn_modules(self)

    def _weights(self):
        update = getattr(self, "_update_flat_weights", None)  # torch >= 2.1 tracks functional_call swaps
        if update is not None:
            update()
        return self._flat_weights

    def _check_packed(self, data, batch_sizes, hx, weights):
        # torch checks packed input in C++ (RuntimeError for every mismatch), after permuting hx; under
        # autocast, as in its check_input, dtypes may differ (the op casts them)
        if data.dtype != weights[0].dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(f"LSTM: input dtype ({data.dtype}) does not match weight dtype ({weights[0].dtype})")
        self.check_input(data, batch_sizes)
        if hx is not None:
            self.check_hidden_size(hx[0], self.get_expected_hidden_size(data, batch_sizes),
                                   "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hx[1], self.get_expected_cell_size(data, batch_sizes),
                                   "Expected hidden[1] size {}, got {}")

    def forward(self, input, hx=None):
        if ops.is_complex_call(input):
            return dispatch.served_by_torch("lstm", ops.COMPLEX_REASON, super().forward, input, hx)
        weights = self._weights()
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is None and isinstance(batch_sizes, torch.Tensor) and (
                    batch_sizes.is_floating_point() or batch_sizes.dim() != 1):
                # torch.nn.LSTM sizes its zero state by batch_sizes[0] before anything checks it
                raise TypeError("zeros(): argument 'size' failed to unpack the object at pos 2 with error \"type "
                                "must be tuple of ints,but got Tensor\" (argument 'batch_sizes' of the "
                                "PackedSequence must be a 1-d int64 tensor)")
            ops.packed_batch_sizes(batch_sizes, data.shape[0] if data.dim() else 0, "lstm")
            ops._check_packed_hx_dims(hx, "lstm")
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
            self._check_packed(data, batch_sizes, hx, weights)
            output, h_n, c_n = ops.lstm(data, batch_sizes, hx, weights, self.bias, self.num_layers,
                                        float(self.dropout), self.training, self.bidirectional)
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden((h_n, c_n), unsorted_indices)

        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None:
            want = 3 if batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D input, hx and cx should also be 3-D" if batched else \
                    "unbatched 2-D input, hx and cx should also be 2-D"
                raise RuntimeError(f"For {kind} but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, None)
        else:
            self.check_input(input, None)
        output, h_n, c_n = ops.lstm(input, hx, weights, self.bias, self.num_layers, float(self.dropout),
                                    self.training, self.bidirectional, self.batch_first)
        if not batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)


class LSTMCell(torch.nn.LSTMCell):
    __doc__ = "bigkern's drop-in for torch.nn.LSTMCell (one fused step).\n\n" + (torch.nn.LSTMCell.__doc__ or "")

    def forward(self, input, hx=None):
        if ops.is_complex_call(input):
            return dispatch.served_by_torch("lstm_cell", ops.COMPLEX_REASON, super().forward, input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


register_drop_in(torch.nn.LSTM, LSTM)
register_drop_in(torch.nn.LSTMCell, LSTMCell)
