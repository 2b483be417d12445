"""bigkern.fuse(model): one fused convolution for each conv -> batch norm -> activation -> residual
add chain, preserving the model's outputs.

Patterns (each part after the conv optional, each intermediate used by nothing else):

    y = conv(x)                       Conv2d (torch's or bigkern's, any padding mode)
    y = batch_norm(y)                 BatchNorm2d in eval mode with running statistics: folded into
                                      the conv's weight and bias (in training mode it stays separate,
                                      and ends the chain; so does an eval-mode one in a model in
                                      training mode whose conv or affine parameters still train:
                                      folded, the optimizer would train another parametrization)
    y = act(y)                        relu, gelu, silu, sigmoid, tanh, leaky_relu: as modules,
        or  y = act(y + identity)     functionals or tensor methods; the residual add as +, +=,
                                      torch.add or Tensor.add (a ResNet block's `out += identity`;
                                      never an in-place add into the identity, which others see)

A chain is left whole where something else writes in place, between its conv and its end, into what
the fused conv reads (its input, the residual): the fused conv runs where the chain ended.

A module with hooks (forward, pre-forward or backward; spectral_norm's pre-hook among them) is
never fused away: a conv, batch norm or activation with hooks ends the chain, and any other module
with hooks keeps its identity (its children are fused inside it), so every hook still runs.

The model is traced with torch.fx (bigkern's own modules, from bigkern.patch, and modules with
hooks as leaves like torch's); where it cannot be traced (data-dependent control flow), where its
forward has optional or variadic parameters, where tracing changes its state (buffer updates: fx
would run them once instead of recording them; the state is restored), or where its traced code
reads `self.training` (F.dropout(training=self.training), stochastic depth: a trace would fix the
mode it was fused in), each child module is fused on its own. nn.Sequential containers are matched
module by module where they run whole (the model itself, or called only as one): code that iterates
or indexes one sees each child's output; a child that the code of its parent's class reaches into
(`self.head.compute_loss(...)`, `self.head.stride`, in any method) keeps its identity and is fused
inside only. Each chain becomes one `bigkern.nn.FusedConv2d` under the conv's own name; folded batch
norms disappear from the module tree (and the state_dict), nothing else.
"""

import ast
import contextlib
import copy
import inspect
import operator
import textwrap

import torch
from torch import fx, nn

from bigkern.nn.conv import Conv2d, FusedConv2d

F = nn.functional

