"""Plasticity metrics on a feature matrix ``A`` of shape ``(N, units)`` (one row per probe
sample, e.g. a site's activations) and on a model's parameters.

Three "ranks" share names in the loss-of-plasticity literature; each has its own function:

* `effective_rank` (Roy & Vetterli 2007): ``exp(-sum_k p_k log p_k)``, ``p_k = s_k / sum s``;
* `stable_rank`, the true stable rank ``||A||_F^2 / ||A||_2^2 = sum s^2 / max s^2``;
* `approximate_rank`: the smallest ``k`` whose ``k`` largest singular values hold a share
  `prop` of their sum. With ``squared=False`` it is what Dohare et al. (Nature 2024) call the
  "stable rank" (``post_run_analysis.py``, 99% of ``sum s``); with ``squared=True`` it is their
  code's "approximate rank" (``lop/utils/miscellaneous.py``, 99% of ``sum s^2``).

Singular values come from one SVD of ``A`` in float64 (``N x units`` is small for a probe batch).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .batching import Forward
from .diagnose import probe
from .monitor import ActivityMonitor
from .sharding import is_sharded, local, resharded, sum_rows
from .sites import Site

__all__ = ["singular_values", "effective_rank", "stable_rank", "approximate_rank",
           "weight_magnitude", "feature_norm", "distance_from", "fraction_active",
           "site_features", "plasticity", "plasticity_from", "FeatureRecorder", "initial_state"]


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """Singular values of a ``(N, units)`` matrix (more dims are flattened into rows), float64,
    descending."""
    a = features.detach().double()
    if a.ndim != 2:
        a = a.reshape(-1, a.shape[-1])
    return torch.linalg.svdvals(a)


def effective_rank(features: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values
    (zero singular values contribute nothing; 0 for a zero matrix)."""
    s = singular_values(features)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(features: torch.Tensor) -> float:
    """The true stable rank ``||A||_F^2 / ||A||_2^2`` (0 for a zero matrix)."""
    s = singular_values(features)
    return float((s ** 2).sum() / s[0] ** 2) if s.numel() and s[0] > 0 else 0.0


def approximate_rank(features: torch.Tensor, prop: float = 0.99, squared: bool = False) -> int:
    """The smallest k whose k largest singular values (their squares with `squared`) hold at
    least `prop` of the total. ``squared=False``: Dohare et al.'s "stable rank";
    ``squared=True``: their code's "approximate rank"."""
    if not 0 < prop <= 1:
        raise ValueError(f"prop must be in (0, 1], got {prop}")
    s = singular_values(features)
    v = s ** 2 if squared else s
    total = v.sum()
    if total <= 0:
        return 0
    share = v.cumsum(0) / total
    # a tolerance for the float sum: prop=1 must be reachable at the last singular value
    return int((share < prop - 1e-12).sum()) + 1


def fraction_active(features: torch.Tensor, eps: float = 0.0) -> float:
    """Fraction of units (columns) with an output > eps on at least one row."""
    a = features.detach().reshape(-1, features.shape[-1])
    return float((a > eps).any(0).double().mean())


def feature_norm(features: torch.Tensor) -> float:
    """Mean L2 norm of the rows (one per sample)."""
    a = features.detach().double().reshape(-1, features.shape[-1])
    return float(a.norm(dim=1).mean())


def weight_magnitude(model: nn.Module) -> float:
    """Mean |w| over every parameter (under FSDP2: over every rank's rows)."""
    ps = [p.detach() for p in resharded(model).parameters()]
    n = sum(p.numel() for p in ps)
    return float(sum_rows((p, local(p).double().abs().sum()) for p in ps) / max(n, 1))


