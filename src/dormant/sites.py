"""Units and sites: where the neurons of a model live.

A *unit* is one neuron: one output feature of a Linear layer or one channel of a ConvNd layer.
A *site* is the place where units live::

    producer (Linear/ConvNd) -> [norm] -> activation -> consumers

`find_sites` traces the model with torch.fx (so functional ``F.relu`` calls, a ReLU module
reused at two places, residual additions and flatten->Linear are all seen) and falls back to a
runtime trace of module calls for models fx cannot trace. Every site also says how the
monitor can *observe* it without changing the model (its `Tap`): a hook on the activation
module, a pre-hook on the module that consumes the activation output, or a hook on the
module that feeds a functional activation (the activation is then recomputed on the copy).
"""
from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Site",
    "Tap",
    "NoSitesError",
    "find_sites",
    "make_site",
    "register_activation",
    "activation_kinds",
    "is_nonneg",
]

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
NORMS = CHANNEL_NORMS + (nn.LayerNorm,)
PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
PASS_FUNCTIONS = {F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
PASS_METHODS = {"contiguous", "clone", "detach"}
FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}

# Activation modules (type -> kind) and functions (callable -> kind). `register_activation`
# adds the project's own or a user's activations; fx treats registered modules as leaves.
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid", nn.ELU: "elu", nn.LeakyReLU: "leaky_relu", nn.Hardtanh: "hardtanh",
    nn.Mish: "mish", nn.Hardswish: "hardswish", nn.Softplus: "softplus",
    nn.Hardsigmoid: "hardsigmoid",
}
_ACT_FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    F.gelu: "gelu", F.silu: "silu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.elu: "elu", F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh",
    F.mish: "mish", F.hardswish: "hardswish", F.softplus: "softplus", F.hardsigmoid: "hardsigmoid",
}
# Kinds whose output is >= 0 by construction: the monitor counts them with cheaper ops.
_NONNEG_KINDS: set[str] = {"relu", "relu6", "sigmoid", "softplus", "hardsigmoid"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
_METHOD_FN = {"relu": torch.relu, "relu_": torch.relu, "sigmoid": torch.sigmoid,
              "sigmoid_": torch.sigmoid, "tanh": torch.tanh, "tanh_": torch.tanh}


def register_activation(module_type: type | None = None, kind: str | None = None,
                        function: Callable | None = None, *, nonneg: bool = False):
    """Teach site discovery a new activation (a module type and/or a function).

    Usable as a class decorator: ``@register_activation(kind="shifted_relu", nonneg=True)``.
    `nonneg` promises that every output is >= 0 (ReLU-like); the monitor then counts the
    activation with fewer operations. A wrong promise gives wrong zero counts.
    """
    def add(name: str) -> None:
        if nonneg:
            _NONNEG_KINDS.add(name)

    if function is not None:
        _ACT_FUNCTIONS[function] = kind or function.__name__
        add(_ACT_FUNCTIONS[function])
    if module_type is not None:
        _ACT_MODULES[module_type] = kind or module_type.__name__.lower()
        add(_ACT_MODULES[module_type])
        return module_type

    def deco(cls: type) -> type:
        _ACT_MODULES[cls] = kind or cls.__name__.lower()
        add(_ACT_MODULES[cls])
        return cls
    return deco


def is_nonneg(kind: str) -> bool:
    """True when activations of this kind never output negative values."""
    return kind in _NONNEG_KINDS


def activation_kinds() -> list[str]:
    """Names of every activation site discovery recognises."""
    return sorted(set(_ACT_MODULES.values()) | set(_ACT_FUNCTIONS.values()))


class NoSitesError(ValueError):
    """Raised when a model has no unit that dormant can observe."""


@dataclass(frozen=True)
class Tap:
    """How the monitor observes a site's activation output without editing the model.

    kind: ``"output"`` -- forward hook on `module`, its output is the activation output;
          ``"input"``  -- forward pre-hook on `module`, its first input is the activation output;
          ``"recompute"`` -- forward hook on `module`, activation output = `fn(output)`.
    call_index: which call of `module` in one forward (modules can be called more than once).
    calls: how many times `module` is called per forward.
    """
    kind: str
    module: str
    call_index: int = 0
    calls: int = 1
    fn: Callable | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Site:
    """A place where units live: producer -> [norm] -> activation -> consumers.

    unit_dim is 1 for channels (ConvNd outputs, BatchNorm'd tensors) and -1 for features
    (Linear outputs, also ``(B, T, D)`` tokens); statistics reduce over every other dim.
    `producer` is the Linear/ConvNd whose rows/filters are the units' incoming weights (None
    when there is none). `residual` is True when the activation's input is a sum, i.e. the
    units live on a residual stream fed by more than the producer.
    """
    name: str
    activation: str
    num_units: int
    unit_dim: int
    tap: Tap
    producer: str | None = None
    norm: str | None = None
    act_module: str | None = None
    consumers: tuple[str, ...] = ()
    flatten_consumers: tuple[str, ...] = ()
    residual: bool = False

    def describe(self) -> str:
        chain = " -> ".join(x for x in (self.producer, self.norm) if x) or "?"
        res = " (+residual)" if self.residual else ""
        return f"{self.name}: {chain}{res} -> {self.activation} [{self.num_units} units]"


# ----------------------------------------------------------------------------------------
# fx tracing
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in _ACT_MODULES or isinstance(m, PRODUCERS + NORMS):
            return True
        return super().is_leaf_module(m, qualname)


def _act_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _ACT_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target)
    return None


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _is_pass(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], PASS_MODULES)
    if node.op == "call_function":
        return node.target in (F.dropout,)
    return node.op == "call_method" and node.target in PASS_METHODS


