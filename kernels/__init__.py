"""bigkern's Triton kernels, one module per family (installed as bigkern.kernels).

Each module holds the @triton.jit kernels of one idea, the math in comments beside the code, and
thin launchers that take tensors already validated and laid out by bigkern.ops.
"""
