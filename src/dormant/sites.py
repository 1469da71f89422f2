"""Units and sites: where the neurons of a model live.

A *unit* is one neuron: one output feature of a Linear layer or one channel of a ConvNd layer.
A *site* is the place where units live::

    producer (Linear/ConvNd) -> [norm] -> activation -> consumers

`find_sites` traces the model with torch.fx (so functional ``F.relu`` calls, a ReLU module
reused at two places, residual additions and flatten->Linear are all seen) and falls back to
recording the data flow of one forward (`dormant.dataflow`) for models fx cannot trace. Both
give the same structure of calls (`Dataflow`: which call made a value, which calls read it),
and one set of walkers reads the wiring of every site from it. Every site also says how the
monitor can *observe* it without changing the model (its `Tap`): a hook on the activation
module, a pre-hook on the module that consumes the activation output, or a hook on the
module that feeds a functional activation (the activation is then recomputed on the copy).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .batching import eval_mode
from .dataflow import Dataflow, Event, trace_dataflow
from .sharding import ready

__all__ = [
    "Site",
    "Tap",
    "NoSitesError",
    "find_sites",
    "format_sites",
    "make_site",
    "register_activation",
    "activation_kinds",
    "is_nonneg",
    "fused_experts",
    "fused_layout",
]

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)   # + transformers' Conv1D, see is_producer
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
NORMS = CHANNEL_NORMS + (nn.LayerNorm,)
PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)

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
# transformers' own activation modules (ACT2FN: GPT-2's gelu_new, BERT's gelu, ...), known by
# class name in `transformers.activations`, so that site discovery finds them without
# importing transformers. LinearActivation is the identity: not a site.
_HF_ACTIVATIONS = {
    "GELUActivation": "gelu", "ClippedGELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh", "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu", "MishActivation": "mish", "LaplaceActivation": "laplace",
    "ReLUSquaredActivation": "relu_squared", "SqrtSoftplusActivation": "sqrt_softplus",
    "XIELUActivation": "xielu",
}
# Kinds whose output is >= 0 by construction: the monitor counts them with cheaper ops.
_NONNEG_KINDS: set[str] = {"relu", "relu6", "sigmoid", "softplus", "hardsigmoid",
                           "relu_squared", "sqrt_softplus"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
_METHOD_FN = {"relu": torch.relu, "relu_": torch.relu, "sigmoid": torch.sigmoid,
              "sigmoid_": torch.sigmoid, "tanh": torch.tanh, "tanh_": torch.tanh}


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and w is not None and w.ndim == 2


def is_producer(m: nn.Module) -> bool:
    """A layer whose output features/channels are units: Linear, ConvNd, Conv1D."""
    return isinstance(m, PRODUCERS) or is_conv1d(m)


def out_units(m: nn.Module) -> int:
    """Output features (Linear, Conv1D) or channels (ConvNd) of a producer."""
    if is_conv1d(m):
        return m.weight.shape[1]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def in_units(m: nn.Module) -> int:
    """Input features (Linear, Conv1D) or channels (ConvNd) of a producer."""
    if is_conv1d(m):
        return m.weight.shape[0]
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


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


def act_module_kind(m: nn.Module) -> str | None:
    """The activation kind of module `m` (registered types, then transformers' activation
    classes by name), or None when it is not an activation."""
    kind = _ACT_MODULES.get(type(m))
    if kind is None and type(m).__module__ == "transformers.activations":
        kind = _HF_ACTIVATIONS.get(type(m).__name__)
    return kind


def is_nonneg(kind: str) -> bool:
    """True when activations of this kind never output negative values."""
    return kind in _NONNEG_KINDS


def activation_kinds() -> list[str]:
    """Names of every activation site discovery recognises."""
    return sorted(set(_ACT_MODULES.values()) | set(_ACT_FUNCTIONS.values())
                  | set(_HF_ACTIVATIONS.values()))


class NoSitesError(ValueError):
    """Raised when a model has no unit that dormant can observe."""


@dataclass(frozen=True)
class Tap:
    """How the monitor observes a site's activation output without editing the model.

    kind: ``"output"`` -- forward hook on `module`, its output is the activation output;
          ``"input"``  -- forward pre-hook on `module`, its first input is the activation output;
          ``"recompute"`` -- forward hook on `module`, activation output = `fn(output)`;
          ``"routed"`` -- forward hook on a fused experts `module`: one expert's outputs on
          the tokens routed to it = `fn(module, inputs)` (rows = tokens).
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
    units live on a residual stream fed by more than the producer. `proof` says how the
    pairing was found (a traced graph, recorded data flow, or given by the user);
    `consumers_complete` is False when something other than the listed consumers reads the
    units (a permute, an index, a matmul): methods that rewrite outgoing weights refuse it.
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
    proof: str = "fx"                 # how the wiring was found: fx | dataflow | explicit
    consumers_complete: bool = True   # every reader of the units is a consumer listed here
    up: str | None = None             # gated unit: the up projection (u = act(gate) * up)
    gate_half: int | None = None      # fused gate/up (producer == up): which half is the gate
    readers: tuple[str, ...] = ()     # the operations that read the units and are not known
    feeds_sum: bool = False           # the units are added to another tensor (a residual sum)
    expert: str | None = None         # the expert (a module of a mixture of experts) it is in
    slab: int | None = None           # fused 3-D experts: the expert's index along dim 0 of
    #                                   the producer's gate_up_proj [E, 2F, D] and down_proj

    @property
    def gated(self) -> bool:
        """A gated unit (``act(gate(x)) * up(x) -> down``): two incoming rows (`producer`, the
        gate, and `up`), one outgoing column; the monitor observes the product."""
        return self.up is not None

    @property
    def fused(self) -> bool:
        """Gate and up are the two halves of one layer's output (``gate_up_proj``)."""
        return self.gate_half is not None

    @property
    def observes_nonneg(self) -> bool:
        """The observed outputs are >= 0 by construction (a gated unit's product is signed)."""
        return is_nonneg(self.activation) and not self.gated

    def describe(self) -> str:
        chain = " -> ".join(x for x in (self.producer, self.norm) if x) or "?"
        res = " (+residual)" if self.residual else ""
        gate = f" * {_up_label(self)}" if self.gated else ""
        return f"{self.name}: {chain}{res} -> {self.activation}{gate} [{self.num_units} units]"


