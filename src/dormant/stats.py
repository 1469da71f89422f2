"""Summary statistics shared by the comparison runner and the reports (no other imports, so
that `dormant.report` reads results without importing the methods or the training loop)."""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["mean_std"]


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s
