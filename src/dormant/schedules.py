"""Schedules: learning-rate schedules stepped once per epoch, and the one-cycle curve.

Learning-rate schedules are registered factors ``f(epoch) -> multiplier of lr`` wrapped in
``torch.optim.lr_scheduler.LambdaLR`` (the trainer steps it after every epoch, so epoch ``e``
trains with ``lr * f(e)``, ``e = 0, 1, ...``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .registry import Registry

__all__ = ["SCHEDULES", "make_scheduler", "one_cycle"]

SCHEDULES = Registry("schedule")


@SCHEDULES.register("constant")
def constant(epochs: int) -> Callable[[int], float]:
    """The same learning rate every epoch."""
    return lambda e: 1.0


@SCHEDULES.register("cosine")
def cosine(epochs: int, warmup: int = 0, final: float = 0.0,
           warmup_start: float = 1e-5) -> Callable[[int], float]:
    """Linear warm-up for `warmup` epochs from `warmup_start`, then cosine annealing to
    `final` (fractions of lr). warmup=5, final=0.01 is the Synaptic Stripping recipe."""
    if warmup < 0 or warmup >= epochs or not 0 <= final <= 1:
        raise ValueError(f"cosine: need 0 <= warmup < epochs and 0 <= final <= 1, "
                         f"got warmup={warmup}, epochs={epochs}, final={final}")

    def f(e: int) -> float:
        if e < warmup:
            return warmup_start + (1 - warmup_start) * e / warmup
        span = max(epochs - warmup - 1, 1)
        t = min((e - warmup) / span, 1.0)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    return f


@SCHEDULES.register("step")
def step(epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1) -> Callable[[int], float]:
    """Multiply lr by `gamma` at each epoch in `milestones` (e.g. [30] as in NNrelief)."""
    ms = sorted(int(m) for m in milestones)
    if not 0 < gamma <= 1:
        raise ValueError(f"step: gamma must be in (0, 1], got {gamma}")
    return lambda e: gamma ** sum(e >= m for m in ms)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int,
                   period: int | None = None, **args) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch LambdaLR. With `period`, the schedule spans `period` epochs and restarts
    every `period` epochs (pruning rounds); it stays a pure function of the epoch, so a
    resumed run gets the same learning rates."""
    if period is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.get(name)(epochs, **args))
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    f = SCHEDULES.get(name)(period, **args)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: f(e % period))


def one_cycle(t: float, total: float, peak: float, *, pct_start: float = 0.3,
              div: float = 25.0, final_div: float = 1e4) -> float:
    """The one-cycle curve (Smith & Topin 2019; torch's OneCycleLR, cosine annealing) as a
    function of progress `t` in [0, total]: peak/div -> peak at pct_start*total ->
    peak/(div*final_div) at total; 0 outside [0, total]. DemP uses it for the regulariser
    strength and the noise scale."""
    if total <= 0 or t < 0 or t > total:
        return 0.0
    start, end = peak / div, peak / (div * final_div)
    up = pct_start * total

    def cos(a: float, b: float, x: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * x))
    if t <= up:
        return cos(start, peak, t / up if up > 0 else 1.0)
    return cos(peak, end, (t - up) / max(total - up, 1e-12))
