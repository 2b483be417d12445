"""The one dispatch seam: which implementation serves a call, and why.

Every op has named implementations -- `triton`, `cuda` (bigkern._C) and `torch` (a pure-PyTorch
reference) -- and each one can say why it cannot serve a given call. The requested backend comes
from `use_backend(...)` (innermost wins) or else the BIGKERN_BACKEND environment variable:

  auto    the first implementation, in the op's order of speed, that can serve; CPU tensors take
          torch. Implementations not yet verified on a GPU are skipped.
  triton | cuda | torch
          exactly that implementation, or UnsupportedError with its reason. Never a fallback.

Selection runs inside the registered op's body, at run time, so torch.compile sees one opaque op
and a backend switch needs no recompilation.
"""

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Callable, Optional

import torch
from torch.autograd import forward_ad

from bigkern import _ext

BACKENDS = ("triton", "cuda", "torch")
REQUESTS = ("auto",) + BACKENDS
ENV_VAR = "BIGKERN_BACKEND"


class UnsupportedError(RuntimeError):
    """A forced backend cannot serve this call (the message says why)."""


# Process-wide, like torch.nn.attention.sdpa_kernel: autograd runs CUDA backward passes on its own
# threads, and they must see the backend the forward pass was asked for.
_requests: list = []


def _check_request(name, source):
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a str, one of {', '.join(REQUESTS)}, not {type(name).__name__}")
    normalized = name.strip().lower()
    if normalized not in REQUESTS:
        raise ValueError(f"{source} must be one of {', '.join(REQUESTS)}, not {name!r}")
    return normalized


def requested_backend() -> str:
    """The backend requested for calls made now: the innermost use_backend, else BIGKERN_BACKEND."""
    if _requests:
        return _requests[-1][0]
    return _check_request(os.environ.get(ENV_VAR, "").strip() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str):
    """Force (or with "auto", un-force) the backend for calls made inside the block. Process-wide,
    like torch's sdpa_kernel: other threads see it while the block is open; blocks may end in any
    order (the latest one still open wins)."""
    name = _check_request(name, "use_backend(name)")
    entry = [name]  # this block's own entry: leaving removes it, not whichever is last
    _requests.append(entry)
    try:
        yield
    finally:
        _remove_by_identity(_requests, entry)


# ---------------------------------------------------------------------------------------------
# Reasons shared by every op's implementations.

def _devices(tensors):
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def _launch_device(values):
    """The GPU a Triton launch must run on: its first CUDA tensor's. Triton launches on the current
    device and its stream, so inputs on another GPU (model parallelism, device_map="auto") would
    otherwise fail ("cannot be accessed from Triton") or, with peer access, run unordered with
    their stream. (The C++ ops set the device themselves.)"""
    for t in values:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return t.device
    return None


# CUDA allows at most 65535 programs along a grid's second and third dimensions
GRID_YZ_LIMIT = 65535


def grid_reason(programs: int, what: str) -> Optional[str]:
    """Why a Triton launch cannot put `programs` (`what`: heads, groups, ...) along a grid's second
    or third dimension, or None."""
    if programs > GRID_YZ_LIMIT:
        return f"{what} = {programs}: the Triton kernels launch them along a grid dimension CUDA limits to {GRID_YZ_LIMIT}"
    return None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORT_ERROR = None


def triton_unavailable() -> Optional[str]:
    """Why Triton cannot run at all, or None."""
    global _TRITON_IMPORT_ERROR
    if _TRITON_IMPORT_ERROR is None:
        try:
            import triton  # noqa: F401
            _TRITON_IMPORT_ERROR = ""
        except ImportError as error:
            _TRITON_IMPORT_ERROR = f"triton is not importable ({error})"
    return _TRITON_IMPORT_ERROR or None


@functools.lru_cache(maxsize=None)
def _triton_imported_for_the_interpreter() -> bool:
    """The mode Triton's library was made for; fixed from its import on (every dispatch asks)."""
    import triton.language as tl

    return type(tl.cdiv).__name__ == "InterpretedFunction"


def triton_mode_mismatch() -> Optional[str]:
    """Triton makes its own library functions (tl.cdiv, tl.zeros, ...) for the interpreter or for
    compiled kernels when it is imported; TRITON_INTERPRET switched afterwards leaves kernels that
    cannot launch. Why, or None."""
    interpreted = _triton_imported_for_the_interpreter()
    if interpreted == triton_interpreter_enabled():
        return None
    if interpreted:
        return ("Triton was imported with TRITON_INTERPRET=1 and it is unset now: compiled kernels need it "
                "unset before torch (which imports Triton) is imported")
    return ("TRITON_INTERPRET=1 was set after Triton was imported (torch imports it with bigkern): set it "
            "before importing torch")


