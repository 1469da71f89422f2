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

import warnings
from dataclasses import dataclass

import torch

from ..batching import take
from ..flops import macs, positions
from ..options import option
from ..pruning import PRUNERS, alive, count_to_prune
from ..sharding import resharded, sharded_like
from ..sites import _unwrap, is_producer
from ..units import fan_in_rows
from .base import METHODS, EpochResult, Method, MethodOptions, check_option, weight_sparsity

__all__ = ["IterativePruning", "IMP"]


def _state(model) -> dict[str, torch.Tensor]:
    """A copy of the weights (under FSDP2: this rank's shards, as DTensors)."""
    return {k: v.detach().clone() for k, v in resharded(_unwrap(model)).state_dict().items()}


def _load(model, state: dict[str, torch.Tensor]) -> None:
    resharded(_unwrap(model)).load_state_dict(state)


@dataclass
class RoundOptions(MethodOptions):
    """Options of round-based pruning (no `every`: the rounds set the schedule)."""
    rounds: int = option(10, "pruning events K (the run trains (K + 1) x epochs_per_round "
                         "epochs)", at_least=1)
    epochs_per_round: int = option(5, "epochs E trained at each sparsity level", at_least=1)
    rewind: str | int = option("init", "rewind survivors to 'init' (epoch 0), to an epoch "
                               "k, or 'none' (fine-tune)")
    layers: str = option("all", "prune all Linear/Conv weights, or only the 'hidden' ones "
                         "(producers that feed an activation)", choices=("all", "hidden"))
    keep_best: bool = option(False, "restore each round's epoch with the best validation "
                             "score before pruning (end_epoch(val_score=...))")

    def check(self, owner: str) -> None:
        r = self.rewind
        check_option(r in ("init", "none") or (isinstance(r, int) and r >= 0), owner,
                     f"rewind: expected 'init', 'none' or an epoch >= 0, got {r!r}")
        check_option(not isinstance(r, int) or r < self.epochs_per_round, owner,
                     f"rewind: epoch {r} must come before the first pruning (epoch "
                     f"{self.epochs_per_round} = epochs_per_round)")


