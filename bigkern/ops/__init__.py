"""Registered ops (torch.library), their autograd, fake implementations, and per-backend
implementations with the reasons each cannot serve a call. Importing this package registers them."""

from bigkern.ops import attention, conv, epilogue, lstm

# family name -> module with verification_cases(device, dtype), for `bigkern verify`
FAMILIES = {"epilogue": epilogue, "attention": attention, "lstm": lstm, "conv": conv}