def _capability_reason(tensors, backend, minimum=(8, 0)):
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            capability = torch.cuda.get_device_capability(t.device)
            if capability < minimum:
                return (f"{backend} kernels need compute capability {minimum[0]}.{minimum[1]}+, "
                        f"{torch.cuda.get_device_name(t.device)} has {capability[0]}.{capability[1]}")
    return None


def layout_reason(*tensors) -> Optional[str]:
    """Why kernels that index memory by strides cannot take these tensors (sparse, oneDNN), or None."""
    layouts = sorted({str(t.layout) for t in tensors if isinstance(t, torch.Tensor) and t.layout != torch.strided})
    return f"bigkern's kernels take strided tensors, not {', '.join(layouts)}" if layouts else None


def triton_unsupported(*tensors) -> Optional[str]:
    """Why the Triton kernels cannot take these tensors (device, toolchain, layout), or None."""
    reason = triton_unavailable() or layout_reason(*tensors)
    if reason:
        return reason
    devices = _devices(tensors)
    if len(devices) > 1:
        return f"tensors are on several device types ({', '.join(sorted(devices))})"
    if devices == {"cpu"}:
        if not triton_interpreter_enabled():
            return "Triton kernels run on CPU tensors only in the interpreter (TRITON_INTERPRET=1)"
        return triton_mode_mismatch()
    if devices - {"cuda", "cpu"}:
        return f"Triton kernels run on CUDA tensors, not {', '.join(sorted(devices))}"
    if triton_interpreter_enabled():
        return "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
    return triton_mode_mismatch() or _capability_reason(tensors, "Triton")


def triton_dot_unsupported(*tensors) -> Optional[str]:
    """For kernels built on tl.dot: Triton's interpreter (3.6 and 3.8) multiplies bfloat16 operands
    wrongly, so bf16 runs on a GPU only. Why, or None."""
    if triton_interpreter_enabled() and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
                                            for t in tensors):
        return "Triton's interpreter computes tl.dot on bfloat16 operands wrongly: bf16 runs on a GPU"
    return None


def cuda_unsupported(*tensors) -> Optional[str]:
    """Why bigkern._C's kernels cannot take these tensors, or None."""
    reason = _ext.unavailable_reason() or layout_reason(*tensors)
    if reason:
        return reason
    devices = _devices(tensors)
    if devices != {"cuda"}:
        return f"the CUDA kernels take CUDA tensors, not {', '.join(sorted(devices)) or 'none'}"
    return _capability_reason(tensors, "CUDA") or _built_arch_reason(tensors)


def _built_arch_reason(tensors):
    """Why bigkern._C holds no kernel for these tensors' GPU (built for other architectures), or None:
    a launch there fails with 'no kernel image is available'."""
    device = _launch_device(tensors)
    built_for = getattr(_ext.build_info(), "cuda_archs", None)
    return _ext.arch_reason(torch.cuda.get_device_capability(device), built_for) if device is not None else None


# Differentiation that must go through torch's own ops. bigkern's ops carry reverse-mode formulas
# registered on torch custom ops: forward-mode AD finds no formula there (the tangent would come out
# zero), and torch.func's transforms cannot call such a formula at all (pytorch#168393). Calls made
# under them are left to torch's own function (a forced triton/cuda backend raises).
_FORWARD_AD = "forward-mode AD (torch.autograd.forward_ad): bigkern's kernels define reverse-mode gradients only"
_FUNC_TRANSFORM = ("torch.func's grad/jvp transforms (grad, jacrev, jacfwd, hessian, ...) cannot use a custom op's "
                   "autograd formula (pytorch#168393)")
_GRAD, _JVP = torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp


@torch.compiler.assume_constant_result
def _differentiating_transform_active() -> bool:
    """A torch.func grad/jvp level is active. dynamo traces those transforms into the graph and runs
    this at trace time (it cannot trace the interpreter stack itself: a silent zero jvp tangent was the
    result of assuming a compiled graph is never under one)."""
    return any(level.key() in (_GRAD, _JVP) for level in torch._C._functorch.get_interpreter_stack() or ())


def autodiff_transform_reason(*tensors) -> Optional[str]:
    """Why bigkern's ops cannot serve a call differentiated by torch.func.grad/jvp (and the
    transforms built on them) or carrying forward-mode tangents, or None. vmap alone is served."""
    if _differentiating_transform_active():
        return _FUNC_TRANSFORM
    if torch.compiler.is_compiling():  # otherwise the graph is differentiated as a whole, by torch
        return None
    if forward_ad._current_level >= 0 and any(  # (tensors may come in tuples and lists, as LSTM states)
            isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
            for t in torch.utils._pytree.tree_leaves(tensors)):
        return _FORWARD_AD
    return None