def _up_label(site: Site) -> str:
    if not site.fused:
        return site.up
    return f"{site.up}[{'second' if site.gate_half == 0 else 'first'} half]"


# ----------------------------------------------------------------------------------------
# fx tracing
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if act_module_kind(m) or is_producer(m) or isinstance(m, NORMS):
            return True
        return super().is_leaf_module(m, qualname)


def _fx_dataflow(gm: fx.GraphModule) -> Dataflow:
    """The traced graph as the structure a recorded forward gives (`dormant.dataflow`), with
    its nodes as the tensor keys, so that one set of walkers reads both. A module call reads
    its first input only, as a recorded layer does."""
    flow = Dataflow([], {}, {}, {})
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None else ()
        if node.op == "call_module":
            idx = flow.calls.get(node.target, 0)
            flow.calls[node.target] = idx + 1
            flow.add(Event(len(flow.events), node.all_input_nodes[:1], [node],
                           module=node.target, call_index=idx, shape=shape))
            continue
        if node.op == "call_function":
            func = node.target
            name = getattr(func, "__name__", "")
        else:
            func, name = getattr(torch.Tensor, node.target, None), node.target
        flow.add(Event(len(flow.events), list(node.all_input_nodes), [node], func=func,
                       name=name, args=node.args, kwargs=dict(node.kwargs), shape=shape))
    return flow


def _keeps_units(args: tuple, kwargs: dict, udim: int, ndim: int) -> bool:
    """A ``mean``/``sum``/``amax`` over dims that include neither the batch nor the unit
    axis (global pooling): each unit stays a feature of its own."""
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return False
    axes = {d % ndim for d in dims}
    return 0 not in axes and udim % ndim not in axes


_REDUCE = {"mean", "sum", "amax", "max"}


def _unit_dim(producer: nn.Module | None, norm: nn.Module | None, ndim: int) -> int:
    if isinstance(producer, CONVS) or isinstance(norm, CHANNEL_NORMS):
        return 1
    if isinstance(producer, nn.Linear) or isinstance(norm, nn.LayerNorm) or (
            producer is not None and is_conv1d(producer)):
        return -1
    return 1 if ndim >= 4 else -1