def _walk_back(node: fx.Node, modules) -> tuple[str | None, str | None, bool]:
    """From an activation's input, find (producer, norm, residual)."""
    norm = None
    cur = node
    while isinstance(cur, fx.Node):
        if cur.op == "call_module":
            m = modules[cur.target]
            if isinstance(m, PRODUCERS):
                return cur.target, norm, False
            if isinstance(m, NORMS) and norm is None:
                norm, cur = cur.target, cur.args[0]
                continue
        if _is_pass(cur, modules):
            cur = cur.args[0]
            continue
        if _is_add(cur):
            for arg in cur.args:  # the first branch with a producer is the main branch
                if isinstance(arg, fx.Node):
                    p, n, _ = _walk_back(arg, modules)
                    if p is not None:
                        return p, norm or n, True
            return None, norm, True
        return None, norm, False
    return None, norm, False


def _walk_forward(node: fx.Node, modules) -> tuple[list[str], list[str]]:
    """From an activation's output, the Linear/ConvNd modules that read its units."""
    consumers: list[str] = []
    flat: list[str] = []
    frontier = [(u, False) for u in node.users]
    seen: set[fx.Node] = set()
    while frontier:
        u, flattened = frontier.pop()
        if u in seen:
            continue
        seen.add(u)
        nxt = None
        if u.op == "call_module":
            m = modules[u.target]
            if isinstance(m, PRODUCERS):
                (flat if flattened else consumers).append(u.target)
            elif isinstance(m, nn.Flatten):
                nxt = True
            elif isinstance(m, PASS_MODULES + POOL_MODULES + CHANNEL_NORMS):
                nxt = flattened
        elif u.op == "call_function":
            if u.target in FLATTEN_FUNCTIONS:
                nxt = True
            elif u.target in PASS_FUNCTIONS or u.target in ADD_FUNCTIONS:
                nxt = flattened
        elif u.op == "call_method":
            if u.target in FLATTEN_METHODS:
                nxt = True
            elif u.target in PASS_METHODS or u.target in ("add", "add_"):
                nxt = flattened
        if nxt is not None:
            frontier.extend((v, nxt) for v in u.users)
    return sorted(set(consumers)), sorted(set(flat))


def _unit_dim(producer: nn.Module | None, norm: nn.Module | None, ndim: int) -> int:
    if isinstance(producer, CONVS) or isinstance(norm, CHANNEL_NORMS):
        return 1
    if isinstance(producer, nn.Linear) or isinstance(norm, nn.LayerNorm):
        return -1
    return 1 if ndim >= 4 else -1


def _module_calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    return calls


def _choose_tap(node: fx.Node, kind: str, calls: dict[str, list[fx.Node]]) -> Tap | None:
    if node.op == "call_module":
        lst = calls[node.target]
        return Tap("output", node.target, lst.index(node), len(lst))
    # functional activation: prefer a module that reads its output as first input (exact,
    # no recompute), else the module whose output feeds it (recompute the activation).
    for user in node.users:
        if user.op == "call_module" and user.args and user.args[0] is node:
            lst = calls[user.target]
            return Tap("input", user.target, lst.index(user), len(lst))
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1:
        fn = node.target if node.op == "call_function" else _METHOD_FN[node.target]
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        extra = tuple(a for a in node.args[1:] if not isinstance(a, fx.Node))
        lst = calls[src.target]
        return Tap("recompute", src.target, lst.index(src), len(lst),
                   fn=_bind(fn, extra, kwargs))
    return None


