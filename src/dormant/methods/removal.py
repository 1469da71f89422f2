"""What the methods that remove units physically share: reference sizes, removal followed by
a refresh of the sites (the caller learns of it from what `after_step`/`end_epoch` return), and
the size metrics.

Metrics per epoch: ``units`` (alive at the sites), ``units_removed`` (fraction of the
original units), ``params``/``params_ratio``, ``macs_ratio`` (dense MACs of the current,
smaller model over the original's) and ``width`` (units per site).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flops import macs, positions
from ..options import option
from ..sites import _unwrap, find_sites
from ..surgery import count_units, remove_units
from ..units import fan_in_rows
from .base import EpochResult, Method, MethodOptions

__all__ = ["RemovalMethod", "RemovalOptions"]


@dataclass
class RemovalOptions(MethodOptions):
    """Options of methods that remove units physically (their own step cadence)."""
    prune_every: int = option(500, "optimizer steps between removals", at_least=1)
    round_to: int = option(1, "keep every site's width a multiple of this (hardware-friendly "
                           "shapes; 1: off); the extra units kept are those with the largest "
                           "incoming L1 norm", at_least=1)


class RemovalMethod(Method):
    """Base of DemP and the structured baseline (see the module docstring). `prepare` needs
    ``total_steps``; a removal makes `after_step`/`end_epoch` report a changed model."""

    Options = RemovalOptions
    needs = ("total_steps",)
    changes_model = True

    def __init__(self, **options):
        super().__init__(**options)
        self.initial: dict = {}
        self.removed_total = 0

    def _prepare(self) -> None:
        model = _unwrap(self.model)
        self._pos = positions(model, self.example)
        if not self.initial:     # a resumed run keeps the original reference sizes
            self.initial = {"units": count_units(self.sites),
                            "params": sum(p.numel() for p in model.parameters()),
                            "macs": macs(model, self._pos, "dense"),
                            "width": {s.name: s.num_units for s in self.sites}}

    def rounded(self, units: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``round_to`` > 1: each site keeps a multiple of round_to units (or all of
        them); the flagged units kept back are those with the largest incoming L1 norm."""
        r = self.opts.round_to
        if r <= 1:
            return units
        out = dict(units)
        for site in self.sites:
            flags = units.get(site.name)
            if flags is None or not flags.any():
                continue
            keep = site.num_units - int(flags.sum())
            extra = min(site.num_units, -(-keep // r) * r) - keep
            if extra > 0:
                norms = fan_in_rows(self.model, site).detach().abs().sum(1).cpu()
                idx = flags.nonzero().flatten()
                flags = flags.clone()
                flags[idx[torch.topk(norms[idx], extra).indices]] = False
                out[site.name] = flags
        return out

    def remove(self, units: dict[str, torch.Tensor]) -> int:
        """Remove `units` physically (rounded to ``round_to``) and refresh the sites; the
        caller learns of it from the value `after_step`/`end_epoch` return."""
        units = self.rounded(units)
        if not any(u.any() for u in units.values()):
            return 0
        removed = remove_units(self.model, self.sites, units, self.example, self.optimizer)
        n = sum(int(r.sum()) for r in removed.values())
        if n:
            self.removed_total += n
            self.sites = [s for s in find_sites(self.model, self.example)
                          if s.producer is not None]
            self._changed = True
            self.model_changed()
        return n

    def model_changed(self) -> None:
        """Called after a removal (override to drop what held the old parameters)."""

    def final_removal(self, result: EpochResult, evaluate, removed: int) -> None:
        """After the last epoch's removal: measure the compacted model again."""
        if removed and evaluate is not None:
            result.update(evaluate(self.model))

    def report(self) -> dict:
        model = _unwrap(self.model)
        units = count_units(self.sites)
        params = sum(p.numel() for p in model.parameters())
        return {"units": units, "units_removed": 1 - units / self.initial["units"],
                "params": params, "params_ratio": params / self.initial["params"],
                "macs_ratio": macs(model, self._pos, "dense") / self.initial["macs"],
                "width": {s.name: s.num_units for s in self.sites}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "initial": self.initial,
                "removed_total": self.removed_total}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.initial = dict(state.get("initial", {}))
        self.removed_total = int(state.get("removed_total", 0))
