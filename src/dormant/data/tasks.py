"""Continual learning: a sequence of tasks made from one dataset, a new task every
`epochs_per_task` epochs (the run's epochs = tasks x epochs_per_task).

* ``permuted``: task k permutes the input features (pixels) with a fixed permutation drawn
  from (seed, k); task 0 is the identity. The labels stay (permuted MNIST, Goodfellow et al.
  2013; Dohare et al. 2024).
* ``random-labels``: task k keeps the inputs and draws new labels from (seed, k) for the
  training split only (memorisation tasks); validation and test keep the true labels.

Each task takes `samples` training samples (a fixed subset, the same for every task), so a
task is quick. Task k is a pure function of (dataset, kind, seed, k): a resumed run sees the
tasks the straight one saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Dataset, Split

__all__ = ["TaskSchedule", "KINDS"]

KINDS = ("permuted", "random-labels")


@dataclass(frozen=True)
class TaskSchedule:
    kind: str = "permuted"
    epochs_per_task: int = 1
    samples: int | None = None     # training samples per task (None: the whole split)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tasks: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.epochs_per_task, int) or self.epochs_per_task < 1:
            raise ValueError(f"tasks: epochs_per_task must be an int >= 1, got "
                             f"{self.epochs_per_task!r}")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise ValueError(f"tasks: samples must be an int >= 1, got {self.samples!r}")

    def task_of(self, epoch: int) -> int:
        """The task trained in `epoch` (1-based epochs, 0-based tasks)."""
        return (epoch - 1) // self.epochs_per_task

    def make(self, base: Dataset, task: int) -> Dataset:
        """Task `task` of `base`."""
        g = torch.Generator().manual_seed(1_000_003 * self.seed + task)
        train = base.train if self.samples is None else Split(base.train.inputs[:self.samples],
                                                              base.train.targets[:self.samples])
        if self.kind == "permuted":
            d = base.train.inputs[0].numel()
            perm = torch.arange(d) if task == 0 else torch.randperm(d, generator=g)
            perm = perm.to(base.train.inputs.device)

            def move(s: Split) -> Split:
                x = s.inputs.flatten(1)[:, perm].view_as(s.inputs)
                return Split(x, s.targets)
            return Dataset(f"{base.name}-permuted-{task}", move(train), move(base.val),
                           move(base.test), base.num_classes)
        labels = torch.randint(0, base.num_classes, (len(train),), generator=g)
        return Dataset(f"{base.name}-random-labels-{task}",
                       Split(train.inputs, labels.to(train.targets.device)), base.val,
                       base.test, base.num_classes)