def served_by_torch(name: str, reason: str, torch_fn: Callable, *args, **kwargs):
    """Leave a call to `torch_fn` (torch's own function, or bigkern's composition of torch's ops)
    for `reason`: counted by record() as the torch backend; UnsupportedError when triton or cuda
    is forced."""
    if _explaining():
        raise _Explained(torch_path_explanation(name, reason))
    if requested_backend() in ("triton", "cuda"):
        raise UnsupportedError(f"{name}: {reason}")
    for calls in _RECORDERS:
        calls[(name, "torch")] += 1
    return torch_fn(*args, **kwargs)


def backward_is_differentiated() -> bool:
    """True inside a backward pass run with create_graph=True (gradient penalties, Hessian-vector
    products): its gradients must be differentiable in turn, which bigkern's backward ops are not."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def gradients_by_torch(name: str, forward: Callable, inputs: tuple, grad_outputs: tuple, needs_input_grad):
    """The gradients of `forward(*inputs)` -- a composition of torch's ops recomputing what the
    kernels computed -- for the inputs in `needs_input_grad`, by torch's autograd with
    create_graph=True, so they can be differentiated again. For backward_is_differentiated()
    passes; a forced triton/cuda backend raises UnsupportedError."""
    if requested_backend() in ("triton", "cuda"):
        raise UnsupportedError(f"{name}: a backward pass with create_graph=True (double backward) goes through "
                               f"torch's ops: bigkern's backward kernels have no derivatives of their own")
    for calls in _RECORDERS:
        calls[(f"{name}_double_backward", "torch")] += 1
    wanted = [i for i, need in enumerate(needs_input_grad) if need and isinstance(inputs[i], torch.Tensor)]
    with torch.enable_grad():
        outputs = forward(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None]
    grads = torch.autograd.grad([out for out, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True) if pairs and wanted else ()
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return result


class CompiledKernels:
    """The compiled launchers a family's "cuda" implementations call -- `kernels.<name>(...)` is
    torch.ops.bigkern.<name>_cuda, looked up at call time -- and whether they can take these
    tensors. One per family (e.g. bigkern.ops.conv.CUDA_KERNELS): the seam where the tests put the
    CPU emulation of the same CUDA sources (tests/cuda_emulation/)."""

    def unsupported(self, tensors) -> Optional[str]:
        return cuda_unsupported(*tensors)

    def __getattr__(self, name):
        return getattr(torch.ops.bigkern, f"{name}_cuda")


# ---------------------------------------------------------------------------------------------
# Ops and their implementations.

@dataclasses.dataclass
class Implementation:
    backend: str
    run: Callable
    unsupported: Callable[..., Optional[str]]
    # False until the implementation has been verified on a GPU: `auto` skips it, forcing runs it.
    auto: bool = True
    auto_reason: str = ""


@dataclasses.dataclass
class Explanation:
    op: str
    requested: str
    backend: Optional[str]
    reasons: dict  # backend -> reason it does not serve, or None when it would

    def __str__(self):
        lines = [f"{self.op}: requested {self.requested}, "
                 + (f"runs {self.backend}" if self.backend else "no implementation can serve")]
        for backend, reason in self.reasons.items():
            mark = "->" if backend == self.backend else "  "
            lines.append(f"  {mark} {backend:<6} {reason or 'can serve'}")
        return "\n".join(lines)


class Op:
    """An op's implementations in `auto`'s order of preference on a GPU."""

    def __init__(self, name: str):
        self.name = name
        self.implementations: dict = {}
        REGISTRY[name] = self

    def register(self, backend, unsupported, *, auto=True, auto_reason=""):
        """Decorator: `fn` is the `backend` implementation; `unsupported(*args, **kwargs)` says why it
        cannot serve a call (None when it can)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def decorate(fn):
            self.implementations[backend] = Implementation(backend, fn, unsupported, auto, auto_reason)
            return fn
        return decorate

    def _candidates(self, args, kwargs):
        """(requested, ordered backends to consider)."""
        requested = requested_backend()
        if requested != "auto":
            return requested, [requested]
        order = list(self.implementations)
        if "cuda" not in _devices(list(args) + list(kwargs.values())) and "torch" in order:
            order.remove("torch")
            order.insert(0, "torch")  # CPU tensors: the reference is the fast path
        return requested, order

    def _reason(self, backend, requested, args, kwargs):
        """Why `backend` does not serve this call under `requested`, or None."""
        impl = self.implementations.get(backend)
        if impl is None:
            return f"bigkern has no {backend} implementation of {self.name}"
        reason = impl.unsupported(*args, **kwargs)
        if reason is None and requested == "auto" and not impl.auto:
            reason = impl.auto_reason or "not verified on a GPU yet: runs only when forced"
        return reason

    def reasons(self, *args, **kwargs) -> dict:
        requested = requested_backend()
        return {backend: self._reason(backend, requested, args, kwargs) for backend in BACKENDS}

    def select(self, *args, **kwargs) -> Implementation:
        requested, order = self._candidates(args, kwargs)
        reasons = {}
        for backend in order:
            reason = self._reason(backend, requested, args, kwargs)
            if reason is None:
                return self.implementations[backend]
            reasons[backend] = reason
        detail = "; ".join(f"{b}: {r}" for b, r in reasons.items())
        if requested == "auto":
            raise UnsupportedError(f"{self.name}: no implementation can serve this call ({detail})")
        raise UnsupportedError(f"{self.name}: the requested backend cannot serve this call ({detail})")

    def __call__(self, *args, **kwargs):
        if _explaining():
            raise _Explained(self.explain(*args, **kwargs))
        implementation = self.select(*args, **kwargs)
        for calls in _RECORDERS:
            calls[(self.name, implementation.backend)] += 1
        device = _launch_device(list(args) + list(kwargs.values())) if implementation.backend == "triton" else None
        if device is None:
            return implementation.run(*args, **kwargs)
        with torch.cuda.device(device):
            return implementation.run(*args, **kwargs)

    def explain(self, *args, **kwargs) -> Explanation:
        try:
            backend = self.select(*args, **kwargs).backend
        except UnsupportedError:
            backend = None
        return Explanation(self.name, requested_backend(), backend, self.reasons(*args, **kwargs))


