"""Benchmark cases for conv2d with its fused epilogue, each timing rated against the machine's
roofline (harness.roofline): most layers are compute-bound; depthwise and thin layers are bound
by the bytes they move.

Shapes (bench/shapes.json "conv"): the ResNet-50 layers at batch 32 and 1, and DeepBench-style
layers (VGG, depthwise, the MNIST CNN), channels_last. Each case is the layer's fused chain
y = relu(conv(x) + bias [+ residual]) (the residual where the ResNet layer has one), against:
  torch-eager        the same chain in eager torch: cuDNN conv (with bias), then add, then relu
  torch-eager-conv   cuDNN's conv alone (no bias, no epilogue): a reference point, not a fusion
  torch-compile      torch.compile of the eager chain with mode="max-autotune"; a --quick run
                     uses the default mode instead (max-autotune's tuning takes minutes per shape)
FLOPs = 2*N*K*P*Q*C*R*S/groups for forward, three times that for forward+backward (dgrad + wgrad).
Bytes, the least each must move (io_bytes): forward reads x, w, bias (and the residual), writes y;
the backward reads dy, y (the ReLU's mask), x and w, writes dx, dw, dbias (and the residual's
gradient).
"""

import torch

from bigkern.benchmark.harness import Case, Unavailable
from bigkern.benchmark.providers import bigkern_backends, compiled
from bigkern.ops import conv


def _layers(shapes, quick):
    section = shapes["conv"]
    layers = []
    for batch in section.get("batches", [32, 1]):
        for entry in section["resnet50"]:
            if quick and not entry.get("quick"):
                continue
            layers.append(dict(entry, batch=batch, family="resnet50"))
    for entry in section.get("other", []):
        if quick and not entry.get("quick"):
            continue
        layers.append(dict(entry, family="other"))
    return layers


def _geometry(layer):
    groups = layer.get("groups", 1)
    x_shape = (layer["batch"], layer["in_channels"], layer["in_hw"], layer["in_hw"])
    w_shape = (layer["out_channels"], layer["in_channels"] // groups, layer["kernel"], layer["kernel"])
    stride, padding = layer["stride"], layer["padding"]
    out_hw = (layer["in_hw"] + 2 * padding - layer["kernel"]) // stride + 1
    return x_shape, w_shape, stride, padding, groups, (layer["batch"], layer["out_channels"], out_hw, out_hw)


def io_bytes(x_shape, w_shape, y_shape, residual, size):
    """(forward, backward) bytes of the fused chain, as the module docstring counts them."""
    x, w, y, bias = (torch.Size(s).numel() for s in (x_shape, w_shape, y_shape, w_shape[:1]))
    forward = x + w + bias + y * (2 if residual else 1)
    backward = 2 * x + 2 * w + bias + y * (3 if residual else 2)
    return size * forward, size * backward


def _eager(x, w, b, r, stride, padding, groups):
    y = torch.nn.functional.conv2d(x, w, b, stride, padding, 1, groups)
    if r is not None:
        y = y + r
    return torch.relu(y)


def _conv_alone(x, w, b, r, stride, padding, groups):
    return torch.nn.functional.conv2d(x, w, None, stride, padding, 1, groups)


def _bigkern(x, w, b, r, stride, padding, groups):
    return conv.conv2d(x, w, b, stride, padding, 1, groups, activation="relu", residual=r)


def cases(shapes, device, dtypes, quick=False):
    for layer in _layers(shapes, quick):
        x_shape, w_shape, stride, padding, groups, y_shape = _geometry(layer)
        residual = bool(layer.get("residual"))
        N, K, P, Q = y_shape
        flops = 2.0 * N * K * P * Q * w_shape[1] * w_shape[2] * w_shape[3]
        name = (f"{layer['family']} {layer['name']} n{N} {x_shape[1]}->{K} {w_shape[2]}x{w_shape[3]}/{stride} "
                f"{x_shape[2]}px{' g' + str(groups) if groups > 1 else ''}{' +res' if residual else ''}")
        params = dict(layer=layer["name"], batch=N, input=list(x_shape), weight=list(w_shape), stride=stride,
                      padding=padding, groups=groups, residual=residual, layout="channels_last", activation="relu")
        for dtype in dtypes:
            size = torch.finfo(dtype).bits // 8
            forward_bytes, backward_bytes = io_bytes(x_shape, w_shape, y_shape, residual, size)
            for mode, work, moved in (("forward", flops, forward_bytes),
                                      ("forward+backward", 3 * flops, forward_bytes + backward_bytes)):
                training = mode != "forward"

                def timed(call, wrap=lambda step: step, dtype=dtype, training=training, x_shape=x_shape,
                          w_shape=w_shape, y_shape=y_shape, stride=stride, padding=padding, groups=groups,
                          residual=residual):
                    """Build inputs once; return the function to time (forward, or forward + backward), all
                    of it inside `wrap` (a forced backend: the backward too)."""
                    def make():
                        cl = torch.channels_last
                        x = torch.randn(x_shape, device=device, dtype=dtype).contiguous(memory_format=cl)
                        fan_in = w_shape[1] * w_shape[2] * w_shape[3]
                        w = torch.randn(w_shape, device=device, dtype=dtype) / fan_in**0.5
                        w = w.contiguous(memory_format=cl)
                        b = torch.randn(w_shape[0], device=device, dtype=dtype)
                        r = torch.randn(y_shape, device=device, dtype=dtype).contiguous(memory_format=cl) if residual \
                            else None
                        for t in (x, w, b, r):
                            if t is not None:
                                t.requires_grad_(training)
                        if not training:
                            return wrap(lambda: call(x, w, b, r, stride, padding, groups))
                        grad = torch.randn(y_shape, device=device, dtype=dtype).contiguous(memory_format=cl)

                        def step():
                            for t in (x, w, b, r):
                                if t is not None:
                                    t.grad = None
                            y = call(x, w, b, r, stride, padding, groups)
                            y.backward(grad)
                            return y, [t.grad for t in (x, w, b, r) if t is not None]  # for the check
                        return wrap(step)
                    return make

                providers = {}
                for backend, wrap in bigkern_backends(("triton", "cuda")).items():
                    providers[f"bigkern-{backend}"] = timed(_bigkern, wrap)
                providers["torch-eager"] = timed(_eager)
                providers["torch-eager-conv"] = timed(_conv_alone)
                compile_name = "torch-compile" if quick else "torch-compile-max-autotune"
                providers[compile_name] = timed(compiled(_eager, mode=None if quick else "max-autotune"))
                yield Case("conv", name, params, dtype, mode, flops=work, bytes=moved, providers=providers,
                           baselines=("torch-eager", "torch-eager-conv", compile_name), references=("torch-eager",))


__all__ = ["cases", "Unavailable"]
