"""Gradual structured pruning by filter norm: the baseline a user would pick instead of DemP.

Rule: every `prune_every` steps between `start` and `end` (fractions of the run), each site
with block-internal units loses the units whose incoming filter/row has the smallest L1 norm
(Li et al. 2017, "Pruning Filters for Efficient ConvNets"; `criterion="bn_scale"` ranks by
|norm scale| instead, Liu et al. 2017), so that its width follows the cubic schedule of Zhu &
Gupta (2017) from the original width to its target:
    width(t) = target + (width_0 - target) (1 - (t - start) / (end - start))^3.
Units are removed physically (`dormant.surgery`: from dormant's own wiring, Torch-Pruning
only where the coupling must be traced), the optimizer state sliced to match. A gated unit
(``act(gate) * up -> down``) is ranked by its gate row and removed whole (gate row, up row,
down column). Targets: `widths` (per site, e.g. the widths a DemP run ended with) or a
uniform `sparsity`. Residual-stream sites (coupled channels) are left alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..options import option
from ..sites import _unwrap
from ..surgery import coupled_sites
from ..units import fan_in_rows
from .base import METHODS, EpochResult, check_option
from .removal import RemovalMethod, RemovalOptions

__all__ = ["StructuredPruning", "lowest_norm_units"]


def lowest_norm_units(scores: torch.Tensor, n: int) -> torch.Tensor:
    """BoolTensor[U]: the n units with the smallest scores (ties: lower index first)."""
    flags = torch.zeros(scores.numel(), dtype=torch.bool)
    if n > 0:
        flags[torch.sort(scores.detach().cpu(), stable=True).indices[:n]] = True
    return flags


@METHODS.register
class StructuredPruning(RemovalMethod):
    """Gradual L1-norm (or BN-scale) channel pruning to a target width, removed physically.

    sparsity: fraction of each site's units removed by `end` (ignored where `widths` gives
    a site's final width); start, end: fractions of the run's steps; criterion: l1 | bn_scale.
    """

    name = "structured"

    @dataclass
    class Options(RemovalOptions):
        sparsity: float = option(0.5, "fraction of each site's units removed by `end`",
                                 within=(0, 1), bounds="[)")
        widths: Mapping[str, int] | None = option(None, "final width per site (overrides "
                                                  "sparsity there), e.g. a DemP run's")
        start: float = option(0.1, "removals begin at this fraction of the run",
                              within=(0, 1), bounds="[)")
        end: float = option(0.7, "target widths are reached at this fraction of the run",
                            within=(0, 1), bounds="(]")
        criterion: str = option("l1", "unit score: l1 (filter norm) or bn_scale",
                                choices=("l1", "bn_scale"))

        def check(self, owner: str) -> None:
            check_option(self.start < self.end, owner,
                         f"start: expected start < end, got start={self.start}, end={self.end}")
            bad = {k: v for k, v in (self.widths or {}).items()
                   if isinstance(v, bool) or not isinstance(v, int) or v < 1}
            check_option(not bad, owner, f"widths: every final width must be an integer >= 1 "
                                         f"(a site keeps at least one unit), got {bad}")

    def __init__(self, **options):
        super().__init__(**options)
        self.targets: dict[str, int] = {}

    def _prepare(self) -> None:
        super()._prepare()
        coupled = coupled_sites(self.model, self.sites, self.example)
        widths = dict(self.opts.widths or {})
        unknown = sorted(set(widths) - set(self.initial["width"]))
        if unknown:
            raise ValueError(f"{self.name}: no site(s) {unknown}; sites: "
                             f"{sorted(self.initial['width'])}")
        self.targets = {}
        for name, w0 in self.initial["width"].items():
            if len(coupled.get(name, ())) != 1:
                continue   # residual stream: left alone
            target = widths.get(name, round((1 - self.opts.sparsity) * w0))
            self.targets[name] = min(max(int(target), 1), w0)

    def width_at(self, name: str, step: int) -> int:
        w0, target = self.initial["width"][name], self.targets[name]
        t0, t1 = self.opts.start * self.total_steps, self.opts.end * self.total_steps
        frac = min(max((step - t0) / max(t1 - t0, 1), 0.0), 1.0)
        return target + math.ceil((w0 - target) * (1 - frac) ** 3)

    def scores(self, site) -> torch.Tensor:
        model = _unwrap(self.model)
        if self.opts.criterion == "bn_scale" and site.norm is not None:
            return model.get_submodule(site.norm).weight.detach().abs()
        return fan_in_rows(model, site).detach().abs().sum(1)   # a gated unit: its gate row

    def _after_step(self) -> None:
        if self.step % self.opts.prune_every == 0 or self.step == self.total_steps:
            self.prune(self.step)

    def prune(self, step: int) -> int:
        units = {}
        for site in self.sites:
            if site.name in self.targets:
                excess = site.num_units - self.width_at(site.name, step)
                units[site.name] = lowest_norm_units(self.scores(site), excess)
        return self.remove(units)

    def _end_epoch(self, result: EpochResult, val_score, evaluate) -> None:
        if self.last_epoch():
            self.final_removal(result, evaluate, self.prune(self.total_steps))
        result.update(self.report())
