"""Iterative pruning: rounds of train -> prune -> rewind, and the IMP baseline.

Iterative magnitude pruning with rewinding (Frankle & Carbin 2019, "The Lottery Ticket
Hypothesis"; Frankle et al. 2020 for rewinding to an early epoch k): train E epochs, remove
a fraction `rate` of the remaining weights of the pruned layers, rewind the survivors (and
every other parameter and buffer) to their values at the rewind point, reset the optimizer
state, and train again. With K rounds a run trains (K + 1) * E epochs and visits K + 1
sparsity levels; the learning-rate schedule restarts every round.

Metrics per epoch: ``round`` (0 = dense), ``sparsity`` (pruned fraction of the pruned
layers while this epoch trained), ``weight_sparsity`` (over all Linear/Conv weights) and, on
the last epoch of a round, ``round_end: true`` (those rows are the accuracy-vs-sparsity
curve) with ``compression``, ``arch`` (surviving units per site) and MAC ratios, and
``pruned`` (weights removed right after it).
"""
from __future__ import annotations

import torch

from ..flops import macs, positions
from ..pruning import PRUNERS, alive, count_to_prune
from ..sites import PRODUCERS, _unwrap
from ..train.loop import evaluate
from .base import Method, weight_sparsity

__all__ = ["IterativePruning", "IMP"]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}


