"""Activation registry: one constructor for every activation a model can use, including the
sparsity-inducing activations of Price et al. (ICLR 2024):

    ShiftedReLU(tau)                max(0, x - tau)
    SoftThreshold(tau)              sign(x) max(0, |x| - tau)
    ClippedReLU(tau, m)    (CReLU)  min(max(0, x - tau), m)
    ClippedSoftThreshold(tau, m)    sign(x) min(max(0, |x| - tau), m)   (CST)

`tau` and `m` are in pre-activation units; `dormant.eoc` computes them (and the matching
initialisation) for a target activation sparsity.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Registry
from .sites import register_activation

__all__ = ["ACTIVATIONS", "make_activation", "ShiftedReLU", "SoftThreshold", "ClippedReLU",
           "ClippedSoftThreshold"]

ACTIVATIONS = Registry("activation")
for _name, _cls in {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
                    "sigmoid": nn.Sigmoid, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU,
                    "relu6": nn.ReLU6}.items():
    ACTIVATIONS.register(_name, help=f"torch.nn.{_cls.__name__}")(_cls)


def _check(tau: float, m: float | None = None) -> tuple[float, float | None]:
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0 (a threshold in pre-activation units), got {tau}")
    if m is not None and not m > 0:
        raise ValueError(f"the clip level m must be > 0, got {m}")
    return float(tau), None if m is None else float(m)


class _Thresholded(nn.Module):
    def __init__(self, tau: float = 0.0, m: float | None = None):
        super().__init__()
        self.tau, self.m = _check(tau, m)

    def set_params(self, tau: float, m: float | None = None) -> None:
        """Change the threshold (and clip level) in place, e.g. from an EoC prescription."""
        self.tau, m = _check(tau, m if m is not None else self.m)
        self.m = m

    def extra_repr(self) -> str:
        return f"tau={self.tau:.4g}" + (f", m={self.m:.4g}" if self.m is not None else "")


@ACTIVATIONS.register("shifted_relu")
@register_activation(kind="shifted_relu", nonneg=True)
class ShiftedReLU(_Thresholded):
    """Shifted ReLU: max(0, x - tau) (Price et al. 2024); tau=0 is the ReLU."""

    def __init__(self, tau: float = 0.0):
        super().__init__(tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x - self.tau)


@ACTIVATIONS.register("soft_threshold")
@register_activation(kind="soft_threshold")
class SoftThreshold(_Thresholded):
    """Soft thresholding: sign(x) max(0, |x| - tau) (Price et al. 2024)."""

    def __init__(self, tau: float = 0.0):
        super().__init__(tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softshrink(x, self.tau)


@ACTIVATIONS.register("crelu")
@register_activation(kind="crelu", nonneg=True)
class ClippedReLU(_Thresholded):
    """Clipped shifted ReLU (CReLU): min(max(0, x - tau), m) (Price et al. 2024)."""

    def __init__(self, tau: float = 0.0, m: float = 1.0):
        super().__init__(tau, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x - self.tau, 0.0, self.m)


@ACTIVATIONS.register("cst")
@register_activation(kind="cst")
class ClippedSoftThreshold(_Thresholded):
    """Clipped soft threshold (CST): sign(x) min(max(0, |x| - tau), m) (Price et al. 2024)."""

    def __init__(self, tau: float = 0.0, m: float = 1.0):
        super().__init__(tau, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(F.softshrink(x, self.tau), -self.m, self.m)


def make_activation(name: str | nn.Module | Callable[[], nn.Module], **kwargs) -> nn.Module:
    """A new activation module from a registry name (with its options), a factory, or a
    module (copied, so layers never share one instance by accident)."""
    if isinstance(name, nn.Module):
        return copy.deepcopy(name)
    if callable(name) and not isinstance(name, str):
        return name()
    return ACTIVATIONS.build(name, **kwargs)
