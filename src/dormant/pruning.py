"""Unstructured pruning decisions: pure functions from tensors to boolean keep-masks.

Every pruner takes the current weights and keep-masks of the layers it may prune and a
count or rate, and returns new keep-masks (True = kept) that are a subset of the old ones:
pruned stays pruned. Counts are exact: ties in the scores are broken by position, so the
achieved sparsity is the requested one, weight for weight.

    PRUNERS.get("global-magnitude")(weights, masks, n)   # prune the n smallest |w| overall
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from .registry import Registry

__all__ = ["PRUNERS", "select_lowest", "count_to_prune", "alive", "prune_count"]

Masks = dict[str, torch.Tensor]
PRUNERS = Registry("pruner")


def alive(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of kept entries."""
    return sum(int(m.sum()) for m in masks.values())


def count_to_prune(num_alive: int, rate: float) -> int:
    """floor(rate * alive): the weights one round at `rate` removes."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    return int(math.floor(num_alive * rate))


def prune_count(rate: float, rounds: int, total: int) -> int:
    """Weights left after `rounds` rounds at `rate` from `total` (floor each round)."""
    left = total
    for _ in range(rounds):
        left -= count_to_prune(left, rate)
    return left


def select_lowest(scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                  n: int) -> Masks:
    """Prune the `n` kept entries with the lowest scores over all tensors together (ties:
    the earlier tensor, then the earlier position, goes first). Returns new keep-masks."""
    names = list(masks)
    if n <= 0:
        return {k: masks[k].clone() for k in names}
    flat_s = torch.cat([scores[k].detach().flatten().double() for k in names])
    flat_m = torch.cat([masks[k].flatten() for k in names])
    idx = flat_m.nonzero().flatten()
    if n > idx.numel():
        raise ValueError(f"cannot prune {n} of {idx.numel()} remaining weights")
    # stable sort: equal scores keep their order, so the choice is deterministic
    order = torch.sort(flat_s[idx], stable=True).indices[:n]
    new = flat_m.clone()
    new[idx[order]] = False
    out, start = {}, 0
    for k in names:
        size = masks[k].numel()
        out[k] = new[start:start + size].view_as(masks[k])
        start += size
    return out


@PRUNERS.register("global-magnitude")
def global_magnitude(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                     n: int, **_) -> Masks:
    """Prune the n smallest |w| over all layers together (one global threshold)."""
    return select_lowest({k: weights[k].abs() for k in masks}, masks, n)


@PRUNERS.register("layer-magnitude")
def layer_magnitude(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                    n: int, **_) -> Masks:
    """Prune the smallest |w| of each layer, each layer losing its share of n (the same rate
    per layer; rounding goes to the largest remainders so the total is exactly n)."""
    return _per_layer(lambda k: weights[k].abs(), masks, n)


@PRUNERS.register("random")
def uniform_random(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], n: int,
           generator: torch.Generator | None = None, **_) -> Masks:
    """Prune n kept weights chosen uniformly at random, the same rate in every layer."""
    return _per_layer(lambda k: torch.rand(masks[k].shape, generator=generator), masks, n)


def _per_layer(score: Callable[[str], torch.Tensor], masks: Mapping[str, torch.Tensor],
               n: int) -> Masks:
    counts = {k: int(m.sum()) for k, m in masks.items()}
    total = sum(counts.values())
    if n > total:
        raise ValueError(f"cannot prune {n} of {total} remaining weights")
    share = {k: n * c / max(total, 1) for k, c in counts.items()}
    take = {k: int(math.floor(v)) for k, v in share.items()}
    for k in sorted(share, key=lambda k: share[k] - take[k], reverse=True)[:n - sum(take.values())]:
        take[k] += 1
    return {k: select_lowest({k: score(k)}, {k: masks[k]}, take[k])[k] for k in masks}