def _bind(fn: Callable, args: tuple, kwargs: dict) -> Callable:
    if not args and not kwargs:
        return fn
    return lambda x: fn(x, *args, **kwargs)


def _trace_sites(model: nn.Module, example: torch.Tensor) -> list[Site]:
    graph = _Tracer().trace(model, concrete_args=_concrete_args(model, example))
    gm = fx.GraphModule(model, graph)
    _propagate_shapes(gm, example)
    return _flow_sites(_fx_dataflow(gm), dict(model.named_modules()), "fx")


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
    with eval_mode(gm), torch.no_grad():
        _ShapeProp(gm).run(*_placeholder_args(gm.graph, example))


# ----------------------------------------------------------------------------------------
# the walkers, over a Dataflow: recorded by dormant.dataflow (models fx cannot trace) or read
# from the fx graph (`_fx_dataflow`); call names are matched (operator.iadd is "iadd")
_FLOW_PASS = {"dropout", "contiguous", "clone", "detach", "to", "type", "float", "half",
              "bfloat16", "alpha_dropout", "feature_alpha_dropout"}
_FLOW_ADD = {"add", "add_", "iadd", "__add__", "__iadd__", "__radd__"}
_FLOW_FLATTEN = {"flatten", "view", "reshape"}
_FLOW_IGNORE = {"size", "dim", "numel", "__len__", "__get__", "getattr", "is_floating_point",
                "get_device"}


def _recorded(m: nn.Module) -> bool:
    return (act_module_kind(m) is not None or is_producer(m)
            or isinstance(m, NORMS + PASS_MODULES + POOL_MODULES + (nn.Flatten,)))


def _flow_act_kind(ev, modules) -> str | None:
    if ev.module is not None:
        return act_module_kind(modules[ev.module])
    kind = _ACT_FUNCTIONS.get(ev.func)
    if kind is None and ev.name in _ACT_METHODS and "Tensor" in getattr(ev.func, "__qualname__", ""):
        kind = _ACT_METHODS[ev.name]
    return kind


def _flow_back(flow, key, modules) -> tuple[str | None, str | None, bool, tuple | None]:
    """From an activation's input value, (producer, norm, residual, part) along real data
    flow; `part` is ``(index, parts)`` when the value is one part of the producer's output
    split along its last dim (``gate_up_proj(x).chunk(2, -1)``), else None."""
    norm = None
    while True:
        ev = flow.producer.get(key)
        if ev is None or not ev.inputs:
            return None, norm, False, None
        if ev.module is not None:
            m = modules[ev.module]
            if is_producer(m):
                return ev.module, norm, False, None
            if isinstance(m, NORMS) and norm is None:
                norm, key = ev.module, ev.inputs[0]
                continue
            if isinstance(m, PASS_MODULES):
                key = ev.inputs[0]
                continue
            return None, norm, False, None
        if ev.name in _FLOW_PASS:
            key = ev.inputs[0]
            continue
        if ev.name in _FLOW_ADD:
            for k in ev.inputs:   # the first branch with a producer is the main branch
                p, n, _, part = _flow_back(flow, k, modules)
                if p is not None and part is None:
                    return p, norm or n, True, None
            return None, norm, True, None
        split = _split_part(flow, ev, key)
        if split is not None and norm is None:
            p, n, residual, inner = _flow_back(flow, split[0], modules)
            if p is not None and n is None and not residual and inner is None:
                return p, None, False, split[1:]
        return None, norm, False, None


_FLOW_SPLIT = {"chunk", "split"}
_FLOW_MUL = {"mul", "mul_", "imul", "__mul__", "__rmul__", "__imul__"}


