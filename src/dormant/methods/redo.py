"""ReDo: Recycling Dormant neurons (Sokar, Agarwal, Castro, Evci 2023, "The Dormant Neuron
Phenomenon in Deep Reinforcement Learning", ICML 2023, arXiv 2302.12902).

Rule implemented: every `every` epochs (or `every_steps` steps), score each unit by
s_u = E|a_u| / mean_k E|a_k| over the probe split (expectation over samples and positions,
mean over the units of the site); units with s_u <= tau are dormant. A dormant unit's
incoming weights (producer row or filter, bias) are re-drawn from the layer's own
initialiser (a freshly reset copy of the module), its outgoing weights (consumer columns /
input channels) are set to zero, and the optimizer state of every touched entry (momentum,
Adam moments) is reset to zero. tau = 0 recycles exactly the never-active units (ReLU).

Deviations from the paper (which used RL networks without normalisation):
* the official code (Dopamine's `weight_recyclers.py`) sets a recycled unit's bias to 0 and
  leaves the bias's Adam moments alone; here the bias is re-drawn from the layer's
  initialiser and its moments zeroed by default (a fresh unit, as its incoming weights);
  ``bias="zero"`` restores the official rule;
* the score is computed on a probe split (default: validation, carved from training data)
  in eval mode, not on a replay batch;
* the re-drawn weights come from a generator seeded by (seed, step, epoch), so every rank of
  a distributed run recycles a unit to the same weights;
* a norm layer between producer and activation gets its per-unit scale, offset and running
  statistics reset to their initial values (1, 0, 0, 1) too;
* units that feed a residual stream keep their path through the skip connection; only
  consumers that read the unit directly get their columns zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..optim import zero_state
from ..options import option
from ..sharding import plain_copy
from ..sites import _unwrap
from ..units import Slice, incoming, outgoing, tensor, unit_mask_for
from .base import METHODS, Method, PeriodicOptions

__all__ = ["ReDo", "recycle", "recycle_all"]


def _fresh(model: nn.Module, module_name: str) -> nn.Module:
    """A copy of the layer, re-initialised: its own ``reset_parameters``, or the model's
    ``_init_weights`` (how Hugging Face models initialise a layer such as GPT-2's Conv1D)."""
    m = plain_copy(model.get_submodule(module_name))
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()
    elif hasattr(model, "_init_weights"):
        model._init_weights(m)
    else:
        raise TypeError(f"{module_name} ({type(m).__name__}) has no reset_parameters() and the "
                        "model no _init_weights(module): ReDo cannot re-draw its weights")
    if hasattr(m, "reset_running_stats"):
        m.reset_running_stats()
    return m


@torch.no_grad()
def recycle(model: nn.Module, site, units: torch.Tensor,
            optimizer: torch.optim.Optimizer | None = None, bias: str = "redraw") -> int:
    """Re-initialise the incoming and zero the outgoing weights of `units` (bool[U]) of
    `site`, resetting their optimizer state. `bias="zero"` sets the producer's bias of the
    units to 0 and leaves its optimizer state alone, as the official code does. Returns the
    number of units recycled. Several sites: `recycle_all` (the official order)."""
    return recycle_all(model, [site], {site.name: units}, optimizer, bias)


@torch.no_grad()
def recycle_all(model: nn.Module, sites, units: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer | None = None, bias: str = "redraw") -> int:
    """`recycle` at every site in the official code's order: every site's incoming weights
    are re-drawn first, then every site's outgoing weights zeroed, so a weight joining two
    recycled units (the outgoing column of one, the incoming row of the next) ends at 0."""
    model = _unwrap(model)
    todo = [(s, units[s.name]) for s in sites if s.name in units and units[s.name].any()]
    for site, flags in todo:
        fresh: dict[str, nn.Module] = {}
        for sl in incoming(model, site):
            if bias == "zero" and sl.kind == "bias":
                _write(model, sl, flags, site.num_units, None, None)
                continue
            owner, _, attr = sl.name.rpartition(".")
            if owner not in fresh:
                fresh[owner] = _fresh(model, owner)
            _write(model, sl, flags, site.num_units, getattr(fresh[owner], attr), optimizer)
    for site, flags in todo:
        for sl in outgoing(model, site):
            _write(model, sl, flags, site.num_units, None, optimizer)
    return sum(int(f.sum()) for _, f in todo)


def _write(model, sl: Slice, units, num_units, source, optimizer) -> None:
    t = tensor(model, sl.name)
    where = unit_mask_for(model, sl, units, num_units)
    if source is None:
        t.masked_fill_(where, 0)
    else:
        t.copy_(torch.where(where, source.to(t.device, t.dtype), t))
    if optimizer is not None and isinstance(t, nn.Parameter):
        zero_state(optimizer, t, where)


@METHODS.register
class ReDo(Method):
    """Recycle dormant units: re-initialise incoming, zero outgoing, reset optimizer state.

    Metrics (prefix ``redo/``): dormant units found at this step, units recycled at this step
    and in total.
    """

    name = "redo"
    rewrites_outgoing = True
    acts_on_sharded = True
    acts_on_fused_experts = True

    @dataclass
    class Options(PeriodicOptions):
        tau: float = option(0.1, "a unit is dormant when its score E|a| / layer mean <= tau "
                            "(0: never active)", at_least=0)
        bias: str = option("redraw", "a recycled unit's bias: redraw (the layer's initialiser, "
                           "moments zeroed) or zero (the official code: 0, moments left alone)",
                           choices=("redraw", "zero"))

    def __init__(self, **options):
        super().__init__(**options)
        self.recycled_total = 0

    def update(self, act: bool = True) -> None:
        dormant = self.observe().dead_units("dormant", tau=self.opts.tau)
        recycled = 0
        if act:
            todo = [s for s in self.sites if dormant[s.name].any()]
            with self.editing(self.touched_by(todo)), self.seeded():
                recycled = recycle_all(self.model, self.sites, dormant, self.optimizer,
                                       bias=self.opts.bias)
        self.recycled_total += recycled
        self.metrics = {"redo/dormant_units": sum(int(d.sum()) for d in dormant.values()),
                        "redo/recycled": recycled, "redo/recycled_total": self.recycled_total}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "recycled_total": self.recycled_total}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.recycled_total = int(state.get("recycled_total", 0))
