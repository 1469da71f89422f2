"""Optimizer state that follows edits of the parameters it belongs to."""
from __future__ import annotations

import torch

__all__ = ["zero_state"]


@torch.no_grad()
def zero_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> int:
    """Zero the entries `where` (a bool tensor shaped like `param`) of every per-entry state
    tensor of `param` (SGD momentum, Adam/AdamW moments, ...); scalar state such as Adam's
    step count is left alone. Returns how many state tensors were touched."""
    state = optimizer.state.get(param, {})
    touched = 0
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), 0)
            touched += 1
    return touched
