"""Continual Backprop (Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood & Sutton, "Loss of
plasticity in deep continual learning", Nature 632, 2024).

Rule implemented (the official `lop/algos/gnt.py`, class GnT, `gen_and_test` called after
every optimizer step with the step's hidden activations):
* every step, for each site: ages += 1; with eta the decay rate and bc = 1 - eta^age,
  util = eta util + (1 - eta) new_util with the
  contribution utility new_util = mean_k |w_out,k| x mean_n |h| (the mean over the unit's
  outgoing weights, not the sum); the bias-corrected utility is util / bc;
* eligible units: age > maturity_threshold (strictly); n = replacement_rate x #eligible; with
  ``accumulate`` the fractional part carries over to the next step, otherwise n < 1 becomes
  1 with probability n (drawn from the method's own generator, seeded by the run's seed);
* the n eligible units with the lowest bias-corrected utility are replaced: util set to 0, incoming weights re-drawn uniform(-b, b) with b = gain x sqrt(3 / fan_in) (the
  code's "kaiming" bounds; ``init="layer"`` uses the layer's own initialiser), bias 0,
  outgoing weights 0, age 0, and the optimizer state of every touched entry reset.
  The code also keeps a running mean activation per unit to add next.weight[:, r] x
  mean_act[r] / bc[r] to the next layer's bias, but it sets mean_act[r] to 0 just before, so
  the correction adds nothing: neither the mean nor the correction is kept here.

Deviations from the official code:
* units are dormant's sites (any producer -> [norm] -> activation -> consumers), not the
  layers of a ``Sequential`` MLP; a norm layer between producer and activation is reset like
  ReDo resets it; a conv unit's |h| and mean are averaged over samples and positions;
* the optimizer state of replaced entries is zeroed (moments and momentum) for any torch
  optimizer; AdamGnT's per-element step counts do not exist in torch's Adam;
* a gated unit (``act(gate) * up -> down``): utility from |act(g) * up| and the down
  column; a replaced unit gets ReDo's rewrite (gate and up rows re-drawn with the layers' own
  initialisers, down column zeroed), not the kaiming bounds;
* only the ``contribution`` utility (the paper's); the code's other ``util_type`` variants
  (weight, adaptation, zero/adaptable contribution, random) are not offered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..options import option
from ..sharding import full
from ..sites import Site, _unwrap
from ..taps import SiteTaps
from ..units import fan_in_rows, outgoing, tensor
from .base import METHODS, EpochResult, Method, MethodOptions
from .redo import recycle

__all__ = ["ContinualBackprop", "outgoing_magnitude"]

def outgoing_magnitude(model: nn.Module, site: Site) -> torch.Tensor:
    """Per unit, the mean |w| over its outgoing weights (every consumer's entries), float64 on
    the weights' device (it runs every step: no copy to the host; under FSDP2 each consumer
    weight is gathered, as its forward does)."""
    total = count = 0.0
    for sl in outgoing(model, site):
        w = full(tensor(model, sl.name).detach()).abs().double()
        if sl.conv_groups > 1:    # filter o reads input column j of its group g: unit g C/g + j
            g = sl.conv_groups
            per = w.flatten(2).sum(2).view(g, -1, w.shape[1]).sum(1).flatten()
            n = torch.full_like(per, w[0, 0].numel() * (w.shape[0] // g))
        else:
            cols = w.movedim(sl.dim, 0).flatten(1).sum(1)              # per input column
            rest = w.numel() // w.shape[sl.dim]
            if sl.group > 1:
                cols = (cols.view(site.num_units, sl.group) if sl.layout == "block"
                        else cols.view(sl.group, site.num_units).t()).sum(1)
                rest *= sl.group
            per, n = cols, torch.full_like(cols, rest)
        total, count = total + per, count + n
    if isinstance(total, float):      # no consumer
        return torch.zeros(site.num_units, dtype=torch.float64)
    return total / count.clamp_min(1)


class _BatchMeans:
    """A tap listener (`dormant.taps`): the last training batch's mean |h| per unit."""

    def __init__(self):
        self.batch: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, site: Site, y: torch.Tensor) -> None:
        y = y.detach()
        if y.ndim == 1:
            y = y.unsqueeze(0)
        d = site.unit_dim % y.ndim
        dims = tuple(i for i in range(y.ndim) if i != d)
        self.batch[site.name] = y.abs().mean(dims)


