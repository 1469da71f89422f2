"""One-call diagnosis: an exact probe pass in eval mode, reported per site."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .batching import (
    Forward,
    default_forward,
    drop,
    eval_mode,
    iter_batches,
    model_input,
    num_samples,
    take,
    to_device,
)
from .dataflow import no_fastpath
from .monitor import ActivityMonitor
from .sites import Site, _unwrap, find_sites
from .taps import Listener

__all__ = ["diagnose", "diagnosis", "Diagnosis", "ExpertRow", "expert_rows", "probe"]


def probe(model: nn.Module, data, *, sites: Sequence[Site] | None = None, eps: float = 0.0,
          batch_size: int = 512, max_batches: int | None = None, max_samples: int | None = None,
          device: torch.device | str | None = None, forward: Forward | None = None,
          listeners: Sequence[Listener] = ()) -> ActivityMonitor:
    """Run probe `data` through `model` in eval mode under no_grad with an exact monitor; the
    model's train/eval flags are restored afterwards. Returns the (detached) monitor.

    `data`: a tensor, an ``(inputs, targets)`` tuple, a mapping of tensors, or an iterable of
    batches (`dormant.batching`); `forward(model, batch)` makes the call (default: ``model(x)``,
    ``model(**batch)`` for a mapping, ``model(batch[0])`` for a tuple). `listeners`: more tap
    listeners (`dormant.taps`) that see the same outputs in the same pass (the plasticity
    features, `dormant.metrics.FeatureRecorder`); one with a ``batch(n)`` method is told each
    batch's number of samples before its forward, and one with a ``max_samples`` budget
    gets the batch that straddles it as two forwards, split there (the counts are the same),
    so that it can take exactly the first ``max_samples`` samples.
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
        return ActivityMonitor(model, sites, eps=eps, mode="any")   # counts zero:
        # the all-reduce of the other ranks' counts gives this rank the global decision
    first = to_device(first, device)
    if sites is None:
        sites = find_sites(model, take(model_input(first), 2))
    mon = ActivityMonitor(model, sites, eps=eps, mode="any")
    for listener in listeners:
        mon.taps.listen(listener)
    told = [listener.batch for listener in listeners if hasattr(listener, "batch")]
    cut_at = min((b for b in (getattr(lis, "max_samples", None) for lis in listeners)
                  if b is not None), default=None)
    seen = 0
    # the fused encoder path would skip the hooks: off for the probe
    with eval_mode(model), mon, torch.no_grad(), no_fastpath():
        for i, batch in enumerate(itertools.chain([first], batches)):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(batch, device)
            n = num_samples(batch)
            parts = [batch]
            if cut_at is not None and seen < cut_at < seen + n:
                parts = [take(batch, cut_at - seen), drop(batch, cut_at - seen)]
            seen += n
            for part in parts:
                for tell in told:
                    tell(num_samples(part))
                forward(model, part)
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
class ExpertRow:
    """One expert of a mixture of experts: the tokens routed to it in the probe pass and its
    share of the mixture's routed tokens. An expert no token reached is `unrouted` (its units
    are unobserved, never dead); one routed at most `expert_share` of the tokens is a dead
    expert (router level)."""
    expert: str
    mixture: str
    tokens: int
    share: float
    dead: bool

    @property
    def unrouted(self) -> bool:
        return self.tokens == 0


def expert_rows(mon: ActivityMonitor, expert_share: float = 0.0) -> list[ExpertRow]:
    """Per expert of every mixture among the monitor's sites: routed tokens, share, verdict."""
    tokens: dict[str, int] = {}
    for st in mon.stats().values():
        if st.site.expert is not None:
            tokens[st.site.expert] = max(tokens.get(st.site.expert, 0), st.positions)
    totals: dict[str, int] = {}
    for e, t in tokens.items():
        totals[_mixture(e)] = totals.get(_mixture(e), 0) + t
    shares = {e: t / max(totals[_mixture(e)], 1) for e, t in tokens.items()}
    return [ExpertRow(e, _mixture(e), t, shares[e], shares[e] <= expert_share)
            for e, t in tokens.items()]


def _mixture(expert: str) -> str:
    return expert.rpartition(".")[0]


