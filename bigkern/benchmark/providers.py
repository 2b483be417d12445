"""Provider wrappers shared by every family's suite: bigkern's backends, forced one at a time, and
torch.compile of a baseline."""

import torch

from bigkern import dispatch
from bigkern.benchmark.harness import Unavailable


def bigkern_backends(backends=dispatch.BACKENDS):
    """backend -> wrap(fn): fn run with that backend forced. A backend that cannot serve the case
    raises Unavailable with dispatch's reason (on the untimed first call)."""
    def forced(backend):
        def wrap(fn):
            def call(*args, **kwargs):
                with dispatch.use_backend(backend):
                    try:
                        return fn(*args, **kwargs)
                    except dispatch.UnsupportedError as reason:
                        raise Unavailable(str(reason)) from None
            return call
        return wrap
    return {backend: forced(backend) for backend in backends}


def compiled(fn, mode=None):
    """torch.compile(fn), made on the untimed first call after torch._dynamo.reset(): dynamo keeps
    at most recompile_limit (8) compiles per code object, across torch.compile wrappers, and runs
    it eagerly after that, so without the reset the ninth case of a family would time eager torch
    under the name torch-compile."""
    compiled_fn = []

    def call(*args, **kwargs):
        if not compiled_fn:
            torch._dynamo.reset()
            compiled_fn.append(torch.compile(fn, mode=mode, dynamic=False))
        return compiled_fn[0](*args, **kwargs)
    return call


def with_environment(fn, **variables):
    """fn run with environment variables set for the call (a kernel's before/after switch, such as
    BIGKERN_ATTENTION_SPLIT_KV=0, measured in the same run as the default)."""
    import os

    def call(*args, **kwargs):
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            return fn(*args, **kwargs)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return call

