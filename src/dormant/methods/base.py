"""What every method shares: prepare -> observe -> step -> finalize, as a training callback.

A method finds its sites in `prepare`, observes them with exact probe passes (eval mode, no
grad, every sample of the probe split), takes a decision in `step` (a pure function of
tensors, tested without training) and applies it, and in `finalize` leaves a plain model:
no hooks on the model, no optimizer hooks, no buffers of ours. Weight masks live in a
`Masks` object attached to the optimizer (gradients masked before, masks re-applied after
every step) and saved with the callback's state, so a resumed run keeps them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..diagnose import probe
from ..masks import Masks
from ..monitor import ActivityMonitor
from ..sites import PRODUCERS, Site, _unwrap, find_sites
from ..train.callbacks import Callback

__all__ = ["Method", "prunable_weights", "weight_sparsity"]


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of every Linear/ConvNd, by parameter name (the classifier included)."""
    return {f"{n}.weight" if n else "weight": m.weight
            for n, m in _unwrap(model).named_modules() if isinstance(m, PRODUCERS)}


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all Linear/ConvNd weights."""
    ws = prunable_weights(model).values()
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    return zeros / max(total, 1)


class Method(Callback):
    """Base of the methods: sites, probes, masks, a schedule of steps, metrics.

    Args:
        every: act at the end of every `every`-th epoch.
        every_steps: act every `every_steps` optimizer steps instead (exclusive with `every`).
        probe: the split whose every sample decides ("val" by default; never "test").
        probe_samples: use only the first N samples of the probe split (fixed, not random).
        activations: site activation kinds to act on (None: every kind).
        sites: explicit sites (default: `find_sites`, keeping those with a producer).
        eps: an output counts as active when > eps.
    """

    name = "method"

    def __init__(self, *, every: int = 1, every_steps: int | None = None, probe: str = "val",
                 probe_samples: int | None = None, activations: Sequence[str] | None = None,
                 sites: Sequence[Site] | None = None, eps: float = 0.0):
        if every < 1:
            raise ValueError(f"{self.name}: every must be >= 1 (epochs), got {every}")
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"{self.name}: every_steps must be >= 1, got {every_steps}")
        if probe not in ("train", "val"):
            raise ValueError(f"{self.name}: probe must be 'train' or 'val' (decisions never "
                             f"look at test data), got {probe!r}")
        if probe_samples is not None and probe_samples < 1:
            raise ValueError(f"{self.name}: probe_samples must be >= 1, got {probe_samples}")
        if eps < 0:
            raise ValueError(f"{self.name}: eps must be >= 0, got {eps}")
        self.every, self.every_steps = int(every), every_steps
        self.probe_split, self.probe_samples = probe, probe_samples
        self.activations = tuple(activations) if activations is not None else None
        self.sites: list[Site] | None = list(sites) if sites is not None else None
        self.eps = float(eps)
        self.masks: Masks | None = None
        self._saved_masks: dict | None = None
        self.metrics: dict = {}

    # -- prepare / finalize --------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        self.prepare(trainer)

    def prepare(self, trainer) -> None:
        model = trainer.model
        if self.sites is None:
            found = find_sites(model, trainer.data.train.inputs[:2])
            self.sites = [s for s in found if s.producer is not None and (
                self.activations is None or s.activation in self.activations)]
        if self._saved_masks is not None:
            self.ensure_masks(trainer).load_state_dict(self._saved_masks)
            self.masks.apply()
            self._saved_masks = None

    def ensure_masks(self, trainer) -> Masks:
        """The method's masks, created and attached to the optimizer on first use."""
        if self.masks is None:
            self.masks = Masks(_unwrap(trainer.model)).attach(trainer.optimizer)
        return self.masks

    def on_fit_end(self, trainer) -> None:
        self.finalize(trainer)

    def finalize(self, trainer) -> None:
        """Leave a plain model: masks stay applied to the weights, every hook goes."""
        if self.masks is not None:
            self.masks.apply()
            self.masks.detach()

    # -- observe -------------------------------------------------------------------------
    def probe_inputs(self, trainer) -> torch.Tensor:
        x = trainer.data.split(self.probe_split).inputs
        return x if self.probe_samples is None else x[:self.probe_samples]

    def observe(self, trainer) -> ActivityMonitor:
        """An exact probe pass over the probe split (eval mode, no grad)."""
        return probe(trainer.model, self.probe_inputs(trainer), sites=self.sites, eps=self.eps)

    # -- schedule ------------------------------------------------------------------------
    def on_step_end(self, trainer, loss) -> None:
        if self.every_steps is not None and trainer.step % self.every_steps == 0:
            self.step(trainer)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        if self.every_steps is None:
            self.step(trainer, act=epoch % self.every == 0)
        metrics.update(self.metrics)

    def step(self, trainer, act: bool = True) -> None:
        """Observe, record metrics in `self.metrics`, and (when `act`) decide and apply."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict() if self.masks is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._saved_masks = state.get("masks")