def _bind(fn: Callable, args: tuple, kwargs: dict) -> Callable:
    if not args and not kwargs:
        return fn
    return lambda x: fn(x, *args, **kwargs)


def _trace_sites(model: nn.Module, example: torch.Tensor) -> list[Site]:
    graph = _Tracer().trace(model, concrete_args=_concrete_args(model, example))
    gm = fx.GraphModule(model, graph)
    _propagate_shapes(gm, example)
    modules = dict(model.named_modules())
    calls = _module_calls(graph)
    sites, skipped = [], []
    for node in graph.nodes:
        kind = _act_kind(node, modules)
        if kind is None:
            continue
        meta = node.meta.get("tensor_meta")
        tap = _choose_tap(node, kind, calls)
        if meta is None or tap is None:
            skipped.append(node.name)
            continue
        producer, norm, residual = _walk_back(node.args[0], modules)
        shape = tuple(meta.shape)
        udim = _unit_dim(modules.get(producer), modules.get(norm), len(shape))
        consumers, flat = _walk_forward(node, modules)
        act_module = node.target if node.op == "call_module" else None
        sites.append(Site(
            name=_site_name(node, act_module, tap, producer, norm), activation=kind,
            num_units=int(shape[udim]), unit_dim=udim, tap=tap, producer=producer,
            norm=norm, act_module=act_module, consumers=tuple(consumers),
            flatten_consumers=tuple(flat), residual=residual))
    if skipped:
        warnings.warn(f"dormant: cannot observe activation(s) {skipped} without editing the "
                      "model (no module reads or feeds them); use an activation module there "
                      "or pass sites explicitly", stacklevel=3)
    return sites


def _site_name(node, act_module, tap, producer, norm) -> str:
    if act_module is not None:
        return act_module if tap.call_index == 0 else f"{act_module}#{tap.call_index}"
    anchor = norm or producer
    fn = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "act")
    return f"{anchor}.{fn.rstrip('_')}" if anchor else node.name


class _ShapeProp(fx.Interpreter):
    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["tensor_meta"] = _Meta(out.shape)
        return out


@dataclass
class _Meta:
    shape: torch.Size