def _split_parts(ev, shape: tuple) -> int | None:
    """Equal parts of a ``chunk``/``split`` along the last dim (`shape`: a part's), or None."""
    dim = ev.kwargs.get("dim", ev.args[2] if len(ev.args) > 2 else 0)
    if not shape or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    arg = ev.kwargs.get("chunks", ev.kwargs.get("split_size_or_sections",
                                                 ev.args[1] if len(ev.args) > 1 else None))
    if ev.name == "chunk" and isinstance(arg, int):
        return arg
    if ev.name == "split" and len(ev.outputs) > 1 and (
            arg == shape[-1] or (isinstance(arg, (list, tuple)) and len(set(arg)) == 1)):
        return len(ev.outputs)
    return None


def _split_part(flow, ev, key) -> tuple | None:
    """(the value split, index, parts) when `key`, made by `ev`, is one of the equal parts of
    a split along the last dim: an output of the split (recorded data flow) or a ``getitem``
    of it (fx)."""
    if ev.name == "getitem" and len(ev.args) > 1 and isinstance(ev.args[1], int):
        src = flow.producer.get(ev.inputs[0])
        parts = (_split_parts(src, ev.shape) if src is not None and src.name in _FLOW_SPLIT
                 else None)
        return (src.inputs[0], ev.args[1] % parts, parts) if parts else None
    if ev.name in _FLOW_SPLIT and len(ev.outputs) > 1 and key in ev.outputs:
        parts = _split_parts(ev, ev.shape)
        return (ev.inputs[0], ev.outputs.index(key), parts) if parts == len(ev.outputs) else None
    return None


def _flow_gate(flow, key, modules, producer: str | None, part, units: int):
    """When the activation output `key` goes straight into a product with the output of
    another layer of as many units (the up projection), or with the other half of the gate's
    own fused layer: ``(the product's event, up, gate_half)``; else None."""
    readers = flow.readers.get(key, [])
    if producer is None or len(readers) != 1:
        return None
    ev = readers[0]
    if ev.module is not None or ev.name not in _FLOW_MUL or len(ev.inputs) != 2:
        return None
    other = ev.inputs[1] if ev.inputs[0] == key else ev.inputs[0]
    up, norm, residual, up_part = _flow_back(flow, other, modules)
    if up is None or norm is not None or residual:
        return None
    if part is None and up_part is None and up != producer and out_units(modules[up]) == units:
        return ev, up, None
    if (part is not None and up_part is not None and up == producer and part[1] == 2
            and up_part[1] == 2 and part[0] != up_part[0]):
        return ev, up, part[0]
    return None


def _flow_forward(flow, key, modules, udim: int, ndim: int
                  ) -> tuple[list[str], list[str], list[str], bool]:
    """From an activation's output value, the layers that read its units, and the operations
    that read them in a way not understood (a permute, an index, a matmul: then the
    consumers are not all known). Channel-preserving operations (dropout, identity, ``.to()``,
    padding of other axes, a product with a scalar) are followed. Past a residual addition,
    the activation that reads the sum starts the next site: the units go on there."""
    consumers, flat, unknown, any_sum = set(), set(), set(), False
    frontier, seen = [(key, False, False)], set()
    while frontier:
        k, flattened, summed = frontier.pop()
        for ev in flow.readers.get(k, []):
            if (ev.index, k) in seen:
                continue
            seen.add((ev.index, k))
            nxt = None
            if ev.module is not None:
                m = modules[ev.module]
                if is_producer(m) and ev.inputs[:1] == [k]:
                    (flat if flattened else consumers).add(ev.module)
                elif isinstance(m, nn.Flatten):
                    nxt = True
                elif isinstance(m, PASS_MODULES + POOL_MODULES + CHANNEL_NORMS):
                    nxt = flattened
                elif not summed:     # past a residual sum, the stream goes on elsewhere
                    unknown.add(f"{ev.module} ({type(m).__name__})")
            elif ev.name in _FLOW_FLATTEN:
                nxt = True
            elif ev.name in _FLOW_ADD:
                summed, nxt, any_sum = True, flattened, True
            elif ev.name in _FLOW_PASS or "pool" in ev.name or _keeps_axis(ev, udim, ndim):
                nxt = flattened
            elif not summed and ev.name not in _FLOW_IGNORE:
                unknown.add(ev.name)
            if nxt is not None:
                frontier.extend((o, nxt, summed) for o in ev.outputs)
    return sorted(consumers), sorted(flat), sorted(unknown), any_sum


