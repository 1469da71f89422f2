"""One-call diagnosis: an exact probe pass in eval mode, reported per site."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .batching import (Forward, default_forward, eval_mode, iter_batches, model_input, take,
                       to_device)
from .dataflow import no_fastpath
from .monitor import ActivityMonitor
from .sites import Site, _unwrap, find_sites

__all__ = ["diagnose", "Diagnosis", "probe"]


def probe(model: nn.Module, data, *, sites: Sequence[Site] | None = None, eps: float = 0.0,
          batch_size: int = 512, max_batches: int | None = None, max_samples: int | None = None,
          device: torch.device | str | None = None,
          forward: Forward | None = None, monitor_type: type = ActivityMonitor
          ) -> ActivityMonitor:
    """Run probe `data` through `model` in eval mode under no_grad with an exact monitor; the
    model's train/eval flags are restored afterwards. Returns the (detached) monitor.

    `data`: a tensor, an ``(inputs, targets)`` tuple, a mapping of tensors, or an iterable of
    batches (`dormant.batching`); `forward(model, batch)` makes the call (default: ``model(x)``,
    ``model(**batch)`` for a mapping, ``model(batch[0])`` for a tuple). `monitor_type`: an
    `ActivityMonitor` subclass that records more (`dormant.metrics` keeps the features).
    """
    model = _unwrap(model)
    forward = forward or default_forward
    device = torch.device(device) if device is not None else _model_device(model)
    batches = iter_batches(data, batch_size, limit=max_samples)
    first = next(batches, None)
    if first is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or sites is None:
            raise ValueError("probe data is empty" + (" on this rank: pass sites= so that it "
                                                      "can still take part" if distributed else ""))
        return monitor_type(model, sites, eps=eps, every=1, mode="any")   # counts zero:
        # the all-reduce of the other ranks' counts gives this rank the global decision
    first = to_device(first, device)
    if sites is None:
        sites = find_sites(model, take(model_input(first), 2))
    mon = monitor_type(model, sites, eps=eps, every=1, mode="any")
    # the fused encoder path would skip the hooks: off for the probe
    with eval_mode(model), mon, torch.no_grad(), no_fastpath():
        forward(model, first)
        for i, batch in enumerate(batches, start=1):
            if max_batches is not None and i >= max_batches:
                break
            forward(model, to_device(batch, device))
    return mon


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class SiteRow:
    site: str
    activation: str
    units: int
    dead: int
    sparsity: float  # fraction of exact-zero outputs

    @property
    def dead_pct(self) -> float:
        return 100.0 * self.dead / max(self.units, 1)


@dataclass
class Diagnosis:
    """Per-site report of a probe pass; ``print(report)`` shows a table."""
    rows: list[SiteRow]
    criterion: str
    eps: float
    samples: int
    dead: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    params: dict = field(default_factory=dict)     # the criterion's parameters (tau)

    @property
    def units(self) -> int:
        return sum(r.units for r in self.rows)

    @property
    def dead_units(self) -> int:
        return sum(r.dead for r in self.rows)

    @property
    def dead_fraction(self) -> float:
        return self.dead_units / max(self.units, 1)

    def definition(self) -> str:
        """The criterion in words, with its parameters."""
        n = f"{self.samples} probe samples, eval mode"
        if self.criterion == "never_active":
            return (f"output <= {self.eps:g} on every one of {n} (exactly 0 for activations "
                    "that can be negative)")
        if self.criterion == "always_zero":
            return f"output exactly 0 on every one of {n}"
        if self.criterion == "dormant":
            tau = self.params.get("tau", 0.0)
            return f"E|a| / layer mean of E|a| <= {tau:g} over {n} (ReDo's score)"
        return f"{self.criterion}({self.params or ''}) over {n}"

    def metrics(self) -> dict[str, float]:
        """Flat metric keys: dead_fraction, dead_units, dead/<site> (fraction of the site's
        units), sparsity/<site> (fraction of zero outputs)."""
        out: dict[str, float] = {"dead_fraction": self.dead_fraction,
                                 "dead_units": self.dead_units}
        for r in self.rows:
            out[f"dead/{r.site}"] = r.dead / r.units
            out[f"sparsity/{r.site}"] = r.sparsity
        return out

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "eps": self.eps, "samples": self.samples,
                "units": self.units, "dead": self.dead_units, "dead_fraction": self.dead_fraction,
                "sites": [{"site": r.site, "activation": r.activation, "units": r.units,
                           "dead": r.dead, "sparsity": r.sparsity} for r in self.rows]}

    def __str__(self) -> str:
        head = ("site", "act", "units", "dead", "dead %", "sparsity %")
        body = [(r.site, r.activation, str(r.units), str(r.dead), f"{r.dead_pct:.1f}",
                 f"{100 * r.sparsity:.1f}") for r in self.rows]
        body.append(("total", "", str(self.units), str(self.dead_units),
                     f"{100 * self.dead_fraction:.1f}", ""))
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(head))
        title = f"dead = {self.criterion}: {self.definition()}"
        return "\n".join([title, fmt(head), rule] + [fmt(r) for r in body[:-1]] + [rule, fmt(body[-1])])


def diagnose(model: nn.Module, data, *, criterion: str = "never_active", eps: float = 0.0,
             sites: Sequence[Site] | None = None, batch_size: int = 512,
             max_batches: int | None = None, max_samples: int | None = None, device=None,
             forward: Forward | None = None, **criterion_params) -> Diagnosis:
    """Which units of `model` are dead on `data`: an exact probe pass in eval mode.

    `data` and `forward` as for `probe`: a tensor of inputs, an ``(inputs, targets)`` tuple,
    a mapping of tensors, or an iterable of batches (a DataLoader).
    """
    mon = probe(model, data, sites=sites, eps=eps, batch_size=batch_size,
                max_batches=max_batches, max_samples=max_samples, device=device,
                forward=forward)
    dead = mon.dead_units(criterion, **criterion_params)
    sparsity = mon.activation_sparsity()
    stats = mon.stats()
    rows = [SiteRow(n, s.activation, s.num_units, int(dead[n].sum()), sparsity[n])
            for n, s in mon.sites.items()]
    samples = next(iter(stats.values())).samples
    return Diagnosis(rows, criterion, eps, samples, dead, dict(criterion_params))
