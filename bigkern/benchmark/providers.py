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
    """torch.compile(fn); compilation happens on the untimed first call."""
    compiled_fn = torch.compile(fn, mode=mode, dynamic=False)
    return compiled_fn