def _concrete_args(model: nn.Module, example) -> dict | None:
    """Inputs of `model.forward` that the example leaves out, fixed at their defaults while
    tracing (so ``if mask is not None`` follows the call the example makes)."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return None
    if isinstance(example, Mapping):
        given = set(example)
    else:
        given = {p.name for p in params[:len(example) if isinstance(example, tuple) else 1]}
    return {p.name: p.default for p in params
            if p.name not in given and p.default is not p.empty} or None


def _placeholder_args(graph: fx.Graph, example) -> tuple:
    """Positional values for the graph's inputs: a tuple as it is, a mapping (keyword inputs,
    Hugging Face style) matched by argument name (defaults for the missing ones)."""
    if isinstance(example, Mapping):
        holders = [n for n in graph.nodes if n.op == "placeholder"]
        return tuple(example[n.target] if n.target in example else (n.args[0] if n.args else None)
                     for n in holders)
    return example if isinstance(example, tuple) else (example,)


def _propagate_shapes(gm: fx.GraphModule, example) -> None:
    """One forward in eval mode under no_grad; running statistics are left untouched."""
    flags = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeProp(gm).run(*_placeholder_args(gm.graph, example))
    finally:
        for m, flag in flags.items():
            m.training = flag


# ----------------------------------------------------------------------------------------
# runtime fallback for models fx cannot trace: pair each activation module call with the
# producer (and norm) called just before it.
def _runtime_sites(model: nn.Module, example) -> list[Site]:
    order: list[tuple[str, nn.Module, torch.Size]] = []
    handles = []
    for name, m in model.named_modules():
        if type(m) in _ACT_MODULES or isinstance(m, PRODUCERS + NORMS):
            handles.append(m.register_forward_hook(
                lambda mod, i, o, name=name: order.append((name, mod, o.shape))))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example, Mapping):
                model(**example)
            else:
                model(*(example if isinstance(example, tuple) else (example,)))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    n_calls: dict[str, int] = {}
    for name, _, _ in order:
        n_calls[name] = n_calls.get(name, 0) + 1
    seen: dict[str, int] = {}
    sites, producer, norm = [], None, None
    for name, m, shape in order:
        idx = seen.get(name, 0)
        seen[name] = idx + 1
        if isinstance(m, PRODUCERS):
            producer, norm = name, None
        elif isinstance(m, NORMS):
            norm = name
        else:
            udim = _unit_dim(model.get_submodule(producer) if producer else None,
                             model.get_submodule(norm) if norm else None, len(shape))
            tap = Tap("output", name, idx, n_calls[name])
            sites.append(Site(name if idx == 0 else f"{name}#{idx}", _ACT_MODULES[type(m)],
                              int(shape[udim]), udim, tap, producer, norm, name))
            producer, norm = None, None
    return sites


# ----------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def find_sites(model: nn.Module, example_input, *, include: Sequence[str] | None = None,
               exclude: Sequence[str] = (), activations: Iterable[str] | None = None,
               trace: str = "auto") -> list[Site]:
    """Every site of `model`, in forward order.

    Args:
        model: the network (a DDP wrapper is unwrapped).
        example_input: a batch the model accepts: a tensor, a tuple of positional inputs, or
            a mapping of keyword inputs (``model(**example)``); it runs once
            in eval mode under no_grad, so running statistics do not move.
        include / exclude: site names to keep / drop.
        activations: keep only these activation kinds (e.g. ``["relu"]``).
        trace: ``"fx"``, ``"runtime"`` (module calls only), or ``"auto"`` (fx, then runtime).
    Raises:
        NoSitesError: no site found (the message says what was looked for).
    """
    model = _unwrap(model)
    if trace not in ("auto", "fx", "runtime"):
        raise ValueError(f"trace must be 'auto', 'fx' or 'runtime', got {trace!r}")
    if trace == "runtime":
        sites = _runtime_sites(model, example_input)
    else:
        try:
            sites = _trace_sites(model, example_input)
        except Exception as err:  # fx cannot trace data-dependent control flow etc.
            if trace == "fx":
                raise
            warnings.warn(f"dormant: torch.fx could not trace {type(model).__name__} ({err}); "
                          "falling back to module-call order (functional activations are "
                          "not seen)", stacklevel=2)
            sites = _runtime_sites(model, example_input)
    sites = _filter(sites, include, exclude, activations)
    if not sites:
        raise NoSitesError(
            f"no site found in {type(model).__name__}: dormant looks for Linear/ConvNd -> "
            f"[norm] -> activation with activations {activation_kinds()}. Register your "
            "activation with dormant.register_activation, or pass sites explicitly "
            "(dormant.make_site).")
    return sites


def _filter(sites, include, exclude, activations) -> list[Site]:
    names = {s.name for s in sites}
    for want in list(include or []) + list(exclude):
        if want not in names:
            raise KeyError(f"unknown site {want!r}; sites are: {sorted(names)}")
    keep = [s for s in sites if (include is None or s.name in include) and s.name not in exclude]
    if activations is not None:
        acts = set(activations)
        keep = [s for s in keep if s.activation in acts]
    return keep


def make_site(model: nn.Module, activation: str, producer: str | None = None, *,
              norm: str | None = None, num_units: int | None = None,
              unit_dim: int | None = None, name: str | None = None) -> Site:
    """An explicit site: `activation` is the qualified name of an activation module.

    The unit count and axis come from the producer (Linear out_features, Conv out_channels)
    unless given.
    """
    modules = dict(_unwrap(model).named_modules())
    for qual in (activation, producer, norm):
        if qual is not None and qual not in modules:
            raise KeyError(f"no module named {qual!r} in {type(model).__name__}")
    act = modules[activation]
    kind = _ACT_MODULES.get(type(act), type(act).__name__.lower())
    prod = modules.get(producer) if producer else None
    if num_units is None:
        if prod is None:
            raise ValueError("make_site needs num_units when no producer is given")
        num_units = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
    if unit_dim is None:
        unit_dim = 1 if isinstance(prod, CONVS) else -1
    return Site(name or activation, kind, int(num_units), unit_dim,
                Tap("output", activation), producer, norm, activation)