@dataclass
class Diagnosis:
    """Per-site report of a probe pass; ``print(report)`` shows a table."""
    rows: list[SiteRow]
    criterion: str
    eps: float
    samples: int
    dead: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    params: dict = field(default_factory=dict)     # the criterion's parameters (tau)
    experts: list[ExpertRow] = field(default_factory=list)   # mixtures of experts only
    expert_share: float = 0.0

    @property
    def unrouted_experts(self) -> list[str]:
        return [e.expert for e in self.experts if e.unrouted]

    @property
    def dead_experts(self) -> list[str]:
        return [e.expert for e in self.experts if e.dead]

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
        if self.experts:
            out["experts/unrouted"] = len(self.unrouted_experts)
            out["experts/dead"] = len(self.dead_experts)
        return out

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "eps": self.eps, "samples": self.samples,
                "units": self.units, "dead": self.dead_units, "dead_fraction": self.dead_fraction,
                "sites": [{"site": r.site, "activation": r.activation, "units": r.units,
                           "dead": r.dead, "sparsity": r.sparsity} for r in self.rows],
                "experts": [{"expert": e.expert, "tokens": e.tokens, "share": e.share,
                             "unrouted": e.unrouted, "dead": e.dead} for e in self.experts],
                "expert_share": self.expert_share}

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
        lines = [title, fmt(head), rule] + [fmt(r) for r in body[:-1]] + [rule, fmt(body[-1])]
        return "\n".join(lines + self._expert_lines())

    def _expert_lines(self) -> list[str]:
        """Per mixture: experts, routed tokens, unrouted and dead experts (router level)."""
        out = []
        for mixture in dict.fromkeys(e.mixture for e in self.experts):
            rows = [e for e in self.experts if e.mixture == mixture]
            toks = sorted(e.tokens for e in rows)
            un = [e.expert.rpartition(".")[2] for e in rows if e.unrouted]
            dead = [f"{e.expert.rpartition('.')[2]} ({e.tokens} tokens)" for e in rows
                    if e.dead and not e.unrouted]
            out.append(f"{mixture}: {len(rows)} experts, {sum(toks)} routed tokens (min "
                       f"{toks[0]}, max {toks[-1]}); unrouted (units unobserved, not counted "
                       f"dead): {', '.join(un) or 'none'}"
                       + (f"; dead (share <= {self.expert_share:g}): {', '.join(dead)}"
                          if dead else ""))
        return out


def diagnose(model: nn.Module, data, *, criterion: str = "never_active", eps: float = 0.0,
             sites: Sequence[Site] | None = None, batch_size: int = 512,
             max_batches: int | None = None, max_samples: int | None = None, device=None,
             forward: Forward | None = None, expert_share: float = 0.0,
             **criterion_params) -> Diagnosis:
    """Which units of `model` are dead on `data`: an exact probe pass in eval mode.

    `data` and `forward` as for `probe`: a tensor of inputs, an ``(inputs, targets)`` tuple,
    a mapping of tensors, or an iterable of batches (a DataLoader). In a mixture of experts
    each expert's units are counted over the tokens routed to it; an expert no token reached
    is reported unrouted (its units unobserved, none dead), and an expert routed at most
    `expert_share` of its mixture's tokens is a dead expert (`Diagnosis.experts`).
    """
    mon = probe(model, data, sites=sites, eps=eps, batch_size=batch_size,
                max_batches=max_batches, max_samples=max_samples, device=device,
                forward=forward)
    return diagnosis(mon, criterion, expert_share, **criterion_params)


def diagnosis(mon: ActivityMonitor, criterion: str = "never_active", expert_share: float = 0.0,
              **criterion_params) -> Diagnosis:
    """The `Diagnosis` of an exact probe pass already made (`probe`'s monitor)."""
    dead = mon.dead_units(criterion, **criterion_params)
    sparsity = mon.activation_sparsity()
    stats = mon.stats()
    rows = [SiteRow(n, s.activation, s.num_units, int(dead[n].sum()), sparsity[n])
            for n, s in mon.sites.items()]
    # an expert sees only its routed tokens: the samples are those of the other sites
    samples = max((s.samples for s in stats.values() if s.site.expert is None),
                  default=max(s.samples for s in stats.values()))
    return Diagnosis(rows, criterion, eps=mon.eps, samples=samples, dead=dead,
                     params=dict(criterion_params), experts=expert_rows(mon, expert_share),
                     expert_share=expert_share)
