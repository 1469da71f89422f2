"""Activation registry: one constructor for every activation a model can use."""
from __future__ import annotations

import torch.nn as nn

from .registry import Registry

__all__ = ["ACTIVATIONS", "make_activation"]

ACTIVATIONS = Registry("activation")
for _name, _cls in {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
                    "sigmoid": nn.Sigmoid, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU,
                    "relu6": nn.ReLU6}.items():
    ACTIVATIONS.register(_name, help=f"torch.nn.{_cls.__name__}")(_cls)


def make_activation(name: str | nn.Module, **kwargs) -> nn.Module:
    """An activation module from a registry name (or a module, returned as is)."""
    if isinstance(name, nn.Module):
        return name
    return ACTIVATIONS.build(name, **kwargs)