class IterativePruning(Method):
    """Base of round-based pruning methods; subclasses implement `decide`.

    A round ends every `epochs_per_round` epochs: (with keep_best) the round's best epoch is
    restored, the surviving weights are pruned, the survivors rewound and the optimizer state
    cleared; `end_epoch` then returns ``new_round=True`` (restart a per-round lr schedule).
    """

    name = "iterative-pruning"
    Options = RoundOptions
    acts_on_sharded = True       # decisions on the gathered weights, masks on each rank's rows

    def __init__(self, **options):
        super().__init__(**options)
        rewind = self.opts.rewind
        self.rewind_epoch = None if rewind == "none" else 0 if rewind == "init" else rewind
        self.names: list[str] = []
        self.snapshot: dict[str, torch.Tensor] | None = None    # the rewind point
        self.round_start: dict[str, torch.Tensor] | None = None
        self.best: tuple[float, dict] | None = None
        self._pos: dict[str, int] = {}

    # -- configuration -------------------------------------------------------------------
    @property
    def total_epochs(self) -> int:
        return (self.opts.rounds + 1) * self.opts.epochs_per_round

    def check_budget(self, *, epochs: int | None = None, total_steps: int | None = None) -> None:
        """Refuse an epoch budget that does not match the rounds."""
        if epochs is not None and epochs != self.total_epochs:
            raise ValueError(f"{self.name}: {self.opts.rounds} rounds of "
                             f"{self.opts.epochs_per_round} epochs need epochs = "
                             f"{self.total_epochs}, got {epochs}")

    def schedule_period(self) -> int:
        """Epochs per round: a learning-rate schedule restarts with each round."""
        return self.opts.epochs_per_round

    # -- prepare -------------------------------------------------------------------------
    def _prepare(self) -> None:
        model = _unwrap(self.model)
        params = dict(model.named_parameters())
        self.names = self._unfrozen(self.pruned_names(model))
        masks = self.ensure_masks()
        for n in self.names:
            if n not in masks.masks:
                masks.update(n, torch.ones(params[n].shape, dtype=torch.bool,
                                           device=params[n].device))
        if self.epoch == 0:
            if self.rewind_epoch == 0:
                self.snapshot = _state(model)
            self.round_start = _state(model)
        else:          # a resumed state holds whole tensors: under FSDP2, this rank's rows
            self.snapshot = sharded_like(model, self.snapshot)
            self.round_start = sharded_like(model, self.round_start)
            if self.best is not None:
                self.best = (self.best[0], sharded_like(model, self.best[1]))
        self._pos = positions(model, take(self.example, 1))

    def _unfrozen(self, names: list[str]) -> list[str]:
        """`names` minus the frozen parameters (with a warning; refused when none is left)."""
        frozen = [n for n in names if n in self.frozen()]
        if frozen and len(frozen) == len(names):
            raise ValueError(f"{self.name}: every weight it would prune is frozen "
                             f"(requires_grad=False): {frozen}; nothing would be done")
        if frozen:
            warnings.warn(f"{self.name}: frozen weights (requires_grad=False) are not pruned: "
                          f"{frozen}", stacklevel=3)
        return [n for n in names if n not in frozen]

    def pruned_names(self, model) -> list[str]:
        """The weights this method prunes: every Linear/Conv/Conv1D kernel, or with
        layers="hidden" those of the site producers. A tied weight (GPT-2's lm_head) is
        listed once, under its owner."""
        hidden = {f"{s.producer}.weight" for s in self.sites}
        params = dict(model.named_parameters())
        return [f"{n}.weight" for n, m in model.named_modules()
                if is_producer(m) and f"{n}.weight" in params
                and (self.opts.layers == "all" or f"{n}.weight" in hidden)]

    def pruning_masks(self) -> dict[str, torch.Tensor]:
        return {n: self.masks.masks[n] for n in self.names}

    def sparsity(self) -> float:
        m = self.pruning_masks()
        return 1.0 - alive(m) / max(sum(x.numel() for x in m.values()), 1)

    # -- the round -----------------------------------------------------------------------
    def _after_step(self) -> None:
        pass

    def _end_epoch(self, result: EpochResult, val_score, evaluate) -> None:
        model, epoch, per = _unwrap(self.model), self.epoch, self.opts.epochs_per_round
        if self.rewind_epoch == epoch and self.snapshot is None:
            self.snapshot = _state(model)
        rnd = (epoch - 1) // per
        result.update({"round": rnd, "sparsity": self.sparsity(),
                       "weight_sparsity": weight_sparsity(model)})
        if self.opts.keep_best:
            if val_score is None:
                raise ValueError(f"{self.name} keeps the best epoch of each round: call "
                                 "end_epoch(val_score=...) with the epoch's validation score, "
                                 "or build it with keep_best=False")
            if self.best is None or val_score > self.best[0]:
                self.best = (float(val_score), _state(model))
        if epoch % per:
            return
        if self.opts.keep_best:
            _load(model, self.best[1])
            self.best = None
            result.restored = True
            if evaluate is not None:
                result.update(evaluate(self.model))
        result["round_end"] = True
        with self.editing(state=False):
            result.update(self.report())
        if rnd < self.opts.rounds:
            result["pruned"] = self._prune(rnd)
            result.new_round = True

    def report(self) -> dict:
        """Compression (weights of the pruned layers / remaining), the surviving architecture
        (units with a non-zero incoming weight, per site) and MAC ratios to the dense model."""
        model = _unwrap(self.model)
        m = self.pruning_masks()
        arch = {s.name: int((fan_in_rows(model, s).detach() != 0).any(1).sum())
                for s in self.sites}
        dense = macs(model, self._pos, "dense")
        return {"compression": sum(x.numel() for x in m.values()) / max(alive(m), 1),
                "arch": arch,
                "flops_nonzero_ratio": macs(model, self._pos, "nonzero") / dense,
                "flops_structured_ratio": macs(model, self._pos, "structured") / dense}

    def _prune(self, rnd: int) -> int:
        before = alive(self.pruning_masks())
        new = self.decide(rnd)
        for n, keep in new.items():
            self.masks.update(n, keep)
        model = _unwrap(self.model)
        if self.rewind_epoch is not None:
            _load(model, self.snapshot)
        self.masks.apply()
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.round_start = _state(model)
        return before - alive(self.pruning_masks())

    def decide(self, rnd: int) -> dict[str, torch.Tensor]:
        """New keep-masks for the pruned layers (a subset of the current ones); reads the
        weights inside `editing` (whole under FSDP2), runs the model outside it."""
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


@METHODS.register
class IMP(IterativePruning):
    """Iterative pruning with a base pruner (global magnitude by default) and rewinding.

    rate: fraction of the remaining weights removed per round (0.2 = 20%).
    pruner: "global-magnitude", "layer-magnitude" or "random" (`dormant list pruners`).
    """

    name = "imp"

    @dataclass
    class Options(RoundOptions):
        rate: float = option(0.2, "fraction of the remaining weights removed per round",
                             within=(0, 1))
        pruner: str = option("global-magnitude", "base pruner (`dormant list pruners`)",
                             choices=tuple(PRUNERS.names()))

    def weights(self) -> dict[str, torch.Tensor]:
        params = dict(_unwrap(self.model).named_parameters())
        return {n: params[n].detach() for n in self.names}

    def generator(self, rnd: int) -> torch.Generator:
        return torch.Generator().manual_seed(1_000_003 * self.seed + rnd)

    def decide(self, rnd: int) -> dict[str, torch.Tensor]:
        masks = self.pruning_masks()
        n = count_to_prune(alive(masks), self.opts.rate)
        with self.editing(self.names, state=False):   # FSDP2: the weights read whole
            return PRUNERS.get(self.opts.pruner)(self.weights(), masks, n,
                                                 generator=self.generator(rnd))
