"""Synaptic Stripping (Whitaker & Whitley 2023, "Synaptic Stripping: How Pruning Can Bring
Dead Neurons Back To Life", arXiv 2302.05818).

Rule implemented (the official code, `tjwhitaker/synaptic-stripping` src/train.py, utils.py):
after every `every`-th epoch, with the model in eval mode, run the whole probe split through
it; a unit is dead when its output is exactly 0 (<= eps) for every sample and every
token/position (never-active criterion, summed over the whole split, not per batch). For each
dead unit, take the non-zero entries of its incoming row (the producer's weight row or
flattened filter, as currently masked), compute their `factor`-quantile t (linear
interpolation) and prune the entries with w < t (strict). The bias is never touched, rows
already empty are skipped, live units are never touched. Masks compose: pruned stays pruned,
nothing regrows, even after the unit revives.

Deviations from the official code:
* detection uses a probe split carved from the training set ("val", or "train"), never the
  test set the official script used;
* the unit -> incoming-row pairing comes from site discovery (any producer -> [norm] ->
  activation), not from "the module before the ReLU in a Sequential";
* the official script also left a second set of hooks attached during training; we do not;
* the quantile is taken in float64 (exact); the official code takes it in float32, which can
  differ by one weight when (n - 1) * factor is an integer (the interpolation lands on a
  weight exactly).
* with a norm layer between producer and activation the pre-activation is renormalised, so
  stripping need not raise it; the rule is applied as specified anyway.
* a gated unit (``act(gate) * up -> down``, not in the paper): the gate decides life, so only
  the gate's row is stripped (the gate half of a fused gate/up layer); the up row is left
  alone. Dead means the unit's output ``act(g) * up`` is 0 on every probe token.

Where it cannot work: removing a negative weight raises the pre-activation only where that
input is >= 0 (the output of a ReLU). A unit fed by signed inputs -- the first layer on
standardised data, an MLP's fc1 after a LayerNorm -- can lose a negative weight on an input
that is mostly negative and end up lower. On Fashion-MNIST (60% of standardised pixels < 0)
the units a fast stripping cadence leaves dead in an MLP sit mostly in the first layer
(docs/results/synaptic_stripping.md).

Where the rule runs out: once a dead unit has no negative incoming weight left, the
`factor`-quantile falls on its smallest positive weights and the rule strips those, which
lowers the pre-activation on non-negative inputs; with a single weight left it strips
nothing (the quantile of one value is that value, and `<` is strict). The bias is never
touched, so a unit held below zero by a negative bias stays dead however long it is stripped.
`ss/beyond_reach` counts these units (dead, no negative incoming weight left); in narrow
MLPs they are most of the dead units that remain (docs/results/synaptic_stripping.md).

Option, a deviation from the paper (off by default): ``bias_fallback=True`` treats the bias as
the connection from a constant input 1 and strips it where the rule has run out: a dead unit
with no negative incoming weight left and a negative bias gets its bias pruned (masked to 0,
permanently) instead of losing its smallest positive weights that step. Only for sites whose
producer feeds the activation directly (with a norm layer in between, the producer's bias is
renormalised away and the norm's offset would be the analogue: not covered). Metric
``ss/bias_stripped``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from ..sites import _unwrap
from ..units import fan_in_rows, rows_to_weight, site_rows, tensor, weight_name
from .base import METHODS, Method, PeriodicOptions, weight_sparsity

__all__ = ["SynapticStripping", "beyond_reach", "strip_decision"]


def strip_decision(rows: torch.Tensor, dead: torch.Tensor, factor: float) -> torch.Tensor:
    """Keep-mask for incoming `rows` (units, fan_in): for each dead unit, False where the
    weight is below the `factor`-quantile of the row's non-zero weights (strict <)."""
    keep = torch.ones_like(rows, dtype=torch.bool)
    for u in dead.nonzero().flatten().tolist():
        w = rows[u]
        nz = w[w != 0]
        if nz.numel() == 0:  # every incoming weight already pruned
            continue
        t = torch.quantile(nz.double(), factor, interpolation="linear")
        keep[u] = ~(w.double() < t)
    return keep