_CONVS = (nn.Conv2d, Conv2d)  # exact types: a user's subclass may compute something else

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_ACTIVATION_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    F.gelu: "gelu", F.leaky_relu: "leaky_relu",
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_IN_PLACE_OPERATORS = tuple(getattr(operator, f"i{name}") for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift", "rshift"))
_ACTIVATION_KWARGS = {"inplace", "approximate", "negative_slope"}  # any other (out=...) is not an activation's


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace each conv (-> batch norm) (-> activation | -> add -> activation) chain in `model` with
    one bigkern.nn.FusedConv2d; returns the fused model (a torch.fx GraphModule when traced, which,
    like torch.fx's own, has none of the model's other methods or plain attributes: call those on
    the original; else the model itself with fused children: an nn.Sequential stays one, its
    indices kept). Outputs are
    preserved. Batch norms are folded only in eval mode, so fuse an inference model after
    `model.eval()`. `inplace=False` leaves `model` as it is; `inplace=True` reuses and changes its
    modules (use the returned model either way).
    """
    if not inplace:
        model = copy.deepcopy(model)
    return _fuse(model, model.training)


class _Proxy(fx.Proxy):
    """fx's Proxy has no in-place operators: `a += b` falls back to `a = a + b`, and the traced graph
    loses the write into a (which other names may hold). Here they are recorded as what they are."""


for _operator in _IN_PLACE_OPERATORS:
    def _in_place(self, other, _op=_operator):
        return self.tracer.create_proxy("call_function", _op, (self, other), {})

    setattr(_Proxy, f"__{_operator.__name__}__", _in_place)


class _Tracer(fx.Tracer):
    """fx's tracer, with bigkern's modules (what bigkern.patch swapped in) as leaves like torch's,
    and in-place operators kept in place."""

    def is_leaf_module(self, m, module_qualified_name):
        return (type(m).__module__.startswith("bigkern.nn.") or _has_hooks(m)
                or super().is_leaf_module(m, module_qualified_name))

    def proxy(self, node):
        return _Proxy(node, self)


class _ChildrenAsLeavesTracer(_Tracer):
    """Keeps each call of the traced module's own children as one node, to tell which children its
    forward calls only whole."""

    def trace(self, root, concrete_args=None):
        self.children = {id(child) for child in root.children()}
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m, module_qualified_name):
        return id(m) in self.children or super().is_leaf_module(m, module_qualified_name)


def _has_hooks(module) -> bool:
    """Whether hooks run around this module's forward or backward (a fused module would drop them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _fuse(model, model_training, called_whole=True):
    """`called_whole`: whether `model` only runs as one (the root, a Sequential's child, a child its
    parent's forward only calls), rather than iterated, indexed or reached into: otherwise it keeps
    its identity and is fused inside only (a traced replacement cannot be iterated, and folded batch
    norms are gone)."""
    if isinstance(model, _CONVS) or not any(True for _ in model.children()):
        return model
    if not called_whole or type(model) is nn.Sequential or _has_hooks(model):
        # a chain: module patterns find everything, and keep it a Sequential; a module with hooks
        # stays itself (a traced copy would not carry them), fused inside, as does one not called whole
        return _fuse_children(model, model_training, called_whole)
    graph = _trace(model)
    if graph is None or _traced_code_reads_the_mode(model, graph):
        # fx cannot trace it, or its trace would bake `self.training` in (F.dropout(training=
        # self.training), stochastic depth: the fused model would keep the mode it was fused in
        # through .train()/.eval()): fuse inside each child instead
        return _fuse_children(model, model_training)
    traced = fx.GraphModule(model, graph, type(model).__name__)
    _adopt_untraced_submodules(traced, model)
    changed = _fuse_graph(traced, model_training)
    for node in traced.graph.nodes:  # leaves kept for their hooks: fused inside
        if node.op == "call_module":
            leaf = traced.get_submodule(node.target)
            if _has_hooks(leaf) and not isinstance(leaf, _CONVS):
                _fuse(leaf, model_training, _called_whole(traced.graph, node.target))
    if not changed:
        return model  # the trace saw every module: nothing to fuse at this level
    traced.training = model.training
    return traced


def _trace(model, tracer=_Tracer, defaults_as_given=False):
    """fx's graph of `model`'s forward, or None where fx cannot trace it, or its graph would not do
    what the forward does:
    - optional or variadic parameters: fx passes a proxy for each, so `if scale is not None:` is
      always taken (`defaults_as_given`: traced with the defaults, for the structure alone);
    - the forward changes the model's state: fx runs buffer updates for real instead of recording
      them (`self.calls += 1`, a BatchNorm subclass's num_batches_tracked), so tracing would change
      the model once and the graph never again. The state is restored."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a compiled forward
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return None
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    if defaults and not defaults_as_given:
        return None
    before = _State(model)
    try:
        graph = tracer().trace(model, concrete_args=defaults or None)
    except Exception:
        graph = None
    if before.changed():
        before.restore()
        return None
    return graph


_REGISTRIES = ("_parameters", "_buffers", "_modules")


class _State:
    """What a forward could change in `model` outside the graph fx records: each module's attributes,
    slots and registered entries (by identity), the contents of its list, dict and set attributes
    (`self.stats["calls"] += 1`), and its buffers and plain tensor attributes (by version, with copies
    to put back)."""

    def __init__(self, model):
        self.modules = {module: self._entries(module) for module in model.modules()}
        self.containers = [(c, copy.copy(c)) for module in self.modules for c in vars(module).values()
                           if type(c) in (list, dict, set)]
        self.tensors = [(t, _version(t), t.detach().clone()) for module in self.modules
                        for t in (*module._buffers.values(), *vars(module).values()) if isinstance(t, torch.Tensor)]

    @staticmethod
    def _entries(module):
        entries = {(None, name): value for name, value in vars(module).items() if name not in _REGISTRIES}
        for registry in _REGISTRIES:
            entries.update(((registry, name), value) for name, value in getattr(module, registry).items())
        for cls in type(module).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                if name not in ("__dict__", "__weakref__") and hasattr(module, name):
                    entries[(_SLOT, name)] = getattr(module, name)
        return entries

    def changed(self) -> bool:
        return (any(self._changed(module, entries) for module, entries in self.modules.items())
                or any(not _same_contents(now, before) for now, before in self.containers)
                or any(_version(t) != version for t, version, _ in self.tensors))

    def _changed(self, module, entries):
        now = self._entries(module)
        return now.keys() != entries.keys() or any(now[key] is not value for key, value in entries.items())

    def restore(self):
        for module, entries in self.modules.items():
            for name in [name for name in vars(module) if name not in _REGISTRIES]:
                delattr(module, name)
            for registry in _REGISTRIES:
                getattr(module, registry).clear()
            for (registry, name), value in entries.items():
                if registry is _SLOT:
                    object.__setattr__(module, name, value)
                else:
                    (vars(module) if registry is None else getattr(module, registry))[name] = value
        for container, before in self.containers:
            container.clear()
            container.update(before) if hasattr(container, "update") else container.extend(before)
        with torch.no_grad():
            for t, version, copied in self.tensors:
                if _version(t) != version:
                    t.copy_(copied)


_SLOT = "slot"  # (an entry of _State: a __slots__ attribute)


def _same_contents(now, before) -> bool:
    if isinstance(now, set):
        return now == before
    if isinstance(now, dict):
        return now.keys() == before.keys() and all(now[k] is before[k] for k in now)
    return len(now) == len(before) and all(a is b for a, b in zip(now, before))


def _version(t):
    """t's version counter, which every in-place write bumps (None for an inference tensor, which has
    none: outside inference mode nothing can write into it)."""
    try:
        return t._version
    except RuntimeError:
        return None


@contextlib.contextmanager
def _modes_flipped(model):
    """Every module of `model` in the other mode, for a trace to show whether its code reads it."""
    modes = {module: module.training for module in model.modules()}
    try:
        for module, training in modes.items():
            module.training = not training
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _traced_code_reads_the_mode(model, graph) -> bool:
    """Whether tracing `model` in the other mode (every module's flag flipped) gives another graph, or
    none: then the traced code reads `training`, which a trace fixes as a constant."""
    with _modes_flipped(model):
        other = _trace(model)
    return other is None or other.python_code("self").src != graph.python_code("self").src


def _called_whole(graph, target) -> bool:
    """Whether `graph` uses the module `target` only by calling it, never reaching inside."""
    return not any(node.op in ("call_module", "get_attr") and node.target.startswith(target + ".")
                   for node in graph.nodes)


def _children_called_whole(module):
    """Names of `module`'s children its forward only calls, never reaching inside, in either mode
    and with its optional arguments left out, and that no other code of its class reaches into.
    Where it cannot be traced, its children that cannot be iterated (a Sequential, subclasses too,
    may be walked for taps of intermediate values) and that its code does not reach into."""
    reached = _children_its_code_reaches_into(module)
    graphs = [_trace(module, _ChildrenAsLeavesTracer, defaults_as_given=True)]
    with _modes_flipped(module):
        graphs.append(_trace(module, _ChildrenAsLeavesTracer, defaults_as_given=True))
    if None in graphs:
        return {name for name, child in module.named_children()
                if not hasattr(type(child), "__iter__") and name not in reached}
    return {name for name, _ in module.named_children()
            if name not in reached and all(_called_whole(graph, name) for graph in graphs)}


def _children_its_code_reaches_into(module):
    """Names of `module`'s children that the methods of its class (other than __init__) use other than
    by calling or testing them: `self.head.compute_loss(...)`, `self.head.stride`, `self.blocks[0]`,
    `f(self.head)`. A traced replacement of such a child would have none of its methods or plain
    attributes, nor the batch norms it folded. Every child where the source cannot be read."""
    names = set(module._modules)
    reached = set()
    for cls in type(module).__mro__:
        if cls is object or cls.__module__.split(".")[0] == "torch":
            continue  # nn.Module and torch's containers reach into no child
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            return names
        for method in tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else ():
            if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) and method.name != "__init__":
                reached |= _reached_through_self(method, names)
    return reached


_TESTS = (ast.Compare, ast.BoolOp, ast.If, ast.IfExp, ast.While, ast.Assert)


def _reached_through_self(function, names):
    """The `names` that `function` uses as `self.name` other than calling it (`self.name(...)`),
    testing it (`if self.name is not None`) or assigning it."""
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    reached = set()
    for node in ast.walk(function):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                and node.attr in names):
            continue
        parent = parents.get(node)
        if ((isinstance(parent, ast.Call) and parent.func is node) or isinstance(parent, _TESTS)
                or (isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not))
                or isinstance(node.ctx, (ast.Store, ast.Del))):
            continue
        reached.add(node.attr)
    return reached


def _adopt_untraced_submodules(traced, model):
    """A GraphModule keeps only the submodules its graph calls; give it the rest of the model's tree
    (heads used only in the other mode, say: googlenet's auxiliary classifiers in eval), so that
    fusing removes nothing but what it folds."""
    def adopt(target, source):
        for name, child in source.named_children():
            if name not in target._modules:
                target.add_module(name, child)
            elif target._modules[name] is not child and target._modules[name] is not None:
                adopt(target._modules[name], child)
        for name, parameter in source._parameters.items():
            if name not in target._parameters and not hasattr(target, name):
                target.register_parameter(name, parameter)
        for name, buffer in source._buffers.items():
            if name not in target._buffers and not hasattr(target, name):
                target.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)
    adopt(traced, model)


def _fuse_children(module, model_training, called_whole=False):
    """Fuse inside `module`, kept as it is. A Sequential's chains across its children are fused only
    where it runs whole: code that iterates or indexes it (taps of intermediate features) would see
    the fused values."""
    if type(module) is nn.Sequential:
        whole = {name for name, _ in module.named_children()} if called_whole else set()
    else:
        whole = _children_called_whole(module)
    for name, child in list(module.named_children()):
        fused = _fuse(child, model_training, name in whole)
        if fused is not child:
            setattr(module, name, fused)
    if type(module) is nn.Sequential and called_whole:
        _fuse_sequential(module, model_training)
    return module


# ---------------------------------------------------------------------------------------------
# Graph patterns.

def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _activation(node, modules, source):
    """(name, negative_slope) when `node` applies a supported activation to `source`, else None."""
    if node is None or not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module":
        return _activation_module(modules[node.target])  # (None for one with hooks)
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        if node.kwargs.keys() - _ACTIVATION_KWARGS:  # torch.tanh(y, out=buffer) writes where others read
            return None
        name = _ACTIVATION_FUNCTIONS[node.target]
        if name == "gelu":
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            if approximate not in ("none", "tanh"):
                return None
            return ("gelu_tanh" if approximate == "tanh" else "gelu"), 0.01
        if name == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
        if len(node.args) > 1 and node.target not in (F.relu, F.relu_):  # e.g. torch.tanh(x, out=...)
            return None
        return name, 0.01
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACTIVATION_METHODS[node.target], 0.01
    return None


def _residual(node, source):
    """The other operand when `node` is `source + other` (either order, no alpha), else None."""
    if node is None or node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS)):
        return None
    in_place = (node.op == "call_method" and node.target == "add_") or node.target is operator.iadd
    if in_place and node.args[0] is not source:
        return None  # identity.add_(conv) / identity += conv writes into identity: not ours to fuse
    a, b = node.args
    other = b if a is source else a if b is source else None
    if not isinstance(other, fx.Node) or other is source:
        return None
    return other


_OUTSIDE = "outside"  # the model's inputs and attributes, all one: a caller may pass one tensor twice


def _memory(node, modules):
    """What `node`'s value may share memory with: the conv and batch norm outputs (new tensors) it may
    be a view of, and _OUTSIDE where it may be a view of the model's inputs or attributes."""
    found, seen, todo = set(), set(), [node]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and type(modules[node.target]) in (*_CONVS, nn.BatchNorm2d) \
                and not _has_hooks(modules[node.target]):
            found.add(node)
        elif not node.all_input_nodes:
            found.add(_OUTSIDE)
        else:
            todo.extend(node.all_input_nodes)
    return found


def _writes_into(node, memory, modules) -> bool:
    """Whether `node` may write in place into `memory` (as _memory gives it): in-place operators,
    methods and functions (a trailing underscore, `out=`, `inplace=True`), modules with `inplace`, and
    any module or function but torch's and bigkern's own (fx does not show what they do)."""
    written = None
    if node.op == "call_module":
        module = modules[node.target]
        if _has_hooks(module) or not type(module).__module__.startswith(("torch.nn.", "bigkern.nn.")):
            return True
        if getattr(module, "inplace", False) is not False:
            written = node.args[0] if node.args else node.kwargs
    elif node.op == "call_function" and _opaque(node.target):
        return True
    elif node.op in ("call_method", "call_function"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        try:  # inplace may be passed by position: F.relu(x, True)
            inplace = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("inplace", False)
        except (TypeError, ValueError):  # methods, and builtins (torch.relu) have no signature
            inplace = node.kwargs.get("inplace", False)
        if "out" in node.kwargs:
            written = node.kwargs["out"]
        elif ((name.endswith("_") and not name.endswith("__")) or inplace is not False
              or node.target in _IN_PLACE_OPERATORS or node.target is operator.setitem):
            written = node.args[0] if node.args else node.kwargs
    if written is None:
        return False
    return not isinstance(written, fx.Node) or bool(_memory(written, modules) & memory)


def _opaque(function) -> bool:
    """A function whose writes fx cannot see: anything but torch's, Python's operators and builtins
    (an fx.wrap'd helper), and torch ops whose schema says they mutate an argument (a custom op)."""
    if isinstance(function, torch._ops.OpOverloadPacket):
        function = function.default
    if isinstance(function, torch._ops.OpOverload):
        return function._schema.is_mutable
    if isinstance(getattr(function, "__objclass__", None), type) and issubclass(function.__objclass__,
                                                                              torch._C.TensorBase):
        return False  # a Tensor method (its name says whether it writes)
    module = getattr(function, "__module__", None) or ""
    return not (module == "torch" or module.startswith("torch.") or module in ("operator", "_operator", "builtins",
                                                                               "math"))


def _writes_between(first, last, chain, reads, modules) -> bool:
    """Whether a node between `first` and `last`, other than the chain's, may write into what the
    fused node reads (`reads`, or the weights): it runs where `last` did, so it would read them after
    the write. (Writes into other convs' and batch norms' outputs, a residual branch's in-place ReLUs,
    are harmless.)"""
    read = {_OUTSIDE}.union(*(_memory(n, modules) for n in reads if isinstance(n, fx.Node)))
    node = first.next
    while node is not last:
        if node not in chain and _writes_into(node, read, modules):
            return True
        node = node.next
    return False


def _foldable_batch_norm(module, conv, model_training):
    """An eval-mode BatchNorm2d with running statistics and no hooks -- unless the model trains and
    the conv's or the batch norm's parameters train with it (a frozen-statistics batch norm in
    fine-tuning): folded, the optimizer would step W * gamma / sigma where it stepped W, and
    weight decay would act on that too, so training would take another course."""
    trains = model_training and any(p.requires_grad for p in (*module.parameters(), *conv.parameters()))
    return (type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats
            and module.running_mean is not None and not trains and not _has_hooks(module))


def _fuse_graph(gm: fx.GraphModule, model_training: bool) -> bool:
    """Rewrite the patterns in gm's graph; True if any was found."""
    modules = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    changed, consumed = False, set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in _CONVS or calls[node.target] != 1:
            continue
        if _has_hooks(modules[node.target]):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        chain, tail = [node], node
        batch_norm = None
        user = _only_user(tail)
        if (user is not None and user.op == "call_module"
                and _foldable_batch_norm(modules[user.target], modules[node.target], model_training)
                and user.args == (tail,) and not user.kwargs):
            batch_norm, tail = modules[user.target], user
            chain.append(tail)
        activation = _activation(_only_user(tail), modules, tail)
        residual = add = None
        if activation is None:
            residual = _residual(_only_user(tail), tail)
            if residual is not None:
                add = tail = _only_user(tail)
                chain.append(tail)
                activation = _activation(_only_user(tail), modules, tail)
        if activation is not None:
            tail = _only_user(tail)
            chain.append(tail)
        if batch_norm is None and activation is None and residual is None:
            continue
        args = (node.args[0],) if residual is None else (node.args[0], residual)
        if _writes_between(node, tail, chain, args, modules):
            continue
        name, slope = activation if activation is not None else (None, 0.01)
        fused = FusedConv2d.from_conv(modules[node.target], batch_norm, name, slope)
        # `residual + y` takes the residual's layout, which FusedConv2d follows only when told
        fused.residual_first = add is not None and add.args[0] is residual
        _set_submodule(gm, node.target, fused)
        with gm.graph.inserting_after(tail):
            replacement = gm.graph.call_module(node.target, args)
        tail.replace_all_uses_with(replacement)
        for dead in reversed(chain):
            if dead.op == "call_module" and dead is not node:
                consumed.add(dead.target)
            gm.graph.erase_node(dead)
        changed = True
    if changed:
        gm.graph.lint()
        # the folded batch norms (and activation modules) leave the tree, unless called elsewhere
        still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for target in consumed - still_called:
            _delete_submodule(gm, target)
        gm.recompile()
    return changed


def _delete_submodule(root, target):
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    delattr(parent, name)


def _set_submodule(root, target, module):
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


# ---------------------------------------------------------------------------------------------
# Module patterns, where fx cannot trace: Conv2d (-> BatchNorm2d) (-> activation) in a Sequential.

def _activation_module(module):
    if _has_hooks(module):
        return None
    kind = type(module)
    if kind in _ACTIVATION_MODULES:
        return _ACTIVATION_MODULES[kind], 0.01
    if kind is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    return None


def _fuse_sequential(sequential: nn.Sequential, model_training: bool):
    """Fuse runs inside `sequential`, keeping its indices: consumed modules become nn.Identity."""
    children = list(sequential)
    i = 0
    while i < len(children):
        if type(children[i]) not in _CONVS or _has_hooks(children[i]):
            i += 1
            continue
        j = i + 1
        batch_norm = None
        if j < len(children) and _foldable_batch_norm(children[j], children[i], model_training):
            batch_norm, j = children[j], j + 1
        activation = _activation_module(children[j]) if j < len(children) else None
        if activation is not None:
            j += 1
        if batch_norm is not None or activation is not None:
            name, slope = activation if activation is not None else (None, 0.01)
            sequential[i] = FusedConv2d.from_conv(children[i], batch_norm, name, slope)
            for k in range(i + 1, j):
                sequential[k] = nn.Identity()
        i = j
