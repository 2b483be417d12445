"""Benchmark cases for the fused bias + activation epilogue: a memory-bound op, so its figure of
merit is GB/s against the device-copy ceiling. Bytes counted, per element of x (the bias is
negligible): read x, write y (forward, 2); read grad_y and x, write grad_x (backward, 3)."""

import torch

from bigkern.benchmark.harness import Case, Unavailable
from bigkern.benchmark.providers import bigkern_backends, compiled
from bigkern.ops import epilogue


def _inputs(shape, dim, layout, dtype, device, requires_grad):
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(shape[dim], device=device, dtype=dtype)
    return x.requires_grad_(requires_grad), bias.requires_grad_(requires_grad)


def _eager(x, bias, activation, dim):
    return epilogue.reference(x, bias, activation, dim)


def cases(shapes, device, dtypes, quick=False):
    entries = shapes["epilogue"]["cases"]
    if quick:
        entries = [e for e in entries if e.get("quick")]
    for entry in entries:
        shape, dim, layout, activation = tuple(entry["shape"]), entry["dim"], entry["layout"], entry["activation"]
        for dtype in dtypes:
            numel = torch.Size(shape).numel()
            size = torch.finfo(dtype).bits // 8
            params = dict(shape=list(shape), dim=dim, layout=layout, activation=activation)
            name = f"{activation} {'x'.join(map(str, shape))} {layout}"
            for mode, bytes_moved in (("forward", 2 * numel * size), ("forward+backward", 5 * numel * size)):
                training = mode != "forward"

                def timed(call, wrap=lambda step: step, shape=shape, dim=dim, layout=layout, dtype=dtype,
                          training=training):
                    """Build inputs once; return the function to time: call(x, bias), then backward, all of
                    it inside `wrap` (a forced backend: the backward too)."""
                    def make():
                        x, bias = _inputs(shape, dim, layout, dtype, device, training)
                        grad = torch.randn_like(x)
                        if not training:
                            return wrap(lambda: call(x, bias))

                        def step():
                            x.grad = bias.grad = None
                            y = call(x, bias)
                            y.backward(grad)
                            return y, x.grad, bias.grad  # for the check against the reference
                        return wrap(step)
                    return make

                providers = {}
                for backend, wrap in bigkern_backends(("triton", "cuda")).items():
                    providers[f"bigkern-{backend}"] = timed(
                        lambda x, b, activation=activation, dim=dim: epilogue.bias_act(x, b, activation, dim=dim), wrap)
                providers["torch-eager"] = timed(lambda x, b, activation=activation, dim=dim: _eager(x, b, activation, dim))
                providers["torch-compile"] = timed(compiled(
                    lambda x, b, activation=activation, dim=dim: _eager(x, b, activation, dim)))
                yield Case("epilogue", name, params, dtype, mode, flops=0.0, bytes=bytes_moved,
                           providers=providers, baselines=("torch-eager", "torch-compile"), references=("torch-eager",))


__all__ = ["cases", "Unavailable"]
