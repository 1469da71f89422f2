"""Two baselines of the loss-of-plasticity literature, through the Method API.

Shrink & Perturb (Ash & Adams, "On warm-starting neural network training", NeurIPS 2020):
every `every` epochs (or `every_steps` steps) each parameter becomes
``shrink * theta + perturb * theta_fresh``, theta_fresh drawn from the model's own
initialisation (a freshly reset copy of every layer that has ``reset_parameters``; a parameter
of no such layer is only shrunk). The draw uses the method's own generator, seeded by the
run's seed (identical on every rank).

L2 Init (Kumar, Marklund & Van Roy, "Maintaining plasticity in continual learning via
regenerative regularization", 2023): the loss gains ``lam * ||theta - theta_0||^2`` over every
parameter, theta_0 the weights at `prepare`; its gradient ``2 lam (theta - theta_0)`` is added
after the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..options import option
from ..sharding import local, plain_copy, resharded, rows, sharded_like, sum_rows
from ..sites import _unwrap
from .base import METHODS, Method, MethodOptions, PeriodicOptions

__all__ = ["ShrinkPerturb", "L2Init", "fresh_parameters"]


def fresh_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of a freshly initialised copy of `model` (every layer with
    ``reset_parameters`` reset; the others keep their current values)."""
    clone = plain_copy(_unwrap(model))       # under FSDP2: the whole parameters
    for m in clone.modules():
        if hasattr(m, "reset_parameters") and m is not clone:
            m.reset_parameters()
    return {n: p.detach() for n, p in clone.named_parameters()}


@METHODS.register
class ShrinkPerturb(Method):
    """theta <- shrink theta + perturb theta_fresh, on a cadence (Ash & Adams 2020).

    Metrics: ``sp/applied`` (times so far).
    """

    name = "shrink-perturb"
    uses_sites = False
    acts_on_sharded = True     # elementwise: each rank's rows of theta and theta_fresh

    @dataclass
    class Options(PeriodicOptions):
        shrink: float = option(0.4, "factor on the current weights", within=(0, 1), bounds="[]")
        perturb: float = option(0.1, "factor on freshly initialised weights", at_least=0)

    def __init__(self, **options):
        super().__init__(**options)
        self.applied = 0

    @torch.no_grad()
    def update(self, act: bool = True) -> None:
        if act:
            with self.seeded():
                fresh = fresh_parameters(self.model)
            for n, p in resharded(_unwrap(self.model)).named_parameters():
                if p.requires_grad:         # frozen parameters are left alone
                    local(p).mul_(self.opts.shrink).add_(rows(p, fresh[n]).to(p.device),
                                                         alpha=self.opts.perturb)
            self.applied += 1
        self.metrics = {"sp/applied": self.applied}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.applied = int(state.get("applied", 0))


@METHODS.register
class L2Init(Method):
    """Regularise towards the initial weights: grad += 2 lam (theta - theta_0) (Kumar et al.).

    Metrics: ``l2init/distance`` (||theta - theta_0|| at the epoch's end).
    """

    name = "l2-init"
    uses_sites = False
    acts_on_sharded = True     # elementwise: each rank's rows of theta, theta_0 and the grad

    @dataclass
    class Options(MethodOptions):
        lam: float = option(1e-3, "strength of the penalty lam ||theta - theta_0||^2", at_least=0)

    def __init__(self, **options):
        super().__init__(**options)
        self.initial: dict[str, torch.Tensor] | None = None

    def _prepare(self) -> None:
        model = _unwrap(self.model)
        if self.initial is None:      # a resumed run keeps the weights it started from
            self.initial = {n: p.detach().clone()      # under FSDP2: this rank's shards
                            for n, p in resharded(model).named_parameters()}
        else:                         # a saved state holds whole tensors
            self.initial = sharded_like(model, self.initial)

    @torch.no_grad()
    def _after_backward(self) -> None:
        for n, p in _unwrap(self.model).named_parameters():
            if p.grad is not None:
                p.grad.add_(p - self.initial[n].to(p.device), alpha=2 * self.opts.lam)

    def _after_step(self) -> None:
        pass

    def _end_epoch(self, result, val_score, evaluate) -> None:
        params = resharded(_unwrap(self.model)).named_parameters()
        total = sum_rows((p, (local(p.detach()) - local(self.initial[n]).to(p.device))
                          .double().pow(2).sum()) for n, p in params)
        result["l2init/distance"] = float(total) ** 0.5

    def state_dict(self) -> dict:
        return {**super().state_dict(), "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.initial = state.get("initial")
