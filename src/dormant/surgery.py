"""Physical removal of units, with the optimizer state sliced to match.

Units whose wiring dormant proves itself are removed from the sites: a site that is not on a
residual stream, whose every reader is a listed consumer (Linear, Conv with groups=1,
transformers' Conv1D) and whose norm, if any, is per unit (BatchNorm) loses its producer rows
(a gated unit: the gate's and the up projection's rows, both halves of a fused gate/up layer),
its norm entries and running statistics, and its consumers' columns (for flatten -> Linear,
all positions of the unit). Nothing is traced for these, so models with a KV cache (whose
outputs are tuples), tied embeddings or a ``torch.compile`` wrapper are sliced the same way.

Where dormant cannot prove the coupling (a residual stream, a depthwise convolution reading
the units, a LayerNorm over the units), Torch-Pruning's dependency graph (Fang et al., CVPR
2023; `pip install 'dormant[prune]'`) does the graph work: removing output channel u of a
producer also removes the norm layer's entries and the input channel u of every consumer. On
a residual stream one channel is coupled across every layer that writes or reads it; such a
unit is removed only when it is dead at *every* coupled site ("every reader agrees"), so the
computation never changes for units that carry signal. The classifier's outputs are never
sites, so never removed.

After each removal the optimizer (SGD momentum, Adam moments, ...) is updated in place: the
new, smaller parameters replace the old ones in its param groups and each per-entry state
tensor is sliced with the same indices, so training continues as if only the units had gone.

A compacted model saves as its state dict plus `architecture(model)` (plain ints, loads with
``torch.load(weights_only=True)``); `resize(fresh_model, arch)` reshapes a freshly built
model so the state dict loads into it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .batching import eval_mode
from .sites import (
    CONVS,
    EXPERT_WEIGHTS,
    NORMS,
    PRODUCERS,
    Site,
    _unwrap,
    fused_layout,
    is_conv1d,
    is_producer,
)
from .units import incoming, outgoing

__all__ = ["remove_units", "provable", "coupled_sites", "architecture", "resize",
           "count_units"]


def _tp():
    try:
        import torch_pruning as tp
    except ImportError:
        raise ImportError("removing units physically needs Torch-Pruning: "
                          "pip install 'dormant[prune]'") from None
    return tp


def _out_fn(tp, module: nn.Module):
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    if isinstance(module, CONVS):
        return tp.prune_conv_out_channels
    raise TypeError(f"cannot remove output units of {type(module).__name__}")


def _graph(tp, model: nn.Module, example_input: torch.Tensor):
    """Torch-Pruning's dependency graph (it traces with autograd, whatever the caller's grad
    mode; train/eval flags are restored so running statistics are not disturbed)."""
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)


def _group_items(group) -> list[tuple[nn.Module, str, list[int], list[int]]]:
    """(module, "out"|"in", local idxs, root idxs) of the real layers in a TP group."""
    out = []
    for item in group:
        dep = item.dep
        mod = dep.target.module
        kind = getattr(dep.handler, "__name__", "")
        if not isinstance(mod, PRODUCERS + NORMS) or kind not in ("prune_out_channels",
                                                                   "prune_in_channels"):
            continue
        out.append((mod, "out" if kind == "prune_out_channels" else "in",
                    list(item.idxs), list(item.root_idxs)))
    return out


def remove_units(model: nn.Module, sites: Sequence[Site], units: Mapping[str, torch.Tensor],
                 example_input=None, optimizer: torch.optim.Optimizer | None = None
                 ) -> dict[str, torch.Tensor]:
    """Remove `units` ({site: BoolTensor[U]}, e.g. the dead ones) physically. Sites whose
    wiring dormant proves (`provable`) are sliced directly; the others go through
    Torch-Pruning's graph (traced on `example_input`): a unit coupled to other sites (a
    residual stream) goes only if it is flagged at every one of them; units coupled to the
    embedding of an attention layer (a transformer's residual stream) stay. Fused 3-D
    experts lose the same count of units in every expert, or nothing (refused). Returns, per
    site, which units were removed (BoolTensor[U], the original indexing). Sites must be
    found again afterwards (their unit counts changed)."""
    model = _unwrap(model)
    removed = {s.name: torch.zeros(s.num_units, dtype=torch.bool) for s in sites}
    _slice_experts(model, [s for s in sites if s.slab is not None], units, optimizer, removed)
    traced = []
    for site in sites:
        flags = units.get(site.name)
        if site.producer is None or site.slab is not None or flags is None or not flags.any():
            continue
        if provable(model, site):
            _slice_site(model, site, flags.cpu().bool(), optimizer)
            removed[site.name] = flags.cpu().bool().clone()
        else:
            traced.append(site)
    if traced:
        if example_input is None:
            raise ValueError(f"removing units of {[s.name for s in traced]} needs "
                             "example_input (their coupling is traced by Torch-Pruning)")
        _remove_traced(model, traced, sites, units, example_input, optimizer, removed)
    return removed


def provable(model: nn.Module, site: Site) -> bool:
    """True when dormant's own wiring of `site` is enough to remove its units: not on a
    residual stream (neither summed into the activation's input nor added to anything after
    it), every reader a listed Linear/Conv1D/Conv(groups=1) consumer, a per-unit norm
    (BatchNorm) or none, and no unit read by anything else."""
    model = _unwrap(model)
    if site.slab is not None:       # an expert's slices of fused 3-D tensors
        return True
    if site.producer is None or site.residual or site.feeds_sum or not site.consumers_complete:
        return False
    if not site.consumers and not site.flatten_consumers:
        return False
    if site.norm is not None and not isinstance(model.get_submodule(site.norm),
                                                nn.modules.batchnorm._BatchNorm):
        return False
    for name in (site.producer, site.up, *site.consumers):
        m = model.get_submodule(name) if name else None
        if m is not None and (not is_producer(m) or getattr(m, "groups", 1) != 1):
            return False
    return all(isinstance(model.get_submodule(n), nn.Linear) for n in site.flatten_consumers)


@torch.no_grad()
def _slice_site(model: nn.Module, site: Site, flags: torch.Tensor, optimizer) -> None:
    """Drop the entries of units `flags` from every tensor of the site (incoming rows, norm
    entries and statistics, consumer columns), optimizer state sliced the same way."""
    slices = incoming(model, site) + outgoing(model, site)
    cuts: dict[str, dict[int, torch.Tensor]] = {}      # tensor -> dim -> entries to drop
    for sl in slices:
        drop, per = sl.index(flags, site.num_units), cuts.setdefault(sl.name, {})
        per[sl.dim] = per[sl.dim] | drop if sl.dim in per else drop   # both fused halves
    for name, dims in cuts.items():
        _replace(model, name, [(d, (~m).nonzero().flatten()) for d, m in dims.items()],
                 optimizer)
    for owner in {sl.name.rpartition(".")[0] for sl in slices}:
        _resync(model.get_submodule(owner))


@torch.no_grad()
def _slice_experts(model: nn.Module, sites: Sequence[Site], units, optimizer,
                   removed: dict) -> None:
    """Remove units of fused 3-D experts: the same count from every expert of a module (its
    tensors stay rectangular), each expert its own units; refused otherwise."""
    by_module: dict[str, dict[int, Site]] = {}
    for s in sites:
        by_module.setdefault(s.producer, {})[s.slab] = s
    for name, group in by_module.items():
        experts = model.get_submodule(name)
        n, width = experts.down_proj.shape[0], experts.down_proj.shape[2]
        flags = [units.get(group[e].name) if e in group else None for e in range(n)]
        flags = torch.stack([torch.zeros(width, dtype=torch.bool) if f is None
                             else f.cpu().bool() for f in flags])
        counts = flags.sum(1).tolist()
        if not any(counts):
            continue
        if len(set(counts)) > 1:
            raise ValueError(
                f"{name} holds its experts in 3-D tensors, so every expert must lose the same "
                f"number of units; asked to remove {counts} per expert: remove an equal count "
                "from each (e.g. each expert's k lowest-scored units) or mask the units instead")
        _cut_experts(experts, name, ~flags, optimizer)
        for e, s in group.items():
            removed[s.name] = flags[e].clone()


def _cut_experts(experts: nn.Module, name: str, keep: torch.Tensor, optimizer) -> None:
    """Keep units `keep` (E, F) of every expert: its gate and up rows, its down columns."""
    n = keep.shape[0]
    gu = keep.repeat(1, 2).to(experts.gate_up_proj.device)               # gate and up rows
    down = keep.to(experts.down_proj.device)
    cuts = {EXPERT_WEIGHTS[0]: lambda t: t[gu].reshape(n, -1, t.shape[2]),
            EXPERT_WEIGHTS[1]: lambda t: t.transpose(1, 2)[down].reshape(
                n, -1, t.shape[1]).transpose(1, 2)}
    old = {a: getattr(experts, a) for a in cuts}
    for a, cut in cuts.items():
        setattr(experts, a, nn.Parameter(cut(old[a].detach()).contiguous(),
                                         requires_grad=old[a].requires_grad))
    if not fused_layout(experts):       # e.g. a grouped-mm kernel's alignment
        for a, p in old.items():
            setattr(experts, a, p)
        raise ValueError(f"{name} no longer computes its experts with {int(keep[0].sum())} "
                         "units each (its kernel may need a width that is a multiple of 8): "
                         "remove a count that leaves such a width, or mask the units")
    if optimizer is not None:
        for a, cut in cuts.items():
            _swap_with(optimizer, old[a], getattr(experts, a), cut)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = experts.down_proj.shape[2]


def _replace(model: nn.Module, name: str, index: list[tuple[int, torch.Tensor]],
             optimizer) -> None:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    old = getattr(mod, attr)
    new = old.detach()
    for dim, keep in index:
        new = new.index_select(dim, keep.to(new.device))
    if isinstance(old, nn.Parameter):
        p = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        setattr(mod, attr, p)
        if optimizer is not None:
            _swap_param(optimizer, old, p, index)
    else:
        setattr(mod, attr, new.contiguous())


def _resync(m: nn.Module) -> None:
    """Size attributes after the tensors of `m` were sliced."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape
    elif isinstance(m, CONVS):
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif is_conv1d(m):
        m.nf = w.shape[1]
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.num_features = (w if w is not None else m.running_mean).shape[0]


def _remove_traced(model, traced: Sequence[Site], sites: Sequence[Site], units, example_input,
                   optimizer, removed: dict) -> None:
    """Torch-Pruning's path for the sites dormant cannot prove alone (see the docstring)."""
    tp = _tp()
    modules = {m: n for n, m in model.named_modules()}
    by_producer = {s.producer: s for s in sites if s.producer is not None}
    done: set[str] = set()
    graph = None
    for site in traced:
        flags = units.get(site.name)
        if site.name in done:
            continue
        if graph is None:
            graph = _graph(tp, model, example_input)
        producer = model.get_submodule(site.producer)
        idxs = flags.nonzero().flatten().tolist()
        group = graph.get_pruning_group(producer, _out_fn(tp, producer), idxs=idxs)
        if _touches_attention(group):    # the embedding width of attention heads: left alone
            continue
        keep_root = set(idxs)
        coupled: dict[str, dict[int, int]] = {}     # site -> root idx -> its local idx
        for mod, kind, local, root in _group_items(group):
            other = by_producer.get(modules.get(mod)) if kind == "out" else None
            if other is None:
                continue
            coupled[other.name] = dict(zip(root, local))
            other_flags = units.get(other.name)
            for l, r in zip(local, root):
                if other_flags is None or not bool(other_flags[l]):
                    keep_root.discard(r)
        done.update(coupled)
        if not keep_root:
            continue
        root = sorted(keep_root)
        group = graph.get_pruning_group(producer, _out_fn(tp, producer), idxs=root)
        _prune_with_state(model, group, optimizer)
        for name, to_local in (coupled or {site.name: {r: r for r in root}}).items():
            removed[name][[to_local[r] for r in root]] = True
        graph = None   # shapes changed: rebuild before the next group


def _touches_attention(group) -> bool:
    """True when the group resizes an attention layer's embedding: its width must stay a
    multiple of the head count (64 -> 62 breaks nn.MultiheadAttention), so such channels are
    not removed."""
    return any(isinstance(item.dep.target.module, nn.MultiheadAttention) for item in group)


def coupled_sites(model: nn.Module, sites: Sequence[Site], example_input=None
                  ) -> dict[str, frozenset[str]]:
    """For every site with a producer: the sites whose units are the same channels (itself
    included). A site coupled only with itself holds block-internal units; a site dormant
    proves (`provable`) is, without tracing; the others are read from Torch-Pruning's graph."""
    model = _unwrap(model)
    out = {s.name: frozenset({s.name}) for s in sites
           if s.producer is not None and provable(model, s)}
    rest = [s for s in sites if s.producer is not None and s.name not in out]
    if not rest:
        return out
    tp = _tp()
    graph = _graph(tp, model, example_input)
    modules = {m: n for n, m in model.named_modules()}
    by_producer = {s.producer: s.name for s in sites if s.producer is not None}
    for site in rest:
        producer = model.get_submodule(site.producer)
        group = graph.get_pruning_group(producer, _out_fn(tp, producer), idxs=[0])
        names = {by_producer.get(modules.get(mod)) for mod, kind, _, _ in _group_items(group)
                 if kind == "out"}
        out[site.name] = frozenset(n for n in names if n is not None) | {site.name}
    return out


def _prune_with_state(model: nn.Module, group, optimizer) -> None:
    """Prune a TP group and carry the optimizer state of every reshaped parameter."""
    items = _group_items(group)
    cut: dict[nn.Module, dict[str, list[int]]] = {}
    for mod, kind, local, _ in items:
        cut.setdefault(mod, {}).setdefault(kind, []).extend(local)
    old = {(mod, attr): getattr(mod, attr) for mod in cut for attr in ("weight", "bias")
           if isinstance(getattr(mod, attr, None), nn.Parameter)}
    group.prune()
    if optimizer is None:
        return
    for (mod, attr), p_old in old.items():
        p_new = getattr(mod, attr)
        if p_new is p_old:
            continue
        index = []   # (dim, kept indices)
        if "out" in cut[mod]:
            index.append((0, _kept(p_old.shape[0], cut[mod]["out"])))
        if "in" in cut[mod] and attr == "weight" and p_old.ndim > 1:
            index.append((1, _kept(p_old.shape[1], cut[mod]["in"])))
        _swap_param(optimizer, p_old, p_new, index)


def _kept(size: int, removed: list[int]) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().flatten()


def _swap_param(optimizer, p_old, p_new, index) -> None:
    def cut(v):
        for dim, keep in index:
            v = v.index_select(dim, keep.to(v.device))
        return v
    _swap_with(optimizer, p_old, p_new, cut)


def _swap_with(optimizer, p_old, p_new, cut) -> None:
    """`p_new` = cut(`p_old`) in the optimizer: its place in the groups, and its state
    tensors shaped like the parameter cut the same way."""
    for g in optimizer.param_groups:
        g["params"] = [p_new if p is p_old else p for p in g["params"]]
    state = optimizer.state.pop(p_old, None)
    if not state:
        return
    optimizer.state[p_new] = {k: cut(v) if torch.is_tensor(v) and v.shape == p_old.shape else v
                              for k, v in state.items()}


# -- architecture descriptions ------------------------------------------------------------
def architecture(model: nn.Module) -> dict[str, list[int]]:
    """The width of every Linear/Conv/norm layer (plain ints: saves with weights_only)."""
    out = {}
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, nn.Linear):
            out[name] = [m.in_features, m.out_features]
        elif isinstance(m, CONVS):
            out[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = [m.num_features]
        elif isinstance(m, nn.LayerNorm):
            out[name] = list(m.normalized_shape)
    return out


@torch.no_grad()
def resize(model: nn.Module, arch: Mapping[str, Sequence[int]]) -> nn.Module:
    """Give a freshly built model the widths of `arch` (values are then loaded from a state
    dict); parameters are re-created empty, so load weights afterwards."""
    model = _unwrap(model)
    for name, shape in arch.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            m.in_features, m.out_features = shape
            _new(m, "weight", (shape[1], shape[0]))
            _new(m, "bias", (shape[1],))
        elif isinstance(m, CONVS):
            m.in_channels, m.out_channels = shape
            k = tuple(m.weight.shape[2:])
            _new(m, "weight", (shape[1], shape[0] // m.groups, *k))
            _new(m, "bias", (shape[1],))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = shape[0]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _new(m, attr, (shape[0],))
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = tuple(shape)
            for attr in ("weight", "bias"):
                _new(m, attr, tuple(shape))
    return model


def _new(m: nn.Module, attr: str, shape) -> None:
    t = getattr(m, attr, None)
    if t is None:
        return
    fresh = torch.zeros(shape, dtype=t.dtype, device=t.device)
    if isinstance(t, nn.Parameter):
        setattr(m, attr, nn.Parameter(fresh, requires_grad=t.requires_grad))
    else:
        setattr(m, attr, fresh)


def count_units(sites: Sequence[Site]) -> int:
    return sum(s.num_units for s in sites)