REGISTRY: dict = {}
_RECORDERS: list = []


@contextlib.contextmanager
def record():
    """Count which implementation served each op call inside the block:

        >>> with bigkern.record() as calls: model(x).sum().backward()
        >>> calls   # Counter({('conv2d', 'triton'): 20, ('conv2d_input_grad', 'triton'): 19, ...})
    Eager calls only: inside a compiled graph the op runs when the graph runs, and is counted then.
    Process-wide (calls other threads make meanwhile count too); blocks nest, each counting its own.
    """
    import collections

    calls = collections.Counter()
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _remove_by_identity(_RECORDERS, calls)


def _remove_by_identity(entries: list, entry):
    """list.remove compares with ==: two equal Counters (or two equal names) are not one block's."""
    del entries[next(i for i in range(len(entries) - 1, -1, -1) if entries[i] is entry)]


def entry_point(fn):
    """Mark a public function as bigkern's (explain() takes it)."""
    fn.bigkern_entry_point = True
    return fn


def torch_path_explanation(name: str, reason: str) -> Explanation:
    """For a call bigkern leaves to torch's own function: torch serves it unless triton/cuda is
    forced (then the call raises UnsupportedError with `reason`)."""
    requested = requested_backend()
    served = None if requested in ("triton", "cuda") else "torch"
    return Explanation(name, requested, served, {b: (None if b == served else reason) for b in BACKENDS})


# explain() runs the call itself up to its first decision -- the first op it reaches, or a call
# left to torch -- and stops there: the same validation, the same paths, nothing computed by a
# kernel. Per thread: other threads' calls run as usual meanwhile.
_DRY_RUN = threading.local()


class _Explained(BaseException):
    """Carries explain()'s answer out of the call (a BaseException: no `except Exception` in
    between may swallow it)."""

    def __init__(self, explanation: Explanation):
        super().__init__(explanation.op)
        self.explanation = explanation


def _explaining() -> bool:
    return getattr(_DRY_RUN, "active", False)


def _is_bigkern(fn) -> bool:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__module__.startswith("bigkern.")
    return getattr(fn, "bigkern_entry_point", False)


def explain(fn, *args, **kwargs) -> Explanation:
    """Which implementation a call takes, and why each other one does not.

        >>> print(bigkern.explain(bigkern.nn.functional.bias_act, x, b, "gelu"))
    `fn` is a bigkern function or module (the call runs up to its first bigkern op, which answers
    instead of running; bad arguments raise as the call would; the random generators are left as
    they were), an Op, or an op's name. For a module, the first op its forward reaches: the first
    layer of an LSTM, the self-attention of a Transformer layer.
    """
    if isinstance(fn, str):
        if fn not in REGISTRY:
            raise KeyError(f"explain(): no bigkern op named {fn!r} (ops: {', '.join(sorted(REGISTRY))})")
        fn = REGISTRY[fn]
    if isinstance(fn, Op):
        return fn.explain(*args, **kwargs)
    if not _is_bigkern(fn):
        raise TypeError(f"explain() takes a bigkern function, module or op, not {type(fn).__name__}")
    call = fn.forward if isinstance(fn, torch.nn.Module) else fn  # (no hooks: they are the user's)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        _DRY_RUN.active = True
        try:
            call(*args, **kwargs)
        except _Explained as explained:
            return explained.explanation
        finally:
            _DRY_RUN.active = False
    name = getattr(fn, "__name__", type(fn).__name__)
    return Explanation(name, requested_backend(), None, {b: "the call reached no bigkern op" for b in BACKENDS})
