"""What the methods that remove units physically share: reference sizes, removal followed by
a refresh of the sites (and of every callback), and the size metrics.

Metrics per epoch: ``units`` (alive at the sites), ``units_removed`` (fraction of the
original units), ``params``/``params_ratio``, ``macs_ratio`` (dense MACs of the current,
smaller model over the original's) and ``width`` (units per site).
"""
from __future__ import annotations

import torch

from ..flops import macs, positions
from ..sites import _unwrap, find_sites
from ..surgery import count_units, remove_units
from ..train.loop import evaluate
from .base import Method

__all__ = ["Structural"]


class Structural(Method):
    """Base of DemP and the structured baseline (see the module docstring)."""

    hidden_options = ("every", "every_steps")     # they keep their own step schedule

    def __init__(self, prune_every: int = 500, **kwargs):
        bad = sorted(set(kwargs) & set(self.hidden_options))
        if bad:
            raise ValueError(f"{self.name}: {bad} do not apply; use prune_every")
        super().__init__(**kwargs)
        if prune_every < 1:
            raise ValueError(f"{self.name}: prune_every must be >= 1, got {prune_every}")
        self.prune_every = int(prune_every)
        self.total_steps = 0
        self.initial: dict = {}
        self.removed_total = 0

    def prepare(self, trainer) -> None:
        super().prepare(trainer)
        model = _unwrap(trainer.model)
        per_epoch = -(-len(trainer.data.train) // trainer.batch_size)
        self.total_steps = trainer.epochs * per_epoch
        self._example = trainer.data.train.inputs[:2]
        self._pos = positions(model, self._example)
        if not self.initial:     # a resumed run keeps the original reference sizes
            self.initial = {"units": count_units(self.sites),
                            "params": sum(p.numel() for p in model.parameters()),
                            "macs": macs(model, self._pos, "dense"),
                            "width": {s.name: s.num_units for s in self.sites}}

    def remove(self, trainer, units: dict[str, torch.Tensor]) -> int:
        """Remove `units` physically, refresh the sites, tell the other callbacks."""
        if not any(u.any() for u in units.values()):
            return 0
        removed = remove_units(trainer.model, self.sites, units, self._example, trainer.optimizer)
        n = sum(int(r.sum()) for r in removed.values())
        if n:
            self.removed_total += n
            self.sites = [s for s in find_sites(trainer.model, self._example)
                          if s.producer is not None]
            trainer.model_changed()
        return n

    def remeasure(self, trainer, metrics: dict) -> None:
        """Validation and test accuracy of the model as it is now (after a removal)."""
        metrics["val_loss"], metrics["val_acc"] = evaluate(trainer.model, trainer.data.val)
        metrics["test_loss"], metrics["test_acc"] = evaluate(trainer.model, trainer.data.test)

    def report(self, trainer) -> dict:
        model = _unwrap(trainer.model)
        units = count_units(self.sites)
        params = sum(p.numel() for p in model.parameters())
        return {"units": units, "units_removed": 1 - units / self.initial["units"],
                "params": params, "params_ratio": params / self.initial["params"],
                "macs_ratio": macs(model, self._pos, "dense") / self.initial["macs"],
                "width": {s.name: s.num_units for s in self.sites}}

    def state_dict(self) -> dict:
        return {"initial": self.initial, "removed_total": self.removed_total}

    def load_state_dict(self, state: dict) -> None:
        self.initial = dict(state.get("initial", {}))
        self.removed_total = int(state.get("removed_total", 0))
