"""Gradual structured pruning by filter norm: the baseline a user would pick instead of DemP.

Rule: every `prune_every` steps between `start` and `end` (fractions of the run), each site
with block-internal units loses the units whose incoming filter/row has the smallest L1 norm
(Li et al. 2017, "Pruning Filters for Efficient ConvNets"; `criterion="bn_scale"` ranks by
|norm scale| instead, Liu et al. 2017), so that its width follows the cubic schedule of Zhu &
Gupta (2017) from the original width to its target:
    width(t) = target + (width_0 - target) (1 - (t - start) / (end - start))^3.
Units are removed physically with Torch-Pruning (`dormant.surgery`), the optimizer state
sliced to match. Targets: `widths` (per site, e.g. the widths a DemP run ended with) or a
uniform `sparsity`. Residual-stream sites (coupled channels) are left alone.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..sites import _unwrap
from ..surgery import coupled_sites
from .structural import Structural

__all__ = ["StructuredPruning", "lowest_norm_units"]


def lowest_norm_units(scores: torch.Tensor, n: int) -> torch.Tensor:
    """BoolTensor[U]: the n units with the smallest scores (ties: lower index first)."""
    flags = torch.zeros(scores.numel(), dtype=torch.bool)
    if n > 0:
        flags[torch.sort(scores.detach().cpu(), stable=True).indices[:n]] = True
    return flags


class StructuredPruning(Structural):
    """Gradual L1-norm (or BN-scale) channel pruning to a target width, removed physically.

    sparsity: fraction of each site's units removed by `end` (ignored where `widths` gives
    a site's final width); start, end: fractions of the run's steps; criterion: l1 | bn_scale.
    """

    name = "structured"

    def __init__(self, sparsity: float = 0.5, widths: Mapping[str, int] | None = None,
                 start: float = 0.1, end: float = 0.7, criterion: str = "l1",
                 prune_every: int = 500, **kwargs):
        super().__init__(prune_every=prune_every, **kwargs)
        if not 0 <= sparsity < 1:
            raise ValueError(f"{self.name}: sparsity must be in [0, 1), got {sparsity}")
        if not 0 <= start < end <= 1:
            raise ValueError(f"{self.name}: need 0 <= start < end <= 1, got {start}, {end}")
        if criterion not in ("l1", "bn_scale"):
            raise ValueError(f"{self.name}: criterion must be l1 or bn_scale, got {criterion!r}")
        self.sparsity, self.widths = sparsity, dict(widths or {})
        self.start, self.end, self.criterion = start, end, criterion
        self.targets: dict[str, int] = {}

    def prepare(self, trainer) -> None:
        super().prepare(trainer)
        coupled = coupled_sites(trainer.model, self.sites, self._example)
        unknown = sorted(set(self.widths) - set(self.initial["width"]))
        if unknown:
            raise ValueError(f"{self.name}: no site(s) {unknown}; sites: {sorted(self.initial['width'])}")
        self.targets = {}
        for name, w0 in self.initial["width"].items():
            if len(coupled.get(name, ())) != 1:
                continue   # residual stream: left alone
            target = self.widths.get(name, round((1 - self.sparsity) * w0))
            self.targets[name] = min(max(int(target), 1), w0)

    def width_at(self, name: str, step: int) -> int:
        w0, target = self.initial["width"][name], self.targets[name]
        t0, t1 = self.start * self.total_steps, self.end * self.total_steps
        frac = min(max((step - t0) / max(t1 - t0, 1), 0.0), 1.0)
        return target + math.ceil((w0 - target) * (1 - frac) ** 3)

    def scores(self, trainer, site) -> torch.Tensor:
        model = _unwrap(trainer.model)
        if self.criterion == "bn_scale" and site.norm is not None:
            return model.get_submodule(site.norm).weight.detach().abs()
        return model.get_submodule(site.producer).weight.detach().flatten(1).abs().sum(1)

    def on_step_end(self, trainer, loss) -> None:
        if trainer.step % self.prune_every == 0 or trainer.step == self.total_steps:
            self.prune(trainer, trainer.step)

    def prune(self, trainer, step: int) -> int:
        units = {}
        for site in self.sites:
            if site.name in self.targets:
                excess = site.num_units - self.width_at(site.name, step)
                units[site.name] = lowest_norm_units(self.scores(trainer, site), excess)
        return self.remove(trainer, units)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        if epoch == trainer.epochs and self.prune(trainer, self.total_steps):
            self.remeasure(trainer, metrics)
        metrics.update(self.report(trainer))
