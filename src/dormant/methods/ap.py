"""AP: Activate-while-Pruning (Liu, Ghosh, Tan & Motani, "AP: Selective Activation for
De-sparsifying Pruned Neural Networks", TMLR 2023, arXiv 2212.06145).

Rule implemented (the official `resnet_20.py`, on top of IMP with rewinding to init): at each
pruning round, with A the weights still alive in the pruned layers,
  n_total = floor(|A| * rate), n_AP = floor(|A| * p_ap)     (both counted before pruning)
  1. the base pruner removes n_total - n_AP weights (global magnitude by default);
  2. AP removes n_AP of the surviving *negative* weights in kernels that feed a ReLU, those
     that moved least during the round: smallest |W_end - W_start|, where W_start are the
     weights when the round's training began (after the previous rewind);
then survivors rewind. AP thus takes a share of each round's budget, not more: the total
removed per round equals the base rate. Negative weights that barely moved keep units
silent; removing them lowers the dynamic dead-neuron rate.

Deviations from the official code:
* exactly n_AP weights are removed (the code prunes every d <= the n_AP-th smallest value,
  i.e. n_AP + 1 weights plus ties); if fewer than n_AP candidates exist, the base pruner
  removes the rest, so the round total stays exact;
* the standard IMP loop is used (train, prune, rewind, train), not the released script's
  order in which every sparsity level is trained twice;
* `neuron_fraction` (off by default; the released code has no neuron selection, the paper's
  Algorithm 1 may have one) restricts AP to the rows of the units with the highest dynamic
  dead-neuron rate measured on the round's training batches;
* scope and counts: by default the pruned tensors are the Linear/Conv kernels and the counts
  exact (above), AP only on kernels feeding a ReLU. The released code prunes every parameter
  whose name contains "weight" (BatchNorm scales included), counts exact zeros as pruned,
  removes |w| < percentile(|A|, 18) (ties kept) and applies AP to every surviving negative
  weight: ``scope="official"`` does exactly that (`official_round`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..monitor import ActivityMonitor
from ..options import option
from ..pruning import PRUNERS, alive, count_to_prune, select_lowest
from ..sharding import full
from ..sites import _unwrap
from .base import METHODS, EpochResult, check_option
from .iterative import IMP

__all__ = ["AP", "ap_decision", "official_round"]


def ap_decision(w_end: Mapping[str, torch.Tensor], w_start: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor], eligible: Mapping[str, torch.Tensor],
                n: int) -> tuple[dict[str, torch.Tensor], int]:
    """Prune up to `n` kept, negative weights inside `eligible` (bool masks, per tensor name)
    with the smallest |w_end - w_start|. Returns (new keep-masks, number pruned)."""
    cand = {k: masks[k] & (w_end[k] < 0) & eligible[k] for k in eligible}
    m = min(n, alive(cand))
    kept = select_lowest({k: (w_end[k] - w_start[k]).abs() for k in cand}, cand, m)
    new = {k: v.clone() for k, v in masks.items()}
    for k in cand:
        new[k] &= ~(cand[k] & ~kept[k])
    return new, m


def official_round(w_end: Mapping[str, torch.Tensor], w_start: Mapping[str, torch.Tensor],
                   masks: Mapping[str, torch.Tensor], rate: float, p_ap: float
                   ) -> tuple[dict[str, torch.Tensor], int]:
    """One round of the official `resnet_20.py`: with A the alive, non-zero weights of every
    tensor given (exact zeros count as pruned), n_AP = floor(|A| p_ap); the base step prunes
    |w| < percentile(|A|, 100 (rate - p_ap)) (linear interpolation, ties kept); AP then prunes
    the surviving negative weights with |w_end - w_start| <= t, t the n_AP-th smallest of
    them (0-indexed: n_AP + 1 weights, plus ties). Returns (new keep-masks, pruned by AP)."""
    keys = list(masks)
    live = {k: masks[k] & (w_end[k] != 0) for k in keys}
    a = torch.cat([w_end[k][live[k]].abs().double().flatten() for k in keys]).cpu().numpy()
    if a.size == 0:
        return live, 0
    # the released code computes in integer percent (p = 20, p_AP = 2): round away float
    # noise so that 100 (0.2 - 0.02) is its 18, not 18.000000000000004
    n_ap = math.floor(round(a.size * p_ap, 9))
    thr = float(np.percentile(a, round(100 * (rate - p_ap), 9)))
    new = {k: live[k] & ~(w_end[k].abs().double() < thr) for k in keys}
    cand = {k: new[k] & (w_end[k] < 0) for k in keys}
    d = torch.cat([(w_end[k] - w_start[k]).abs()[cand[k]].flatten() for k in keys])
    if d.numel() == 0:       # n_AP = 0 still prunes the least moved one (+ ties), as released
        return new, 0
    t = d.sort().values[min(n_ap, d.numel() - 1)]
    pruned = 0
    for k in keys:
        cut = cand[k] & ((w_end[k] - w_start[k]).abs() <= t)
        new[k] = new[k] & ~cut
        pruned += int(cut.sum())
    return new, pruned


@METHODS.register
class AP(IMP):
    """IMP + AP: a share p_ap of each round's pruning budget goes to negative weights that
    barely moved and feed a ReLU (Liu et al. 2023).

    rate: total fraction of the remaining weights removed per round (0.2);
    p_ap: AP's share of it (0.02 means 2 of the 20 points; the base pruner takes 18);
    neuron_fraction: if set, AP only touches the rows of this fraction of units per site
        with the highest dynamic DNR over the round (off by default, like the official code).
    """

    name = "ap"

    @dataclass
    class Options(IMP.Options):
        activations: tuple[str, ...] | None = option(("relu",), "site activation kinds AP "
                                                     "acts on (weights feeding a ReLU)")
        p_ap: float = option(0.02, "AP's share of each round's budget, in (0, rate)",
                             within=(0, 1))
        neuron_fraction: float | None = option(None, "restrict AP to the rows of this fraction "
                                               "of units per site with the highest dynamic "
                                               "DNR (off: the official code)", within=(0, 1),
                                               bounds="(]")
        scope: str = option("kernels", "kernels: Linear/Conv kernels, AP on those feeding a "
                            "ReLU, exact counts floor(rate n) - floor(p_ap n) and floor(p_ap n); "
                            "official: every parameter named *weight* (norm scales too), the "
                            "code's percentile threshold and AP's <= t rule (ResNet-20 recipe)",
                            choices=("kernels", "official"))

        def check(self, owner: str) -> None:
            super().check(owner)
            check_option(self.p_ap < self.rate, owner,
                         f"p_ap: expected a float in (0, rate={self.rate:g}), got {self.p_ap!r}")
            if self.scope == "official":
                check_option(self.pruner == "global-magnitude" and self.layers == "all"
                             and self.neuron_fraction is None, owner,
                             "scope: 'official' is the released code's rule: it needs "
                             "pruner='global-magnitude', layers='all' and no neuron_fraction")

    def __init__(self, **options):
        super().__init__(**options)
        self.monitor: ActivityMonitor | None = None
        self._monitor_state: dict | None = None
        self.last_ap = 0

    def _prepare(self) -> None:
        super()._prepare()
        if self.opts.neuron_fraction is not None:
            self.monitor = ActivityMonitor(self.model, self.sites, every_steps=10, mode="train")
            if self._monitor_state is not None:
                self.monitor.load_state_dict(self._monitor_state)
            self.monitor.open()
            self.monitor.set_step(self.step)

    def _after_step(self) -> None:
        if self.monitor is not None:
            self.monitor.step()

    def eligible(self) -> dict[str, torch.Tensor]:
        """Per producer of a ReLU site: which weights AP may remove (whole weight, or the rows
        of the units with the highest dynamic DNR)."""
        params = dict(_unwrap(self.model).named_parameters())
        out = {}
        stats = self.monitor.stats() if self.monitor is not None else None
        for site in self.sites:
            name = f"{site.producer}.weight"
            if name not in self.names:
                continue
            w = params[name]
            rows = torch.ones(site.num_units, dtype=torch.bool, device=w.device)
            if stats is not None and stats[site.name].positions > 0:
                zr = stats[site.name].zero_rate
                k = max(1, round(self.opts.neuron_fraction * site.num_units))
                rows = torch.zeros_like(rows)
                rows[torch.topk(zr, k).indices] = True
            out[name] = rows.view(-1, *[1] * (w.ndim - 1)).expand_as(w)
        return out

    def pruned_names(self, model) -> list[str]:
        if self.opts.scope == "official":     # every tensor whose name contains "weight"
            return [n for n, _ in model.named_parameters() if "weight" in n]
        return super().pruned_names(model)

    def decide(self, rnd: int) -> dict[str, torch.Tensor]:
        with self.editing(self.names, state=False):   # FSDP2: the weights read whole
            return self._decide(rnd)

    def _decide(self, rnd: int) -> dict[str, torch.Tensor]:
        if self.opts.scope == "official":
            weights = self.weights()
            start = self._round_start(weights)
            new, self.last_ap = official_round(weights, start, self.pruning_masks(),
                                               self.opts.rate, self.opts.p_ap)
            return new
        masks = self.pruning_masks()
        n_alive = alive(masks)
        n_total = count_to_prune(n_alive, self.opts.rate)
        n_ap = count_to_prune(n_alive, self.opts.p_ap)
        pruner, weights = PRUNERS.get(self.opts.pruner), self.weights()
        gen = self.generator(rnd)
        base = pruner(weights, masks, n_total - n_ap, generator=gen)
        start = self._round_start(weights)
        new, m = ap_decision(weights, start, base, self.eligible(), n_ap)
        if m < n_ap:
            new = pruner(weights, new, n_ap - m, generator=gen)
        self.last_ap = m
        if self.monitor is not None:
            self.monitor.reset()
        return new

    def _round_start(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's starting weights, whole (under FSDP2 they are kept as shards)."""
        return {k: full(self.round_start[k]).to(weights[k].device) for k in weights}

    def _end_epoch(self, result: EpochResult, val_score, evaluate) -> None:
        super()._end_epoch(result, val_score, evaluate)
        if "pruned" in result:
            result["ap/pruned"] = self.last_ap

    def finalize(self):
        model = super().finalize()
        if self.monitor is not None:
            self.monitor.close()
        return model

    def state_dict(self) -> dict:
        mon = self.monitor.state_dict() if self.monitor is not None else None
        return {**super().state_dict(), "monitor": mon}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._monitor_state = state.get("monitor")
