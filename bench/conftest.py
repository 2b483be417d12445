"""pytest bench/: without a GPU, Triton's kernels run in its interpreter (set before triton loads)."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
