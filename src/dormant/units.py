"""Where a site's units live in the parameters: incoming rows and outgoing columns.

For a site ``producer -> [norm] -> act -> consumers`` unit ``u`` owns

    incoming: producer.weight[u] (a Linear row or a Conv filter), producer.bias[u],
              norm.weight[u], norm.bias[u] (and the norm's running statistics)
    gated:    gate.weight[u] and up.weight[u] (and biases); a fused gate/up layer's rows
              u and F + u (the site records which half is the gate)
    outgoing: consumer.weight[:, u] (a Linear column, a Conv input channel), or, for a Linear
              that reads the units after a flatten, the block of columns of unit u
              (channels-first ``(C, H, W)`` flattening) or the tiled columns (units last).
    expert e of fused 3-D experts: gate_up_proj[e, u], gate_up_proj[e, F + u] and
              down_proj[e, :, u] (`Slice.expert` = e).

Methods ask these functions for `Slice` objects instead of guessing from module order, so
re-initialising (ReDo), stripping (Synaptic Stripping), masking (AP, NNrelief) and removing
(DemP) all agree on what a unit is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .sites import CHANNEL_NORMS, CONVS, EXPERT_WEIGHTS, Site, _unwrap, in_units, is_conv1d

__all__ = ["Slice", "incoming", "outgoing", "unit_mask_for", "fan_in_rows", "site_rows",
           "rows_to_weight", "as_rows", "from_rows", "weight_name"]


@dataclass(frozen=True)
class Slice:
    """Entries of tensor `name` (a parameter or buffer) that belong to units.

    dim: the axis indexed by units. group: consecutive (layout "block") or strided
    (layout "tile") entries per unit along `dim`, for Linear layers that read a flattened
    tensor (group = positions per unit).
    """
    name: str
    dim: int
    group: int = 1
    layout: str = "block"
    kind: str = "weight"     # weight | bias | norm | stat
    conv_groups: int = 1     # a grouped convolution consumer: filters read their group only
    offset: int = 0          # a fused gate/up layer: the units' rows start here ...
    size: int = 0            # ... along a dim of this size (0: the units fill the dim)
    expert: int | None = None  # fused 3-D experts: only this index along dim 0

    def units_of(self, entries: torch.Tensor, num_units: int) -> torch.Tensor:
        """A per-entry vector along `dim` (one value per row) back to the units' values (the
        inverse of `index` for one entry per unit)."""
        return entries[self.offset:self.offset + num_units] if self.size else entries

    def index(self, units: torch.Tensor, num_units: int) -> torch.Tensor:
        """Boolean mask along `dim` selecting the entries of the units in `units` (bool[U])."""
        units = units.bool()
        if units.numel() != num_units:
            raise ValueError(f"{self.name}: expected {num_units} unit flags, got {units.numel()}")
        if self.size:
            full = units.new_zeros(self.size)
            full[self.offset:self.offset + num_units] = units
            return full
        if self.group == 1:
            return units
        if self.layout == "block":
            return units.repeat_interleave(self.group)
        return units.repeat(self.group)


def _module(model: nn.Module, name: str) -> nn.Module:
    return _unwrap(model).get_submodule(name)


def incoming(model: nn.Module, site: Site, *, stats: bool = True) -> list[Slice]:
    """The producer's rows/filters and bias, then (a gated unit) the up projection's rows and
    bias, then the norm's affine parameters and (with `stats`) running statistics. Empty when
    the site has no producer. A fused gate/up layer gives two slices of each of its tensors:
    the gate's half, then the up half."""
    if site.producer is None:
        return []
    out = _rows(model, site.producer, site, gate=True)
    if site.gated:
        out += _rows(model, site.up, site, gate=False)
    if site.norm is not None:
        norm = _module(model, site.norm)
        if isinstance(norm, nn.GroupNorm):
            return out  # statistics mix units of a group: affine params only below
        for attr in ("weight", "bias"):
            if getattr(norm, attr, None) is not None and _per_unit(norm, attr, site):
                out.append(Slice(f"{site.norm}.{attr}", 0, kind="norm"))
        if stats and isinstance(norm, CHANNEL_NORMS):
            for attr in ("running_mean", "running_var"):
                if getattr(norm, attr, None) is not None:
                    out.append(Slice(f"{site.norm}.{attr}", 0, kind="stat"))
    return out


def weight_name(site: Site) -> str:
    """The tensor holding the site's incoming rows: its producer's weight, or fused experts'
    ``gate_up_proj`` (the site's expert is `site.slab` along dim 0)."""
    return f"{site.producer}.{EXPERT_WEIGHTS[0] if site.slab is not None else 'weight'}"


