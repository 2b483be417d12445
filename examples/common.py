"""Shared by the examples: train a model with and without bigkern from the same seed, print both
loss curves side by side and the throughput of each."""

import argparse
import copy
import time

import torch

import bigkern
from bigkern.patch import patched_modules


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _floating_dtype(name):
    """A torch floating-point dtype of 16 bits or more by any of its names (float32, float, half, ...)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:  # (no float8 math)
        raise argparse.ArgumentTypeError(f"not a torch floating-point dtype of 16 bits or more: {name!r}")
    return name


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=_positive, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=_floating_dtype,
                        default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--print-every", type=_positive, default=25)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (for a quick check on the CPU)")
    return parser.parse_args()


def train(model, make_batch, loss_fn, steps, device, dtype, seed=0, lr=1e-2):
    """(losses, seconds per step) of `steps` SGD steps on fresh synthetic batches."""
    torch.manual_seed(seed)
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, start = [], None
    for step in range(steps):
        if step == min(5, steps - 1):  # after warm-up (compilation, autotuning)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        inputs, targets = make_batch(device, dtype)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    timed = steps - min(5, steps - 1)
    return losses, (time.perf_counter() - start) / max(timed, 1)


def compare(name, model, make_batch, loss_fn, batch, args):
    dtype = getattr(torch, args.dtype)
    plain = copy.deepcopy(model)
    patched = bigkern.patch(copy.deepcopy(model))
    swapped = patched_modules(patched)
    print(f"{name} on {args.device} in {args.dtype}; bigkern swapped {len(swapped)} module(s): "
          + ", ".join(sorted({type(m).__name__ for _, m in swapped})))
    losses_torch, step_torch = train(plain, make_batch, loss_fn, args.steps, args.device, dtype)
    losses_bigkern, step_bigkern = train(patched, make_batch, loss_fn, args.steps, args.device, dtype)
    print(f"{'step':>6} {'torch loss':>12} {'bigkern loss':>13}")
    for step in sorted(set(range(0, args.steps, args.print_every)) | {args.steps - 1}):
        print(f"{step:>6} {losses_torch[step]:>12.4f} {losses_bigkern[step]:>13.4f}")
    print(f"throughput: torch {batch / step_torch:,.0f} samples/s, bigkern {batch / step_bigkern:,.0f} samples/s "
          f"({step_torch / step_bigkern:.2f}x)")
    return losses_torch, losses_bigkern
