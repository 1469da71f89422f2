"""Dead units become a smaller model: `compact` removes, physically and in place, every unit
never active on probe data, and reports what it removed and how sure that is.

A unit with no firing in N independent observations fires with probability below
``1 - (1 - confidence) ** (1 / N)`` (about 3/N at 95%). Tokens of one sequence are not
independent, so the bound is stated for samples (sequences), the conservative count, next to
the number of tokens. `save_compacted` / `load_compacted` carry the new widths with the
weights: a model built from its (unchanged) config is resized, then loaded.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .batching import (
    Forward,
    default_forward,
    eval_mode,
    iter_batches,
    num_samples,
    probe_example,
    take,
    to_device,
)
from .diagnose import _model_device
from .diagnose import probe as run_probe
from .flops import macs, positions
from .sharding import sharded_parameters
from .sites import Site, _unwrap, find_sites
from .surgery import architecture, remove_units, resize
from .tables import Column, Table

__all__ = ["PLAN_FORMAT", "CompactReport", "SiteCompaction", "compact", "firing_bound", "load_compacted",
           "save_compacted", "sequences_behind"]

FORMAT = "dormant-compacted/1"
PLAN_FORMAT = "dormant-removal-plan/1"      # the removal plans `dormant scan` writes


def firing_bound(n: int, confidence: float = 0.95) -> float:
    """Upper bound on the firing probability of a unit never seen firing in `n` independent
    observations, at `confidence` (1.0 with no observation)."""
    return 1.0 if n <= 0 else 1.0 - (1.0 - confidence) ** (1.0 / n)


def sequences_behind(stats: Mapping[str, Any], sites: Sequence[Site], n: int) -> dict[str, int]:
    """Per site, the samples (sequences) behind its verdict, `n` in all. A site outside an
    expert saw every one (its output rows may be tokens: OPT flattens them). An expert saw
    the sequences of its routed tokens: at least ceil(tokens / tokens per sequence), the
    conservative count used."""
    per = max((stats[s.name].positions / n for s in sites if s.expert is None and n), default=1)
    return {s.name: n if s.expert is None else
            min(n, math.ceil(stats[s.name].positions / max(per, 1))) for s in sites}


@dataclass(frozen=True)
class SiteCompaction:
    site: str
    units: int
    removed: int
    tokens: int          # observations per unit (tokens x positions)
    samples: int         # samples (sequences) behind the verdict
    bound: float         # firing probability bound of a removed unit, per sample


@dataclass
class CompactReport:
    """What `compact` removed, with the evidence, and what it changed."""
    sites: list[SiteCompaction]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    max_diff_probe: float
    max_diff_held_out: float | None
    confidence: float

    @property
    def removed(self) -> int:
        return sum(s.removed for s in self.sites)

    def to_dict(self) -> dict:
        return {"sites": [vars(s) for s in self.sites], "removed": self.removed,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "max_diff_probe": self.max_diff_probe,
                "max_diff_held_out": self.max_diff_held_out, "confidence": self.confidence}

    def __str__(self) -> str:
        t = Table([Column("site", align="left"), "units", "removed", "tokens", "samples",
                   f"max firing rate ({self.confidence:.0%})"])
        for s in self.sites:
            t.add(s.site, s.units, s.removed, s.tokens, s.samples,
                  f"{s.bound:.2%}" if s.removed else "")
        held = ("" if self.max_diff_held_out is None
                else f", held-out {self.max_diff_held_out:.3g}")
        return (f"{t.to_markdown()}\nremoved {self.removed} units: parameters "
                f"{self.params_before:,} -> {self.params_after:,}, MACs per sample "
                f"{self.macs_before:,} -> {self.macs_after:,}; max |output change|: probe "
                f"{self.max_diff_probe:.3g}{held}")


@torch.no_grad()
def compact(model: nn.Module, probe: Any, *, forward: Forward | None = None,
            held_out: Any = None, sites: Sequence[Site] | None = None, batch_size: int = 512,
            confidence: float = 0.95, plan: dict | str | os.PathLike | None = None
            ) -> CompactReport:
    """Remove, physically and in place, every unit of `model` never active on `probe`
    (plain, gated and expert sites, conv channels; units on a residual stream only where
    Torch-Pruning proves the coupling). Outputs before and after are compared on `probe`
    and on `held_out` data (max abs difference in the report). `plan`: a removal plan of
    `dormant scan` (its scan.json or the plan itself): exactly its units are removed (the
    probe still checks the outputs and states the evidence)."""
    model = _unwrap(model)
    forward = forward or default_forward
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if sharded_parameters(model):
        raise ValueError("compact: the model's parameters are sharded by FSDP2 (fully_shard); "
                         "removing units would change every rank's shards: compact an "
                         "unsharded copy (its full state dict loaded into the plain model), "
                         "then shard that")
    example = probe_example(model, probe, forward)
    if example is None:
        raise ValueError("compact: the probe data is empty")
    sites = list(sites) if sites is not None else find_sites(model, example)
    mon = run_probe(model, probe, sites=sites, batch_size=batch_size, forward=forward)
    stats, dead = mon.stats(), mon.dead_units("never_active")
    if plan is not None:
        dead = _from_plan(plan, sites)
    before = _outputs(model, probe, forward, batch_size)
    held_before = _outputs(model, held_out, forward, batch_size) if held_out is not None else None
    pos = positions(model, take(example, 1))
    params0, macs0 = _params(model), macs(model, pos)
    removed = remove_units(model, [s for s in sites if s.producer is not None],
                           {n: d.cpu() for n, d in dead.items()}, example_input=example)
    seqs = sequences_behind(stats, sites, sum(num_samples(b) for b in iter_batches(probe,
                                                                               batch_size)))
    rows = []
    for s in sites:
        st, gone = stats[s.name], int(removed.get(s.name, torch.zeros(1)).sum())
        rows.append(SiteCompaction(s.name, s.num_units, gone, st.positions, seqs[s.name],
                                   firing_bound(seqs[s.name], confidence)))
    diff = _max_diff(before, _outputs(model, probe, forward, batch_size))
    held = (None if held_before is None
            else _max_diff(held_before, _outputs(model, held_out, forward, batch_size)))
    return CompactReport(rows, params0, _params(model), macs0,
                         macs(model, positions(model, take(example, 1))), diff, held, confidence)


def _from_plan(plan, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    """{site: bool[units]} from a `dormant scan` removal plan (a dict, or a scan.json /
    plan file)."""
    if not isinstance(plan, dict):
        path = Path(plan)
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"plan: {path} cannot be read ({type(err).__name__})") from None
    plan = plan.get("plan", plan)
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"plan: not a removal plan of dormant scan (format {PLAN_FORMAT})")
    by_name = {s.name: s for s in sites}
    unknown = sorted(set(plan["sites"]) - set(by_name))
    if unknown:
        raise ValueError(f"plan: no site(s) {unknown} in this model (a plan of another model?)")
    out = {n: torch.zeros(s.num_units, dtype=torch.bool) for n, s in by_name.items()}
    for name, units in plan["sites"].items():
        if any(not 0 <= u < by_name[name].num_units for u in units):
            raise ValueError(f"plan: {name} has {by_name[name].num_units} units, the plan "
                             f"names {units}")
        out[name][units] = True
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _outputs(model: nn.Module, data: Any, forward: Forward, batch_size: int) -> list:
    device = _model_device(model)
    out = []
    with eval_mode(model):
        for batch in iter_batches(data, batch_size):
            out.append(_first_tensor(forward(model, to_device(batch, device))))
    return out


def _first_tensor(out: Any) -> torch.Tensor:
    """The main output: a tensor, a model output's logits, the first tensor of a tuple."""
    if torch.is_tensor(out):
        return out.detach().float().cpu()
    if hasattr(out, "logits") and torch.is_tensor(out.logits):
        return out.logits.detach().float().cpu()
    items = out.values() if isinstance(out, dict) else out
    for x in items:
        if torch.is_tensor(x):
            return x.detach().float().cpu()
    raise TypeError(f"compact: no tensor in the model's output ({type(out).__name__})")


def _max_diff(a: list, b: list) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def save_compacted(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a compacted model's weights with its per-layer widths (one file, loads with
    ``torch.load(weights_only=True)``)."""
    path = Path(path)
    model = _unwrap(model)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "architecture": architecture(model),
                "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_compacted(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Give `model` -- built afresh the way the original was (e.g. ``from_config``) -- the
    widths saved by `save_compacted`, then its weights; returns it."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}); it is not a file "
                         "written by dormant.save_compacted") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by dormant.save_compacted")
    model = _unwrap(model)
    resize(model, saved["architecture"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path} belongs to another model ({str(err)[:200]})") from None
    return model
