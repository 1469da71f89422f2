"""One-call diagnosis: an exact probe pass in eval mode, reported per site."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from .monitor import ActivityMonitor
from .sites import Site, _unwrap, find_sites

__all__ = ["diagnose", "Diagnosis", "iter_inputs", "probe"]


def iter_inputs(data, batch_size: int = 512) -> Iterator[torch.Tensor]:
    """Model inputs from a tensor, an ``(inputs, targets)`` pair of tensors, or an iterable
    of batches (tensors or tuples whose first element is the input)."""
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
    elif isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor) \
            and len(data) == 2 and data[0].shape[:1] == data[1].shape[:1] and data[0].ndim > 1:
        yield from iter_inputs(data[0], batch_size)
    elif hasattr(data, "inputs") and isinstance(getattr(data, "inputs"), torch.Tensor):
        yield from iter_inputs(data.inputs, batch_size)
    else:
        for batch in data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


def probe(model: nn.Module, data, *, sites: Sequence[Site] | None = None, eps: float = 0.0,
          batch_size: int = 512, max_batches: int | None = None,
          device: torch.device | str | None = None) -> ActivityMonitor:
    """Run `data` through `model` in eval mode under no_grad with an exact monitor; the
    model's train/eval flags are restored afterwards. Returns the (detached) monitor."""
    model = _unwrap(model)
    device = torch.device(device) if device is not None else _model_device(model)
    batches = iter_inputs(data, batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError("probe data is empty")
    first = first.to(device)
    if sites is None:
        sites = find_sites(model, first[:2])
    flags = {m: m.training for m in model.modules()}
    mon = ActivityMonitor(model, sites, eps=eps, every=1, mode="any")
    model.eval()
    try:
        with mon, torch.no_grad():
            model(first)
            for i, x in enumerate(batches, start=1):
                if max_batches is not None and i >= max_batches:
                    break
                model(x.to(device))
    finally:
        for m, flag in flags.items():
            m.training = flag
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

    @property
    def units(self) -> int:
        return sum(r.units for r in self.rows)

    @property
    def dead_units(self) -> int:
        return sum(r.dead for r in self.rows)

    @property
    def dead_fraction(self) -> float:
        return self.dead_units / max(self.units, 1)

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
        title = (f"dead = {self.criterion} (output <= {self.eps:g} on all {self.samples} "
                 "probe samples, eval mode)")
        return "\n".join([title, fmt(head), rule] + [fmt(r) for r in body[:-1]] + [rule, fmt(body[-1])])


def diagnose(model: nn.Module, data, *, criterion: str = "never_active", eps: float = 0.0,
             sites: Sequence[Site] | None = None, batch_size: int = 512,
             max_batches: int | None = None, device=None, **criterion_params) -> Diagnosis:
    """Which units of `model` are dead on `data`: an exact probe pass in eval mode.

    `data` is a tensor of inputs, an ``(inputs, targets)`` pair, or an iterable of batches.
    """
    mon = probe(model, data, sites=sites, eps=eps, batch_size=batch_size,
                max_batches=max_batches, device=device)
    dead = mon.dead_units(criterion, **criterion_params)
    sparsity = mon.activation_sparsity()
    stats = mon.stats()
    rows = [SiteRow(n, s.activation, s.num_units, int(dead[n].sum()), sparsity[n])
            for n, s in mon.sites.items()]
    samples = next(iter(stats.values())).samples
    return Diagnosis(rows, criterion, eps, samples, dead)
