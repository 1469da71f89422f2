"""A tiny synthetic classification task (Gaussian clusters) for tests and smoke runs."""
from __future__ import annotations

import torch

from .base import DATASETS, Dataset, Split, carve_val


@DATASETS.register("synthetic")
def synthetic(val_size: int | None = None, *, num_train: int = 2048, num_test: int = 512,
              dim: int = 20, num_classes: int = 4, noise: float = 1.0, seed: int = 0,
              image: bool = False) -> Dataset:
    """Gaussian clusters in `dim` dimensions (or 1x8x8 images with image=True); offline."""
    g = torch.Generator().manual_seed(seed)
    d = 64 if image else dim
    centers = torch.randn(num_classes, d, generator=g) * 2.0

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_classes, (n,), generator=g)
        x = centers[y] + noise * torch.randn(n, d, generator=g)
        return (x.view(n, 1, 8, 8) if image else x), y

    x, y = draw(num_train)
    train, val = carve_val(x, y, num_train // 8 if val_size is None else val_size)
    return Dataset("synthetic", train, val, Split(*draw(num_test)), num_classes)
