"""Drop-in replacements for torch.nn modules.

Each drop-in subclasses its torch module with the identical constructor and state, and registers
itself here, so `bigkern.patch(model)` can swap a torch instance's class in place.
"""

from bigkern.nn import functional  # noqa: F401

# torch module class -> bigkern drop-in class, filled by each family's module file
DROP_INS: dict = {}


def register_drop_in(torch_class, bigkern_class):
    if not issubclass(bigkern_class, torch_class):
        raise TypeError(f"{bigkern_class.__name__} must subclass {torch_class.__name__}")
    DROP_INS[torch_class] = bigkern_class
    return bigkern_class


from bigkern.nn.attention import MultiheadAttention, TransformerDecoderLayer, TransformerEncoderLayer  # noqa: E402
from bigkern.nn.rnn import LSTM, LSTMCell  # noqa: E402,F401  (registers the drop-ins)
from bigkern.nn.conv import Conv2d, FusedConv2d  # noqa: E402,F401
