"""Drop-in torch.nn.Conv2d, and the fused convolution `bigkern.fuse` builds.

`Conv2d` is torch's module with torch's constructor, parameters and state_dict; only the
computation differs (bigkern's implicit-GEMM kernels). It keeps no state of its own, so
`bigkern.patch` can turn a torch.nn.Conv2d into one by swapping its class.

`FusedConv2d` is a Conv2d that also applies an activation, with an optional residual added first:
    y = act(conv2d(x, weight) + bias + residual)
in one kernel. It is what `bigkern.fuse(model)` puts in place of conv -> batch norm -> activation
-> residual-add chains (the batch norm folded into weight and bias).
"""

from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from bigkern.nn import functional, register_drop_in
from bigkern.ops import conv as conv_ops
from bigkern.ops.checks import check_negative_slope
from bigkern.ops.epilogue import activation_code, torch_activation


def _conv2d(input, weight, bias, stride, padding, dilation, groups, activation, residual, negative_slope):
    return functional.conv2d(input, weight, bias, stride, padding, dilation, groups, activation=activation,
                             residual=residual, negative_slope=negative_slope)


# torch.fx traces into bigkern's modules (they are not torch.nn's leaves): it records this call as
# one node, as it records F.conv2d in torch's Conv2d, so a traced patched model still runs bigkern's
torch.fx.wrap("_conv2d")


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d computed by bigkern's kernels (same constructor, parameters and state_dict).

    padding_mode other than 'zeros' pads the input first (as torch does), then convolves.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], *, activation=None,
                      residual=None, negative_slope=0.01) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups, activation, residual,
                       negative_slope)


register_drop_in(torch.nn.Conv2d, Conv2d)


class FusedConv2d(Conv2d):
    """act(conv2d(x) + bias + residual) in one kernel: Conv2d's constructor plus `activation`
    ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "leaky_relu" or None) and
    `negative_slope`. forward(input, residual=None).

    A residual that cannot be fused -- another dtype or device, or a shape the output would be
    broadcast up to -- takes the unfused path (conv, then torch's add and activation), so the
    result is always what the unfused composition gives. `residual_first = True` stands for
    act(residual + conv2d(x)): the same values, in the residual's layout as torch's add gives it (the
    fused kernel writes the conv's, so a residual laid out otherwise takes the unfused path).
    """

    def __init__(self, *args, activation: Optional[str] = None, negative_slope: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        activation_code(activation)  # validate
        self.activation = activation
        self.negative_slope = check_negative_slope(negative_slope, "FusedConv2d()")

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, batch_norm: Optional[torch.nn.BatchNorm2d] = None,
                  activation: Optional[str] = None, negative_slope: float = 0.01) -> "FusedConv2d":
        """A FusedConv2d computing act(batch_norm(conv(x)) + residual); batch_norm (in eval mode,
        with running statistics) is folded into the weight and bias."""
        has_bias = conv.bias is not None or batch_norm is not None
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, has_bias, conv.padding_mode, activation=activation, negative_slope=negative_slope,
                    device="meta")
        fused.train(conv.training)
        if batch_norm is None:  # the conv's own parameters: an optimizer holding them, and ties, stay intact
            fused.weight, fused.bias = conv.weight, conv.bias
            return fused
        if batch_norm.training or batch_norm.running_mean is None:
            raise ValueError("FusedConv2d.from_conv: batch_norm must be in eval mode with running statistics")
        weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, batch_norm.running_mean, batch_norm.running_var, batch_norm.eps,
            batch_norm.weight, batch_norm.bias)
        fused.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=conv.weight.requires_grad)
        bias_source = conv.bias if conv.bias is not None else conv.weight
        fused.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias_source.requires_grad)
        # the statistics are frozen into the weights: right while the batch norm would be in eval
        # mode. Folded in an eval-mode model, training mode later would need batch statistics; so
        # would a later .train() of a model fused in training mode (the batch norm frozen in eval)
        fused.folded_batch_norm_in_eval_model = not conv.training
        fused.folded_batch_norm_would_train = False
        return fused

    def train(self, mode: bool = True):
        if hasattr(self, "folded_batch_norm_would_train"):  # the batch norm would follow the model's mode
            self.folded_batch_norm_would_train = mode
        return super().train(mode)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.training and (getattr(self, "folded_batch_norm_in_eval_model", False)
                              or getattr(self, "folded_batch_norm_would_train", False)):
            raise RuntimeError("FusedConv2d: this conv folded a BatchNorm2d's running statistics (bigkern.fuse of a "
                               "model in eval mode, or of a frozen batch norm in eval mode switched by .train() "
                               "since); in training mode that batch norm would normalize with batch statistics and "
                               "update its running ones, which folded weights cannot. Fuse the training model "
                               "instead (its trainable batch norms stay separate), or use this one in eval mode")
        activation = getattr(self, "activation", None)
        negative_slope = getattr(self, "negative_slope", 0.01)
        if residual is None or self._fusable(input, residual):
            return self._conv_forward(input, self.weight, self.bias, activation=activation, residual=residual,
                                      negative_slope=negative_slope)
        y = self._conv_forward(input, self.weight, self.bias)
        y = residual + y if getattr(self, "residual_first", False) else y + residual
        return torch_activation(y, activation_code(activation), negative_slope)

    def _fusable(self, input: Tensor, residual) -> bool:
        if not isinstance(residual, Tensor) or not isinstance(input, Tensor):
            return False
        if residual.dtype != input.dtype or residual.device != input.device or input.dim() not in (3, 4):
            return False
        shape = self._output_shape(input)
        if getattr(self, "residual_first", False):
            # the fused output takes the conv's layout (torch's rule, on the input as given: another
            # padding mode pads it first, which may change it); torch's `residual + y` the residual's
            if self.padding_mode != "zeros" or input.dim() != 4 or tuple(residual.shape) != tuple(shape):
                return False
            strides = conv_ops.dense_strides(shape, conv_ops.output_channels_last(input, self.weight))
            return conv_ops.same_storage_order(residual, residual.new_empty_strided(shape, strides, device="meta"))
        try:
            return tuple(torch.broadcast_shapes(residual.shape, shape)) == tuple(shape)
        except RuntimeError:
            return False

    def _output_shape(self, input):
        # the attributes as the conv reads them: ints are pairs (torch's Conv2d takes `conv.padding = 1`),
        # the kernel is the weight's
        hw, kernel = tuple(input.shape[-2:]), tuple(self.weight.shape[2:])
        stride, dilation = _pair(self.stride), _pair(self.dilation)
        if self.padding_mode != "zeros":
            pads = self._reversed_padding_repeated_twice
            hw = (hw[0] + pads[2] + pads[3], hw[1] + pads[0] + pads[1])
            padding = (0, 0, 0, 0)
        elif isinstance(self.padding, str):
            padding = conv_ops._resolve_padding(self.padding, kernel, stride, dilation)
        else:
            padding = _pair(self.padding) * 2
        pq = conv_ops.output_size(hw, kernel, stride, padding, dilation)
        return tuple(input.shape[:-3]) + (self.out_channels,) + pq

    def extra_repr(self):
        text = super().extra_repr()
        activation = getattr(self, "activation", None)
        if activation is not None:
            text += f", activation={activation!r}"
            if activation.lower() == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        return text