def _keeps_axis(ev, udim: int, ndim: int) -> bool:
    """An operation that keeps every unit a feature of its own: a reduction over other axes
    (global pooling), padding of other axes, a product or quotient with a scalar."""
    if ev.name in _REDUCE:
        return _keeps_units(ev.args, ev.kwargs, udim, ndim)
    if ev.name == "pad":
        pad = ev.kwargs.get("pad", ev.args[1] if len(ev.args) > 1 else None)
        if not isinstance(pad, (list, tuple)) or not ndim:
            return False
        axis = ndim - 1 - udim % ndim            # pad pairs run from the last axis backwards
        return len(pad) <= 2 * axis or not any(pad[2 * axis:2 * axis + 2])
    return ev.name in _FLOW_MUL | {"div", "truediv", "__truediv__"} and len(ev.inputs) == 1


def _flow_tap(flow, ev) -> Tap | None:
    """Observe a module activation at its output; a functional one at the input of the layer
    that reads it, else by recomputing it on the output of the layer that feeds it."""
    if ev.module is not None:
        return Tap("output", ev.module, ev.call_index, flow.calls[ev.module])
    out = ev.outputs[0]
    for r in flow.readers.get(out, []):
        if r.module is not None and r.inputs[:1] == [out]:
            return Tap("input", r.module, r.call_index, flow.calls[r.module])
    src = flow.producer.get(ev.inputs[0]) if ev.inputs else None
    if src is not None and src.module is not None and len(flow.readers[ev.inputs[0]]) == 1:
        fn = _METHOD_FN.get(ev.name, ev.func) if ev.func not in _ACT_FUNCTIONS else ev.func
        extra = tuple(a for a in ev.args[1:] if not isinstance(a, (torch.Tensor, fx.Node)))
        kwargs = {k: v for k, v in ev.kwargs.items() if k != "inplace"}
        return Tap("recompute", src.module, src.call_index, flow.calls[src.module],
                   fn=_bind(fn, extra, kwargs))
    return None


def _dataflow_sites(model: nn.Module, example) -> list[Site]:
    flow = trace_dataflow(model, example, _recorded)
    return _flow_sites(flow, dict(model.named_modules()), "dataflow")


def _flow_sites(flow: Dataflow, modules: dict[str, nn.Module], proof: str) -> list[Site]:
    """Every activation of `flow` that can be observed, as a Site wired along the flow."""
    sites, skipped = [], []
    for ev in flow.events:
        kind = _flow_act_kind(ev, modules)
        if kind is None or not ev.inputs or not ev.outputs:
            continue
        site = _flow_site(flow, ev, kind, modules, proof)
        if site is None:
            skipped.append(ev.module or ev.name)
        else:
            sites.append(site)
    if skipped:
        warnings.warn(f"dormant: cannot observe activation(s) {skipped} without editing the "
                      "model (no layer reads or feeds them); use an activation module there "
                      "or pass sites explicitly", stacklevel=4)
    return sites


def _flow_site(flow: Dataflow, ev, kind: str, modules, proof: str) -> Site | None:
    """The site of activation event `ev` (None when it cannot be observed). A gated unit
    (the activation's output times an up projection) is observed at the product, where its
    consumers start."""
    tap = _flow_tap(flow, ev) if ev.shape else None
    producer, norm, residual, part = _flow_back(flow, ev.inputs[0], modules)
    udim = _unit_dim(modules.get(producer), modules.get(norm), len(ev.shape))
    units = int(ev.shape[udim]) if ev.shape else 0
    gate = _flow_gate(flow, ev.outputs[0], modules, producer, part, units) if ev.shape else None
    up = gate_half = None
    out = ev.outputs[0]
    if gate is not None:
        gate_tap = _flow_tap(flow, gate[0])
        if gate_tap is not None and gate_tap.kind == "input" and gate[0].shape == ev.shape:
            tap, out, (_, up, gate_half) = gate_tap, gate[0].outputs[0], gate
    if part is not None and up is None:
        producer = None          # one part of a layer's output: its rows are not the units'
    if tap is None:
        return None
    consumers, flat, unknown, summed = _flow_forward(flow, out, modules, udim, len(ev.shape))
    if ev.module is not None:
        name = ev.module if ev.call_index == 0 else f"{ev.module}#{ev.call_index}"
    else:
        anchor = norm or producer or tap.module
        name = f"{anchor}.{ev.name.rstrip('_')}"
        if tap.call_index:
            name += f"#{tap.call_index}"
    return Site(name, kind, units, udim, tap, producer, norm, ev.module, tuple(consumers),
                tuple(flat), residual, proof=proof, consumers_complete=not unknown, up=up,
                gate_half=gate_half, readers=tuple(unknown), feeds_sum=summed)