@METHODS.register
class ContinualBackprop(Method):
    """Replace a small share of mature, low-utility units every step (Dohare et al. 2024).

    Metrics (prefix ``cbp/``): units replaced this epoch and in total, mean utility.
    """

    name = "continual-backprop"
    rewrites_outgoing = True
    acts_on_sharded = True

    @dataclass
    class Options(MethodOptions):
        replacement_rate: float = option(1e-4, "share of the eligible units replaced per step",
                                         within=(0, 1), bounds="[]")
        decay: float = option(0.99, "decay of the running utility and mean activation",
                              within=(0, 1))
        maturity_threshold: int = option(100, "a unit is eligible once its age (steps since "
                                         "its last replacement) exceeds this", at_least=0)
        accumulate: bool = option(False, "carry fractional replacements over (the code's "
                                  "default draws n < 1 as 1 with probability n)")
        init: str = option("kaiming", "re-drawn incoming weights: kaiming (the code: "
                           "uniform(+-gain sqrt(3 / fan_in))) or layer (its own initialiser)",
                           choices=("kaiming", "layer"))

    def __init__(self, **options):
        super().__init__(**options)
        self.util: dict[str, torch.Tensor] = {}
        self.ages: dict[str, torch.Tensor] = {}
        self.carry: dict[str, float] = {}
        self.replaced_epoch = self.replaced_total = 0
        self.stats: _BatchMeans | None = None
        self._taps: SiteTaps | None = None
        self._gen: torch.Generator | None = None
        self._saved: dict | None = None

    def _prepare(self) -> None:
        device = next(_unwrap(self.model).parameters()).device    # utilities live there
        for s in self.sites:
            if s.name not in self.util:
                z = torch.zeros(s.num_units, dtype=torch.float64)
                self.util[s.name], self.ages[s.name], self.carry[s.name] = z, z.clone(), 0.0
            self.util[s.name] = self.util[s.name].to(device)
            self.ages[s.name] = self.ages[s.name].to(device)
        self._gen = torch.Generator().manual_seed(1_000_003 * self.seed + 29)
        if self._saved is not None:
            self._gen.set_state(self._saved)
            self._saved = None
        self.stats = _BatchMeans()
        self._taps = SiteTaps(self.model, self.sites, self.stats, mode="train")
        self._taps.attach()

    # -- the step ------------------------------------------------------------------------
    def _step_means(self) -> dict[str, torch.Tensor]:
        """This step's mean_n |h| per site; under torch.distributed the mean over every rank's
        share of the global batch (all-reduced), so every rank takes the same decision."""
        got = {n: self.stats.batch.pop(n) for n in list(self.stats.batch)}
        dist = torch.distributed
        if got and dist.is_available() and dist.is_initialized():
            names = sorted(got)
            flat = torch.cat([got[n].double().flatten() for n in names])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            got = dict(zip(names, flat.split([got[n].numel() for n in names])))
        return got

    @torch.no_grad()
    def _after_step(self) -> None:
        eta = self.opts.decay
        means = self._step_means()
        for i, site in enumerate(self.sites):
            got = means.get(site.name)                        # mean_n |h| of this step
            if got is None:
                continue
            name = site.name
            self.ages[name] += 1
            bc = 1 - eta ** self.ages[name]
            contribution = outgoing_magnitude(self.model, site) * got.double()
            self.util[name].mul_(eta).add_((1 - eta) * contribution)
            self._replace(site, self.util[name] / bc, salt=i)

    def _how_many(self, name: str, eligible: int) -> int:
        n = self.opts.replacement_rate * eligible
        if self.opts.accumulate:
            self.carry[name] += n
            k = int(self.carry[name])
            self.carry[name] -= k
            return k
        if n < 1 and float(torch.rand(1, generator=self._gen)) <= n:
            return 1
        return int(n)

    def _replace(self, site: Site, corrected: torch.Tensor, salt: int) -> None:
        name = site.name
        eligible = (self.ages[name] > self.opts.maturity_threshold).nonzero().flatten()
        if eligible.numel() == 0:
            return
        k = self._how_many(name, eligible.numel())
        if k == 0:
            return
        chosen = eligible[torch.topk(-corrected[eligible], k).indices]
        units = torch.zeros(site.num_units, dtype=torch.bool, device=chosen.device)
        units[chosen] = True
        self.util[name][units] = 0
        self.ages[name][units] = 0
        with self.editing(self.touched_by([site])), self.seeded(salt=salt):
            recycle(self.model, site, units, self.optimizer)   # moments of every entry reset
            if not site.gated:      # a gated unit keeps ReDo's rewrite (the spec's rule)
                self._code_init(site, units)
        self.replaced_epoch += k
        self.replaced_total += k

    def _code_init(self, site: Site, units: torch.Tensor) -> None:
        """The code's incoming weights (kaiming bounds, or the layer's own) and bias 0."""
        if self.opts.init == "kaiming":
            self._kaiming(site, units)
        bias = getattr(_unwrap(self.model).get_submodule(site.producer), "bias", None)
        if bias is not None:
            bias[units.to(bias.device)] = 0.0

    def _kaiming(self, site: Site, units: torch.Tensor) -> None:
        """The code's bounds: uniform(+-gain sqrt(3 / fan_in)), gain of the activation."""
        rows = fan_in_rows(self.model, site)
        try:
            gain = nn.init.calculate_gain(site.activation)
        except ValueError:
            gain = nn.init.calculate_gain("relu")
        bound = gain * math.sqrt(3 / rows.shape[1])
        fresh = torch.empty(int(units.sum()), rows.shape[1]).uniform_(-bound, bound)
        rows[units.to(rows.device)] = fresh.to(rows.device, rows.dtype)

    # -- epochs, state -------------------------------------------------------------------
    def _end_epoch(self, result: EpochResult, val_score, evaluate) -> None:
        utils = torch.cat(list(self.util.values())) if self.util else torch.zeros(1)
        result.update({"cbp/replaced": self.replaced_epoch,
                       "cbp/replaced_total": self.replaced_total,
                       "cbp/mean_utility": float(utils.mean())})
        self.replaced_epoch = 0

    def finalize(self):
        if self._taps is not None:
            self._taps.close()
        return super().finalize()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "util": self.util, "ages": self.ages, "carry": self.carry, "replaced_total": self.replaced_total,
                "replaced_epoch": self.replaced_epoch,
                "rng": self._gen.get_state() if self._gen is not None else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.util = dict(state.get("util", {}))
        self.ages, self.carry = dict(state.get("ages", {})), dict(state.get("carry", {}))
        self.replaced_total = int(state.get("replaced_total", 0))
        self.replaced_epoch = int(state.get("replaced_epoch", 0))
        self._saved = state.get("rng")
