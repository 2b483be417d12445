"""Drop-in replacements for torch.nn modules."""

from bigkern.nn import functional  # noqa: F401