# ----------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel and/or ``torch.compile`` wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


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
        trace: ``"fx"`` (symbolic trace), ``"dataflow"`` (one recorded forward: real data
            flow, for models fx cannot trace; ``"runtime"`` is its old name), or ``"auto"``
            (fx, then dataflow).
    Raises:
        NoSitesError: no site found (the message says what was looked for).
    """
    model = ready(_unwrap(model))     # an FSDP2 root first (dormant.sharding)
    if trace not in ("auto", "fx", "dataflow", "runtime"):
        raise ValueError(f"trace must be 'auto', 'fx' or 'dataflow', got {trace!r}")
    if activations is not None:
        unknown = sorted(set(activations) - set(activation_kinds()))
        if unknown:
            raise ValueError(f"unknown activation kind(s) {unknown}; kinds: "
                             f"{', '.join(activation_kinds())} (register_activation adds one)")
    if trace in ("dataflow", "runtime"):
        sites = _dataflow_sites(model, example_input)
    else:
        try:
            sites = _trace_sites(model, example_input)
        except Exception as err:  # fx cannot trace data-dependent control flow etc.
            if trace == "fx":
                raise
            warnings.warn(f"dormant: torch.fx could not trace {type(model).__name__} "
                          f"({''.join(str(err).splitlines()[:1])[:200]}); sites come from the recorded "
                          "data flow of one forward pass instead", stacklevel=2)
            sites = _dataflow_sites(model, example_input)
    sites, unknown = _with_fused(model, sites)
    sites = _filter(_with_experts(model, sites), include, exclude, activations)
    if not sites and unknown:
        raise NoSitesError(f"no site found in {type(model).__name__}: "
                           f"{fused_experts_message(unknown)}")
    if unknown:
        warnings.warn(f"dormant: {fused_experts_message(unknown)}; their units are not sites",
                      stacklevel=2)
    if not sites:
        raise NoSitesError(
            f"no site found in {type(model).__name__}: dormant looks for Linear/ConvNd -> "
            f"[norm] -> activation with activations {activation_kinds()}. Register your "
            "activation with dormant.register_activation, or pass sites explicitly "
            "(dormant.make_site).")
    return sites


def _expert_of(name: str, modules: Mapping[str, nn.Module]) -> tuple[str, str, str] | None:
    """(container, key, rest) when module `name` lies in an expert of a mixture of experts:
    an entry of a ModuleList/ModuleDict whose name says experts (``mlp.experts.3.fc1``,
    ``experts.expert_3.wi``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        container = ".".join(parts[:i])
        if "expert" in parts[i - 1] and isinstance(modules.get(container),
                                                   (nn.ModuleList, nn.ModuleDict)):
            return container, parts[i], ".".join(parts[i + 1:])
    return None


def _with_experts(model: nn.Module, sites: list[Site]) -> list[Site]:
    """Every expert of a mixture of experts as sites, whatever the example routed: a site
    inside one expert is proven for each sibling expert of the same structure (same module
    types and shapes under the same names), so experts the example did not reach are sites
    too, with the same wiring. Each expert site records its expert; a mixture's experts come
    in the order of their container, at the place of its first site."""
    modules = dict(model.named_modules())
    by_name = {s.name: s for s in sites}
    out, done = [], set()
    for site in sites:
        where = _expert_of(site.tap.module, modules)
        if where is None:
            out.append(site)
            continue
        container, key, _ = where
        prefix = f"{container}.{key}."
        group = (container, site.name.replace(prefix, "", 1))   # the site within its expert
        if group in done:
            continue
        done.add(group)
        for other in modules[container]._modules:
            seen = site if other == key else by_name.get(
                site.name.replace(prefix, f"{container}.{other}.", 1))
            if seen is not None:                        # observed: its own wiring and width
                out.append(replace(seen, expert=f"{container}.{other}"))
                continue
            moved = _moved(site, prefix, f"{container}.{other}.", modules)
            if moved is not None:
                out.append(moved)
    return out


def fused_experts(model: nn.Module) -> list[str]:
    """Modules holding the weights of several experts in 3-D parameters ``[E, ...]``
    (transformers' MixtralExperts, Qwen-MoE, OLMoE), whether dormant knows their layout or
    not (`fused_layout`)."""
    out = []
    for name, m in _unwrap(model).named_modules():
        if "expert" in (name.rpartition(".")[2] + type(m).__name__).lower() and any(
                p.ndim == 3 for p in m.parameters(recurse=False)):
            out.append(name)
    return out


EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def fused_experts_message(names: Sequence[str]) -> str:
    return (f"{', '.join(names)} hold their experts in 3-D expert parameters in a layout "
            "dormant does not know: it knows gate_up_proj [experts, 2F, D] (gate half first) "
            "and down_proj [experts, D, F] applied as act(x W_gate^T) * (x W_up^T) W_down^T "
            "per routed token (transformers' Mixtral, Qwen-MoE, OLMoE), proven by running the "
            "module; module-list experts (Switch Transformers) are supported too")


@torch.no_grad()
def fused_layout(m: nn.Module) -> bool:
    """True when `m` is a fused experts module dormant knows: `gate_up_proj` [E, 2F, D],
    `down_proj` [E, D, F], an `act_fn` module, and ``forward(hidden, top_k_index,
    top_k_weights)`` equal to ``sum_k w_k * (act(x Wg_e^T) * (x Wu_e^T)) Wd_e^T`` -- proven by
    running the module on one token per expert, not guessed from names."""
    gu, down = (getattr(m, n, None) for n in EXPERT_WEIGHTS)
    act = getattr(m, "act_fn", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor)
            and isinstance(act, nn.Module) and gu.ndim == down.ndim == 3):
        return False
    n, two_f, d = gu.shape
    if two_f % 2 or tuple(down.shape) != (n, d, two_f // 2) or gu.device.type == "meta":
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d, generator=g).to(gu.device, gu.dtype)
    index = torch.arange(n, device=gu.device).unsqueeze(1)      # token e -> expert e
    weights = torch.ones(n, 1, device=gu.device, dtype=gu.dtype)
    try:
        out = m.forward(x, index, weights)                      # no hooks: a proof only
    except Exception:
        return False
    gate, up = torch.einsum("ed,efd->ef", x, gu).chunk(2, -1)
    expected = torch.einsum("ef,edf->ed", act(gate) * up, down)
    tol = 1e-4 if gu.dtype in (torch.float32, torch.float64) else 2e-2
    return isinstance(out, torch.Tensor) and out.shape == expected.shape and torch.allclose(
        out.float(), expected.float(), rtol=tol, atol=tol * float(expected.abs().max() + 1))


