"""Dataset containers, the registry, and a tensor batch iterator (no per-sample Python)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from ..registry import Registry

DATASETS = Registry("dataset")


class DataNotFoundError(FileNotFoundError):
    """The dataset's files are not on this machine; the message says how to get them."""


class CorruptDataError(ValueError):
    """A data file is truncated, malformed or fails its checksum."""


@dataclass
class Split:
    inputs: torch.Tensor   # (N, *input_shape) float32
    targets: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device) -> "Split":
        return Split(self.inputs.to(device), self.targets.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.inputs.shape[1:])

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; splits: train, val, test")
        return getattr(self, name)

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.train.to(device), self.val.to(device),
                       self.test.to(device), self.num_classes)


def carve_val(inputs: torch.Tensor, targets: torch.Tensor, val_size: int,
              split_seed: int = 0) -> tuple[Split, Split]:
    """Split a training set into (train, val) with a fixed permutation."""
    n = len(targets)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val, tr = perm[:val_size], perm[val_size:]
    return Split(inputs[tr], targets[tr]), Split(inputs[val], targets[val])


def check_sizes(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse sizes that make no dataset: num_train, num_test, dim, ... >= 1, num_classes
    >= 2 (cheap: a comparison checks every variant's before its first run)."""
    for key, value in kwargs.items():
        least = 2 if key == "num_classes" else 1
        if (key.startswith("num_") or key == "dim") and isinstance(value, int) and value < least:
            raise ValueError(f"dataset {name!r}: {key} must be >= {least}, got {value}")


def load_dataset(name: str, *, val_size: int | None = None, **kwargs) -> Dataset:
    """Load a registered dataset (`dormant list` shows them)."""
    loader = DATASETS.get(name)
    check_sizes(name, kwargs)
    data = loader(val_size=val_size, **kwargs)
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        if len(part) == 0 or part.inputs[0].numel() == 0:
            raise ValueError(f"dataset {name!r} ({kwargs or 'defaults'}): its {split} split "
                             f"has no {'samples' if len(part) == 0 else 'input features'} "
                             f"(inputs {tuple(part.inputs.shape)})")
    return data


def batches(split: Split, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches by slicing whole tensors (one randperm per epoch when shuffling)."""
    n = len(split)
    if shuffle:
        idx = torch.randperm(n, generator=generator).to(split.inputs.device)
        x, y = split.inputs[idx], split.targets[idx]
    else:
        x, y = split.inputs, split.targets
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]
