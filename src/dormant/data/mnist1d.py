"""An MNIST-1D-style task, generated procedurally (offline, deterministic): the built-in default.

After Greydanus (2020), "Scaling down deep learning": ten 12-point template signals, each
placed at a random position and width inside a 40-point sequence, scaled, sheared, and
corrupted with correlated and i.i.d. noise. The templates and constants are our own, so the
data is *not* byte-identical to the reference MNIST-1D; it is small, hard enough that an MLP
does not saturate, and needs no download.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import DATASETS, Dataset, Split, carve_val

# One row per class: 12 points, 0 = baseline.
TEMPLATES = np.array([
    [0, 1.0, 1.5, 1.8, 2.0, 2.0, 2.0, 2.0, 1.8, 1.5, 1.0, 0],      # 0: plateau up
    [0, -2.0, -2.0, -1.6, -1.2, -0.8, -0.4, 0, 0.4, 0.8, 0, 0],    # 1: drop, slow rise
    [0, 1.0, 1.5, 1.5, 1.0, 0.2, -0.2, -1.0, -1.5, -1.5, -1.0, 0], # 2: up then down
    [0, 1.0, 1.5, 1.5, 1.0, 0, 0, 1.0, 1.5, 1.5, 1.0, 0],          # 3: two bumps up
    [0, -0.6, -1.2, -1.8, -2.4, -2.4, 0, 0, 0, 0, 0, 0],           # 4: ramp down, jump
    [0, -2.0, -2.0, -2.0, -2.0, 0, 1.0, 1.5, 1.5, 1.0, -0.5, 0],   # 5: down block then bump
    [0, -1.0, -1.5, -1.8, -2.0, -2.0, -2.0, -2.0, -1.8, -1.5, -1.0, 0],  # 6: plateau down
    [0, 2.0, 2.0, 1.6, 1.2, 0.8, 0.4, 0, -0.4, -0.8, 0, 0],        # 7: jump, slow fall
    [0, -1.0, -1.5, -1.5, -1.0, 0, 0, -1.0, -1.5, -1.5, -1.0, 0],  # 8: two dips
    [0, -1.0, -1.5, -1.5, -1.0, 0, 0, 0, 0, 0.3, 0.7, 0],          # 9: dip then flat
])


def generate(n: int, rng: np.random.Generator, length: int = 40, *, shear: float = 0.75,
             scale: float = 0.4, corr_noise: float = 0.25, iid_noise: float = 0.05
             ) -> tuple[np.ndarray, np.ndarray]:
    """`n` signals of `length` points and their labels, vectorised over samples."""
    labels = rng.integers(0, 10, n)
    t = TEMPLATES[labels]                                     # (n, 12)
    grid = np.linspace(0.0, 1.0, length)
    width = rng.uniform(0.2, 0.35, n)
    start = rng.uniform(0.0, 1.0 - width)
    u = (grid[None, :] - start[:, None]) / width[:, None]     # (n, L) position in template
    pos = np.clip(u, 0.0, 1.0) * 11
    i0 = np.minimum(np.floor(pos).astype(int), 10)
    frac = pos - i0
    rows = np.arange(n)[:, None]
    x = t[rows, i0] * (1 - frac) + t[rows, i0 + 1] * frac      # linear interpolation
    x = np.where((u >= 0) & (u <= 1), x, 0.0)
    x = x * (1 + scale * rng.uniform(-1, 1, (n, 1)))
    x = x + shear * rng.uniform(-1, 1, (n, 1)) * (grid[None, :] - 0.5)
    kernel = np.exp(-0.5 * (np.arange(-4, 5) / 2.0) ** 2)
    kernel /= np.sqrt((kernel ** 2).sum())
    white = rng.standard_normal((n, length + 8))
    smooth = np.stack([np.convolve(w, kernel, mode="valid") for w in white]) if n else white
    x = x + corr_noise * smooth[:, :length] + iid_noise * rng.standard_normal((n, length))
    return x.astype(np.float32), labels.astype(np.int64)


@DATASETS.register("mnist1d")
def mnist1d(val_size: int | None = None, *, num_train: int = 8000, num_test: int = 2000,
            length: int = 40, seed: int = 42) -> Dataset:
    """MNIST-1D-style sequences (40 points, 10 classes), generated offline; the default."""
    rng = np.random.default_rng(seed)
    x, y = generate(num_train + num_test, rng, length)
    x = (x - x[:num_train].mean()) / x[:num_train].std()     # statistics of training data only
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    train, val = carve_val(x[:num_train], y[:num_train],
                           num_train // 8 if val_size is None else val_size)
    return Dataset("mnist1d", train, val, Split(x[num_train:], y[num_train:]), 10)