def _routed(module: nn.Module, inputs: tuple, expert: int) -> torch.Tensor:
    """Expert `expert`'s unit outputs ``act(x Wg^T) * (x Wu^T)`` on the tokens routed to it
    (rows), recomputed from the fused experts' inputs. Selecting the routed tokens reads
    their count on the host, as the eager experts forward itself does once per expert."""
    x, index = inputs[0], inputs[1]
    x = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        rows = (index.reshape(x.shape[0], -1) == expert).any(1).nonzero().flatten()
        gate, up = F.linear(x.index_select(0, rows), module.gate_up_proj[expert]).chunk(2, -1)
        return module.act_fn(gate) * up


def _fused_sites(model: nn.Module, name: str) -> list[Site]:
    """One site per expert of the fused experts module `name` (a proven `fused_layout`):
    expert e's unit i owns gate_up_proj[e, i] (gate), gate_up_proj[e, F + i] (up) and
    down_proj[e, :, i]."""
    m = model.get_submodule(name)
    n, two_f, _ = m.gate_up_proj.shape
    kind = act_module_kind(m.act_fn) or type(m.act_fn).__name__.lower()
    return [Site(f"{name}.{e}", kind, two_f // 2, -1,
                 Tap("routed", name, fn=lambda mod, inputs, e=e: _routed(mod, inputs, e)),
                 producer=name, act_module=f"{name}.act_fn", consumers=(name,),
                 proof="numeric+structure", up=name, gate_half=0, expert=f"{name}.{e}", slab=e)
            for e in range(n)]


