"""What "dead" means: `SiteStats` (a site's counters with the definition they were measured
under) and the criteria, functions ``SiteStats -> BoolTensor[num_units]`` (True = dead),
behind a registry (`dormant list criteria`). `ActivityMonitor.dead_units` applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import Registry
from .sites import Site

__all__ = ["CRITERIA", "SiteStats", "always_zero", "dormant", "never_active",
           "register_criterion"]


@dataclass
class SiteStats:
    """Counters of one site, with the definition they were measured under."""
    site: Site
    active: torch.Tensor
    zeros: torch.Tensor
    silent: torch.Tensor
    active_batches: torch.Tensor
    sum: torch.Tensor
    abs_sum: torch.Tensor
    max: torch.Tensor | None          # None unless the monitor tracks it (track_max=True)
    positions: int
    samples: int
    batches: int
    eps: float
    mode: str
    every_steps: int

    @property
    def active_rate(self) -> torch.Tensor:
        """Per unit: fraction of outputs > eps."""
        return self.active.double() / max(self.positions, 1)

    @property
    def zero_rate(self) -> torch.Tensor:
        """Per unit: fraction of outputs exactly 0."""
        return self.zeros.double() / max(self.positions, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.positions, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.positions, 1)

    @property
    def definition(self) -> dict:
        return {"eps": self.eps, "mode": self.mode, "every_steps": self.every_steps,
                "samples": self.samples, "batches": self.batches}


# ----------------------------------------------------------------------------------------
# Criteria: functions SiteStats -> BoolTensor[num_units] (True = dead).
CRITERIA: Registry = Registry("criterion", "criteria")
register_criterion = CRITERIA.register


@CRITERIA.register("never_active")
def never_active(s: SiteStats) -> torch.Tensor:
    """Dead: output <= eps for every sample and position seen (Synaptic Stripping, DemP,
    NNrelief; for ReLU with eps=0 this is 'exactly zero everywhere'). For activations that
    can be negative the monitor applies `always_zero` instead (see `dead_units`)."""
    return s.active == 0


@CRITERIA.register("dormant")
def dormant(s: SiteStats, tau: float = 0.0) -> torch.Tensor:
    """ReDo (Sokar et al. 2023): score_u = E|a_u| / (mean_k E|a_k| + 1e-9) <= tau
    (layer-normalised; the 1e-9 as in the official code)."""
    if not tau >= 0:
        raise ValueError(f"tau must be a number >= 0, got {tau}")
    m = s.mean_abs
    score = m / (m.mean() + 1e-9)
    return score <= tau


@CRITERIA.register("always_zero")
def always_zero(s: SiteStats) -> torch.Tensor:
    """Dead: output exactly 0 for every sample and position seen (ignores eps)."""
    return s.zeros == s.positions