def initial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters now, on the host, for `distance_from` (a sharded one: this rank's
    rows)."""
    return {n: local(p.detach()).to("cpu", copy=True)
            for n, p in resharded(model).named_parameters()}


def distance_from(model: nn.Module, initial: Mapping[str, torch.Tensor]) -> float:
    """``||theta - theta_0||_2`` over the parameters named in `initial` (a state dict saved at
    initialisation, `initial_state`) that still have their shape (a physical removal changes
    the others)."""
    diffs = []
    for name, p in resharded(model).named_parameters():
        mine = local(p.detach())
        start = initial.get(name)
        if start is not None and start.shape == mine.shape:
            diffs.append((p, (mine.double() - start.to(mine.device, torch.float64))
                          .pow(2).sum()))
        elif is_sharded(p):     # every rank takes part in the shard group's sum
            diffs.append((p, torch.zeros((), dtype=torch.float64, device=mine.device)))
    return float(sum_rows(diffs).sqrt())


class FeatureRecorder:
    """A tap listener (`dormant.taps`) that keeps each site's per-sample features: the
    activation output averaged over positions/tokens, ``(N, units)``, for the first
    `max_samples` samples of a pass (all without it), and hands the same outputs on to
    `also` (e.g. an `ActivityMonitor.observe` that counts exactly those samples).

    The pass (`dormant.diagnose.probe`) calls `batch(n)` before each forward of an
    ``n``-sample batch and splits the batch that straddles `max_samples`: a batch's outputs
    are taken whole (a routed expert's too) while fewer than `max_samples` samples were
    taken."""

    def __init__(self, sites: Sequence[Site] | None = None, max_samples: int | None = None,
                 also: Sequence[Callable[[Site, torch.Tensor], None]] = ()):
        self.only = None if sites is None else {s.name for s in sites}
        self.features: dict[str, list[torch.Tensor]] = {}
        self.max_samples, self.also = max_samples, list(also)
        self.seen = 0
        self._taking = True

    def batch(self, n: int) -> None:
        self._taking = self.max_samples is None or self.seen < self.max_samples
        self.seen += n

    @torch.no_grad()
    def __call__(self, site: Site, y: torch.Tensor) -> None:
        if not self._taking or (self.only is not None and site.name not in self.only):
            return
        y = y.detach()
        for listener in self.also:
            listener(site, y)
        if y.ndim == 1:
            y = y.unsqueeze(0)
        d = site.unit_dim % y.ndim
        inner = tuple(i for i in range(1, y.ndim) if i != d)
        self.features.setdefault(site.name, []).append(
            (y.mean(inner) if inner else y).float().cpu())

    def result(self) -> dict[str, torch.Tensor]:
        """``{site: (N, units)}`` of the sites that saw any output."""
        return {n: torch.cat(f) for n, f in self.features.items() if f}


def site_features(model: nn.Module, data: Any, *, sites: Sequence[Site] | None = None,
                  max_samples: int | None = 1024, forward: Forward | None = None
                  ) -> tuple[dict[str, torch.Tensor], ActivityMonitor]:
    """Per site, the ``(N, units)`` features of the probe `data` (eval mode, no grad; at most
    `max_samples` samples), and the exact monitor of the same pass."""
    rec = FeatureRecorder()
    mon = probe(model, data, sites=sites, max_samples=max_samples, forward=forward,
                listeners=[rec])
    return rec.result(), mon


def plasticity_from(model: nn.Module, features: Mapping[str, torch.Tensor],
                    mon: ActivityMonitor, taus: Sequence[float] = (0.025, 0.1)
                    ) -> dict[str, float]:
    """The plasticity metrics (`plasticity`) from a pass's features and the exact monitor of
    the same samples."""
    out: dict[str, float] = {}
    dormant = {tau: mon.dead_fraction("dormant", per_site=True, tau=tau) for tau in taus}
    dead = mon.dead_fraction(per_site=True)
    for name, a in features.items():
        out[f"erank/{name}"] = effective_rank(a)
        out[f"stable_rank/{name}"] = stable_rank(a)
        out[f"approx_rank/{name}"] = approximate_rank(a)
        out[f"approx_rank_sq/{name}"] = approximate_rank(a, squared=True)
        out[f"fau/{name}"] = 1.0 - dead[name]
        out[f"feature_norm/{name}"] = feature_norm(a)
        for tau in taus:
            out[f"dormant_{tau:g}/{name}"] = dormant[tau][name]
    out["weight_magnitude"] = weight_magnitude(model)
    return out


def plasticity(model: nn.Module, data: Any, *, sites: Sequence[Site] | None = None,
               max_samples: int | None = 1024, forward: Forward | None = None,
               taus: Sequence[float] = (0.025, 0.1)) -> dict[str, float]:
    """The plasticity metrics of every site on a probe batch, as flat keys: ``erank/<site>``,
    ``stable_rank/<site>`` (true), ``approx_rank/<site>`` (99% of sum s: Dohare et al.'s
    "stable rank"), ``approx_rank_sq/<site>`` (99% of sum s^2), ``fau/<site>``,
    ``feature_norm/<site>``, ``dormant_<tau>/<site>`` (ReDo's score <= tau), and the model's
    ``weight_magnitude``."""
    feats, mon = site_features(model, data, sites=sites, max_samples=max_samples,
                               forward=forward)
    return plasticity_from(model, feats, mon, taus)