def _rows(model: nn.Module, name: str, site: Site, gate: bool) -> list[Slice]:
    """Rows of one incoming layer (weight and bias): the gate's or the up projection's, or
    the right half of a fused gate/up layer."""
    m = _module(model, name)
    offset = size = 0
    if site.fused:
        half = site.gate_half if gate else 1 - site.gate_half
        offset, size = half * site.num_units, 2 * site.num_units
    if site.slab is not None:
        return [Slice(weight_name(site), 1, offset=offset, size=size, expert=site.slab)]
    out = [Slice(f"{name}.weight", 1 if is_conv1d(m) else 0, offset=offset, size=size)]
    if getattr(m, "bias", None) is not None:
        out.append(Slice(f"{name}.bias", 0, kind="bias", offset=offset, size=size))
    return out


def _per_unit(norm: nn.Module, attr: str, site: Site) -> bool:
    t = getattr(norm, attr)
    return t.ndim == 1 and t.numel() == site.num_units


def outgoing(model: nn.Module, site: Site) -> list[Slice]:
    """Columns / input channels of every consumer. A grouped convolution's filters read the
    channels of their own group only: in weight[o, j], o in group g = o // (out / groups),
    j is input channel g * (C / groups) + j (see `unit_mask_for`)."""
    if site.slab is not None:
        return [Slice(f"{site.producer}.{EXPERT_WEIGHTS[1]}", 2, expert=site.slab)]
    out = []
    for name in site.consumers:
        m = _module(model, name)
        width = in_units(m)
        if width != site.num_units:
            raise ValueError(f"{name} reads {width} inputs, site {site.name} has "
                             f"{site.num_units} units: pass sites explicitly")
        groups = m.groups if isinstance(m, CONVS) else 1
        out.append(Slice(f"{name}.weight", 0 if is_conv1d(m) else 1, conv_groups=groups))
    for name in site.flatten_consumers:
        m = _module(model, name)
        if not isinstance(m, nn.Linear) or m.in_features % site.num_units:
            raise ValueError(f"{name} reads a flattened tensor that is not a multiple of the "
                             f"{site.num_units} units of {site.name}")
        group = m.in_features // site.num_units
        layout = "block" if site.unit_dim == 1 else "tile"
        out.append(Slice(f"{name}.weight", 1, group, layout))
    return out


def tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by qualified name."""
    model = _unwrap(model)
    mod, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod) if mod else model, attr)


def unit_mask_for(model: nn.Module, sl: Slice, units: torch.Tensor, num_units: int) -> torch.Tensor:
    """A bool tensor shaped like `sl`'s tensor, True at the entries of `units`."""
    t = tensor(model, sl.name)
    if sl.conv_groups > 1:     # weight (out, C / groups, *k): filter o reads its group's units
        per_group = units.to(t.device).bool().view(sl.conv_groups, -1)       # (groups, C/g)
        rows = per_group.repeat_interleave(t.shape[0] // sl.conv_groups, dim=0)  # (out, C/g)
        return rows.view(*rows.shape, *[1] * (t.ndim - 2)).expand_as(t)
    idx = sl.index(units.to(t.device), num_units)
    shape = [1] * t.ndim
    shape[sl.dim] = -1
    where = idx.view(shape).expand_as(t)
    if sl.expert is not None:
        expert = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
        expert[sl.expert] = True
        where = where & expert.view(-1, *[1] * (t.ndim - 1))
    return where


def fan_in_rows(model: nn.Module, site: Site) -> torch.Tensor:
    """The producer's weight as (units, fan_in): Linear rows, flattened Conv filters or
    Conv1D columns (a view); for a gated unit the gate's rows (the gate half of a fused
    layer)."""
    if site.producer is None:
        raise ValueError(f"site {site.name} has no producer")
    return site_rows(model, site, tensor(model, weight_name(site)))


def site_rows(model: nn.Module, site: Site, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the producer's weight (the weight, a mask) as the site's
    (units, fan_in) rows (a view): the gate's half of a fused gate/up layer (of the site's
    expert for fused 3-D experts)."""
    rows = t[site.slab] if site.slab is not None else as_rows(_module(model, site.producer), t)
    if site.fused:
        start = site.gate_half * site.num_units
        rows = rows[start:start + site.num_units]
    return rows


def rows_to_weight(model: nn.Module, site: Site, rows: torch.Tensor,
                   fill: bool = True) -> torch.Tensor:
    """(units, fan_in) rows of the site back to the shape of the producer's weight (inverse
    of `site_rows`); the other half of a fused gate/up layer is `fill`."""
    if site.slab is not None:
        full = torch.full_like(tensor(model, weight_name(site)), fill, dtype=rows.dtype)
        full[site.slab, site.gate_half * site.num_units:][:site.num_units] = rows
        return full
    producer = _module(model, site.producer)
    if site.fused:
        full = torch.full_like(as_rows(producer, producer.weight), fill, dtype=rows.dtype)
        start = site.gate_half * site.num_units
        full[start:start + site.num_units] = rows
        rows = full
    return from_rows(producer, rows)


def as_rows(producer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like `producer`'s weight (the weight, a mask) as (units, fan_in)."""
    return t.t() if is_conv1d(producer) else t.flatten(1)


def from_rows(producer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(units, fan_in) back to the shape of `producer`'s weight (inverse of `as_rows`)."""
    return rows.t() if is_conv1d(producer) else rows.reshape(producer.weight.shape)