def beyond_reach(rows: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Dead units with no negative incoming weight left: stripping can only remove their
    positive weights (or nothing, with one weight left), which does not revive a unit fed by
    non-negative inputs."""
    return dead & ~(rows < 0).any(dim=1)


@METHODS.register
class SynapticStripping(Method):
    """Prune the most negative incoming weights of dead ReLU units; they come back to life.

    Metrics (per epoch, prefix ``ss/``): dead units (before this step's stripping), revived
    units (dead at the previous detection, alive now), weights stripped this step and in
    total, active parameters (unpruned incoming weights of live units, §1.4 of the spec),
    dead units beyond the rule's reach (no negative incoming weight left, see
    `beyond_reach`), plus ``weight_sparsity`` over all Linear/Conv weights.
    """

    name = "synaptic-stripping"
    acts_on_fused_experts = True
    acts_on_sharded = True

    @dataclass
    class Options(PeriodicOptions):
        factor: float = option(0.05, "quantile of a dead unit's non-zero incoming weights "
                               "below which they are stripped", within=(0, 1))
        bias_fallback: bool = option(False, "strip the negative bias of a dead unit with no "
                                     "negative incoming weight left (a deviation, off by default)")

    def __init__(self, **options):
        super().__init__(**options)
        self.previous: dict[str, torch.Tensor] = {}
        self.stripped_total = 0

    def update(self, act: bool = True) -> None:
        dead = self.observe().dead_units("never_active")
        hit = [s for s in self.sites if dead[s.name].any()]      # the sites it reads and cuts
        with self.editing(self.touched_by(hit), state=False):
            self._strip(dead, act)

    def _strip(self, dead: dict[str, torch.Tensor], act: bool) -> None:
        model = self.model
        revived = sum(int((self.previous[n] & ~d).sum()) for n, d in dead.items()
                      if n in self.previous)
        stripped = reach = biases = 0
        masks = self.ensure_masks() if act else None
        for site in self.sites:
            if not dead[site.name].any():
                continue
            rows = fan_in_rows(model, site).detach()
            out = beyond_reach(rows, dead[site.name])
            reach += int(out.sum())   # before this step
            if act:
                keep = strip_decision(rows, dead[site.name], self.opts.factor)
                bias = self._fallback_bias(model, site)
                if bias is not None:
                    out &= bias.detach() < 0
                    if out.any():   # no mask (and no per-step masking) for biases never cut
                        keep[out] = True      # their bias goes instead of positive weights
                        masks.update(f"{site.producer}.bias", ~out)
                        biases += int(out.sum())
                name = weight_name(site)
                before = masks.masks.get(name)
                masks.update(name, rows_to_weight(model, site, keep))
                after = masks.masks[name]
                stripped += int(((before if before is not None else True) & ~after).sum())
        if act:
            masks.apply()
        self.stripped_total += stripped
        self.previous = {n: d.clone() for n, d in dead.items()}
        self.metrics = {
            "ss/dead_units": sum(int(d.sum()) for d in dead.values()),
            "ss/revived": revived, "ss/stripped": stripped,
            "ss/stripped_total": self.stripped_total, "ss/beyond_reach": reach,
            **({"ss/bias_stripped": biases} if self.opts.bias_fallback else {}),
            "ss/active_params": self.active_params(model, dead),
            "weight_sparsity": weight_sparsity(model),
        }

    def _fallback_bias(self, model, site) -> torch.Tensor | None:
        """The producer's bias where `bias_fallback` applies to this site, else None."""
        if not self.opts.bias_fallback or site.norm is not None or site.fused:
            return None
        bias = getattr(_unwrap(model).get_submodule(site.producer), "bias", None)
        return bias if isinstance(bias, torch.nn.Parameter) else None

    def active_params(self, model, dead: dict[str, torch.Tensor]) -> int:
        """Entries of (stripping mask x live-row mask) summed over the sites' producers (§1.4):
        incoming weights that are neither stripped nor attached to a dead unit."""
        total = 0
        for site in self.sites:
            name = weight_name(site)
            live = ~dead[site.name]
            if self.masks is not None and name in self.masks.masks:
                total += int(site_rows(model, site, self.masks.masks[name])[live].sum())
            else:      # the shape alone (under FSDP2 the weight is this rank's rows)
                shape = tensor(model, name).shape
                rows = site_rows(model, site, torch.empty(shape, device="meta"))
                total += int(live.sum()) * rows.shape[1]
        return total

    def state_dict(self) -> dict:
        return {**super().state_dict(), "previous": self.previous,
                "stripped_total": self.stripped_total}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.previous = dict(state.get("previous", {}))
        self.stripped_total = int(state.get("stripped_total", 0))
