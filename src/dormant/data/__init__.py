"""Datasets as whole tensors in memory, behind a registry.

Every dataset has train/val/test splits; the validation split is carved from the training
set with a fixed seed (independent of the run seed), so every run sees the same split.
"""
from . import fashion_mnist, mnist1d, synthetic  # noqa: F401  (register)
from .base import (
           DATASETS,
           CorruptDataError,
           DataNotFoundError,
           Dataset,
           Split,
           batches,
           load_dataset,
)

__all__ = ["DATASETS", "DataNotFoundError", "CorruptDataError", "Dataset", "Split", "batches",
           "load_dataset"]