class IterativePruning(Method):
    """Base of round-based pruning methods; subclasses implement `decide`.

    Args:
        rounds: pruning events K (the run needs epochs = (K + 1) * epochs_per_round).
        epochs_per_round: E.
        rewind: "init" (epoch 0), an epoch number k, or "none" (fine-tune the pruned weights).
        layers: "all" Linear/Conv weights, or "hidden" (every layer but the classifier, i.e.
            only producers that feed an activation).
        keep_best: at the end of a round, restore the epoch of that round with the best
            validation accuracy before pruning (NNrelief); its test accuracy is reported.
    """

    name = "iterative-pruning"
    hidden_options = ("every", "every_steps")     # rounds set the schedule

    def __init__(self, rounds: int = 10, epochs_per_round: int = 5, rewind: str | int = "init",
                 layers: str = "all", keep_best: bool = False, **kwargs):
        bad = sorted(set(kwargs) & set(self.hidden_options))
        if bad:
            raise ValueError(f"{self.name}: {bad} do not apply; use rounds/epochs_per_round")
        super().__init__(**kwargs)
        if rounds < 1 or epochs_per_round < 1:
            raise ValueError(f"{self.name}: rounds and epochs_per_round must be >= 1, "
                             f"got {rounds}, {epochs_per_round}")
        if layers not in ("all", "hidden"):
            raise ValueError(f"{self.name}: layers must be 'all' or 'hidden', got {layers!r}")
        self.rewind_epoch = self._rewind_epoch(rewind)
        self.rounds, self.epochs_per_round = int(rounds), int(epochs_per_round)
        self.layers, self.keep_best = layers, bool(keep_best)
        self.names: list[str] = []
        self.snapshot: dict[str, torch.Tensor] | None = None    # the rewind point
        self.round_start: dict[str, torch.Tensor] | None = None
        self.best: tuple[float, dict] | None = None
        self._pos: dict[str, int] = {}

    def _rewind_epoch(self, rewind) -> int | None:
        if rewind == "none":
            return None
        if rewind == "init":
            return 0
        if isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0:
            return rewind
        raise ValueError(f"{self.name}: rewind must be 'init', 'none' or an epoch >= 0, "
                         f"got {rewind!r}")

    # -- configuration -------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return (self.rounds + 1) * self.epochs_per_round

    def check_config(self, cfg) -> None:
        """Refuse a config whose epoch budget does not match the rounds."""
        if cfg.epochs != self.total_epochs:
            raise ValueError(f"{self.name}: {self.rounds} rounds of {self.epochs_per_round} "
                             f"epochs need epochs = {self.total_epochs}, got {cfg.epochs}")
        if self.rewind_epoch is not None and self.rewind_epoch >= self.epochs_per_round:
            raise ValueError(f"{self.name}: rewind epoch {self.rewind_epoch} must come before "
                             f"the first pruning (epoch {self.epochs_per_round})")

    def schedule_period(self) -> int:
        return self.epochs_per_round

    # -- prepare -------------------------------------------------------------------------
    def prepare(self, trainer) -> None:
        super().prepare(trainer)
        model = _unwrap(trainer.model)
        hidden = {f"{s.producer}.weight" for s in self.sites}
        self.names = [f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, PRODUCERS) and (self.layers == "all"
                                                       or f"{n}.weight" in hidden)]
        masks = self.ensure_masks(trainer)
        params = dict(model.named_parameters())
        for n in self.names:
            if n not in masks.masks:
                masks.update(n, torch.ones_like(params[n], dtype=torch.bool))
        if trainer.epoch == 0:
            if self.rewind_epoch == 0:
                self.snapshot = _state(model)
            self.round_start = _state(model)
        self._pos = positions(model, trainer.data.train.inputs[:1])

    def pruning_masks(self) -> dict[str, torch.Tensor]:
        return {n: self.masks.masks[n] for n in self.names}

    def sparsity(self) -> float:
        m = self.pruning_masks()
        return 1.0 - alive(m) / max(sum(x.numel() for x in m.values()), 1)

    # -- the round -----------------------------------------------------------------------
    def on_step_end(self, trainer, loss) -> None:
        pass

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        model = _unwrap(trainer.model)
        if self.rewind_epoch == epoch and self.snapshot is None:
            self.snapshot = _state(model)
        rnd = (epoch - 1) // self.epochs_per_round
        metrics.update({"round": rnd, "sparsity": self.sparsity(),
                        "weight_sparsity": weight_sparsity(model)})
        if self.keep_best and (self.best is None or metrics["val_acc"] > self.best[0]):
            self.best = (metrics["val_acc"], _state(model))
        if epoch % self.epochs_per_round:
            return
        if self.keep_best:
            self._restore_best(trainer, metrics)
        metrics["round_end"] = True
        metrics.update(self.report(trainer))
        if rnd < self.rounds:
            metrics["pruned"] = self._prune(trainer, rnd)

    def report(self, trainer) -> dict:
        """Compression (weights of the pruned layers / remaining), the surviving architecture
        (units with a non-zero incoming weight, per site) and MAC ratios to the dense model."""
        model = _unwrap(trainer.model)
        m = self.pruning_masks()
        arch = {s.name: int((model.get_submodule(s.producer).weight.detach().flatten(1) != 0)
                            .any(1).sum()) for s in self.sites}
        dense = macs(model, self._pos, "dense")
        return {"compression": sum(x.numel() for x in m.values()) / max(alive(m), 1),
                "arch": arch,
                "flops_nonzero_ratio": macs(model, self._pos, "nonzero") / dense,
                "flops_structured_ratio": macs(model, self._pos, "structured") / dense}

    def _restore_best(self, trainer, metrics: dict) -> None:
        model = _unwrap(trainer.model)
        model.load_state_dict(self.best[1])
        self.best = None
        metrics["last_test_acc"], metrics["last_val_acc"] = metrics["test_acc"], metrics["val_acc"]
        metrics["val_loss"], metrics["val_acc"] = evaluate(model, trainer.data.val)
        metrics["test_loss"], metrics["test_acc"] = evaluate(model, trainer.data.test)

    def _prune(self, trainer, rnd: int) -> int:
        before = alive(self.pruning_masks())
        new = self.decide(trainer, rnd)
        for n, keep in new.items():
            self.masks.update(n, keep)
        model = _unwrap(trainer.model)
        if self.rewind_epoch is not None:
            model.load_state_dict(self.snapshot)
        self.masks.apply()
        trainer.optimizer.state.clear()
        self.round_start = _state(model)
        return before - alive(self.pruning_masks())

    def decide(self, trainer, rnd: int) -> dict[str, torch.Tensor]:
        """New keep-masks for the pruned layers (a subset of the current ones)."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "snapshot": self.snapshot,
                "round_start": self.round_start,
                "best": None if self.best is None else {"val": self.best[0], "state": self.best[1]}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.snapshot, self.round_start = state.get("snapshot"), state.get("round_start")
        best = state.get("best")
        self.best = None if best is None else (float(best["val"]), best["state"])


class IMP(IterativePruning):
    """Iterative pruning with a base pruner (global magnitude by default) and rewinding.

    rate: fraction of the remaining weights removed per round (0.2 = 20%).
    pruner: "global-magnitude", "layer-magnitude" or "random" (`dormant list pruners`).
    """

    name = "imp"

    def __init__(self, rate: float = 0.2, pruner: str = "global-magnitude", **kwargs):
        super().__init__(**kwargs)
        if not 0 < rate < 1:
            raise ValueError(f"{self.name}: rate must be in (0, 1), got {rate}")
        PRUNERS.get(pruner)                      # unknown names are refused here
        self.rate, self.pruner = float(rate), pruner

    def weights(self, trainer) -> dict[str, torch.Tensor]:
        params = dict(_unwrap(trainer.model).named_parameters())
        return {n: params[n].detach() for n in self.names}

    def generator(self, trainer, rnd: int) -> torch.Generator:
        return torch.Generator().manual_seed(1_000_003 * trainer.seed + rnd)

    def decide(self, trainer, rnd: int) -> dict[str, torch.Tensor]:
        masks = self.pruning_masks()
        n = count_to_prune(alive(masks), self.rate)
        return PRUNERS.get(self.pruner)(self.weights(trainer), masks, n,
                                        generator=self.generator(trainer, rnd))
