"""Registered ops (torch.library), their autograd, fake implementations, and per-backend
implementations with the reasons each cannot serve a call. Importing this package registers them."""

from bigkern.ops import epilogue  # noqa: F401