def _with_fused(model: nn.Module, sites: list[Site]) -> tuple[list[Site], list[str]]:
    """Sites with every fused experts module of a known layout as one site per expert (in
    place of what the trace saw inside it: an activation with no producer); returns the
    fused experts modules of an unknown layout too."""
    fused = fused_experts(model)
    if not fused:
        return sites, []
    known = [n for n in fused if fused_layout(model.get_submodule(n))]
    out, done = [], set()
    for site in sites:
        inside = next((n for n in fused if site.tap.module.startswith(n + ".")
                       or site.tap.module == n), None)
        if inside is None:
            out.append(site)
        elif inside in known and inside not in done:
            done.add(inside)
            out += _fused_sites(model, inside)
    for name in known:
        if name not in done:
            out += _fused_sites(model, name)
    return out, [n for n in fused if n not in known]


def _moved(site: Site, old: str, new: str, modules) -> Site | None:
    """`site` with every module under `old` renamed under `new` (None when the other expert
    does not hold the same modules)."""
    def move(name):
        return new + name[len(old):] if name and name.startswith(old) else name

    names = [site.producer, site.norm, site.act_module, site.up, site.tap.module,
             *site.consumers, *site.flatten_consumers]
    for n in names:
        if n and n.startswith(old) and not _same(modules.get(n), modules.get(move(n))):
            return None
    return replace(site, name=move(site.name), producer=move(site.producer),
                   norm=move(site.norm), act_module=move(site.act_module), up=move(site.up),
                   tap=replace(site.tap, module=move(site.tap.module)),
                   consumers=tuple(move(c) for c in site.consumers),
                   flatten_consumers=tuple(move(c) for c in site.flatten_consumers),
                   proof=f"{site.proof}+structure", expert=new[:-1])


def _same(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None or type(a) is not type(b):
        return False
    return [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def format_sites(sites: Sequence[Site]) -> str:
    """The sites as a table to check the wiring at a glance: producer -> norm -> activation
    -> consumers, units, and how the pairing was proven (fx graph, recorded data flow, or
    explicit); ``+res`` marks a residual stream, ``* up`` a gated unit's up projection (the
    gate is the producer), ``?`` consumers not all known (the unknown readers follow)."""
    head = ("site", "producer -> norm -> act", "consumers", "units", "proof")
    rows = [head]
    for s in sites:
        if s.slab is not None:      # fused 3-D experts: the expert's slices of two tensors
            rows.append((s.name, f"{s.producer}.{EXPERT_WEIGHTS[0]}[{s.slab}] -> "
                         f"{s.activation}(first half) * second half",
                         f"{s.producer}.{EXPERT_WEIGHTS[1]}[{s.slab}]", str(s.num_units), s.proof))
            continue
        chain = " -> ".join([s.producer or "(none)"] + ([s.norm] if s.norm else [])
                            + [s.activation + (" +res" if s.residual else "")])
        if s.gated:
            chain += f" * {_up_label(s)}"
        cons = ", ".join(list(s.consumers) + [f"{c} (flat)" for c in s.flatten_consumers])
        cons = (cons or "(none)") + ("" if s.consumers_complete else
                                     f" ? (read by {', '.join(s.readers) or 'unknown'})")
        rows.append((s.name, chain, cons, str(s.num_units), s.proof))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i == 3 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


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
    kind = act_module_kind(act) or type(act).__name__.lower()
    prod = modules.get(producer) if producer else None
    if num_units is None:
        if prod is None:
            raise ValueError("make_site needs num_units when no producer is given")
        num_units = out_units(prod)
    if unit_dim is None:
        unit_dim = 1 if isinstance(prod, CONVS) else -1
    return Site(name or activation, kind, int(num_units), unit_dim,
                Tap("output", activation), producer, norm, activation, proof="explicit")

