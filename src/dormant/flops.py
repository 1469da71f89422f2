"""Multiply-accumulate counts of the Linear/Conv layers, dense, sparse and structured.

    dense        every weight counts (the unpruned architecture)
    nonzero      only non-zero weights count (unstructured sparsity, as in ShrinkBench)
    structured   the architecture that survives: per layer, output units with any non-zero
                 incoming weight x input channels/features with any non-zero weight
                 (what compaction would keep)

Each weight is used once per output position (tokens, spatial positions); positions are read
from one forward pass of an example input. FLOPs = 2 x MACs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .batching import default_forward, eval_mode, take
from .sites import _unwrap, is_conv1d, is_producer, out_units

__all__ = ["positions", "macs"]


@torch.no_grad()
def positions(model: nn.Module, example) -> dict[str, int]:
    """Output positions per sample of every Linear/Conv (tokens x spatial), from one
    eval-mode forward of the first sample of `example` (a tensor or a mapping of keyword
    inputs; train flags restored)."""
    model = _unwrap(model)
    out: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if is_producer(m):
            def hook(mod, inp, y, name=name):
                out[name] = y.numel() // (y.shape[0] * out_units(mod))
            handles.append(m.register_forward_hook(hook))
    try:
        with eval_mode(model):
            default_forward(model, take(example, 1))
    finally:
        for h in handles:
            h.remove()
    return out


def macs(model: nn.Module, pos: dict[str, int], kind: str = "dense") -> int:
    """MACs per sample of all Linear/Conv layers, `kind` in dense, nonzero, structured."""
    if kind not in ("dense", "nonzero", "structured"):
        raise ValueError(f"kind must be dense, nonzero or structured, got {kind!r}")
    total = 0
    for name, m in _unwrap(model).named_modules():
        if not is_producer(m) or name not in pos:
            continue
        w = m.weight.detach().t() if is_conv1d(m) else m.weight.detach()   # (out, in, ...)
        if kind == "dense":
            n = w.numel()
        elif kind == "nonzero":
            n = int((w != 0).sum())
        else:
            nz = w != 0
            rows = int(nz.flatten(1).any(1).sum())
            cols = int(nz.transpose(0, 1).flatten(1).any(1).sum())
            n = rows * cols * math.prod(w.shape[2:])
        total += n * pos[name]
    return total
