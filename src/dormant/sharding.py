"""Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds a
`DTensor` whose local part is a block of whole rows (dim 0). What reads parameters outside
a forward (the plasticity metrics, the distance from the initial weights) reads each rank's
local rows and sums over the shard group; nothing here imports `torch.distributed.tensor`
unless a process group is up.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["group_of", "is_sharded", "local", "ready", "resharded", "sharded_parameters",
           "sum_rows"]


def _dtensor() -> type | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter outside its forward)."""
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (its rows), the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters FSDP2 shards."""
    return [n for n, p in resharded(model).named_parameters() if is_sharded(p)]


def resharded(model: nn.Module) -> nn.Module:
    """Every FSDP2 module's parameters back in their sharded form (the root keeps its own
    unsharded after a forward, FSDP2's default), so that each is read as this rank's rows;
    a no-op for any other model, and outside a forward/backward."""
    for m in model.modules():
        if callable(getattr(m, "_get_fsdp_state", None)) and callable(getattr(m, "reshard", None)):
            m.reshard()
    return model


def sum_rows(values) -> torch.Tensor:
    """The sum of ``(tensor, value)`` pairs, each value (a float64 scalar) computed on this
    rank's rows of its tensor: those of sharded tensors summed over the shard group (on their
    device: an NCCL group reduces CUDA tensors only), the others counted once. A float64
    scalar on the host; every rank of the group must call it with the same tensors."""
    whole = torch.zeros((), dtype=torch.float64)
    rows, group = None, None
    for t, value in values:
        if is_sharded(t):
            group = group_of(t)
            rows = value if rows is None else rows + value.to(rows.device)
        else:
            whole = whole + value.cpu()
    if rows is not None:
        dist.all_reduce(rows, group=group)
        whole = whole + rows.cpu()
    return whole


def group_of(t: torch.Tensor):
    """The process group a sharded tensor is spread over (None for a plain tensor): FSDP2's
    one-dimensional mesh with rows sharded; other layouts (HSDP, tensor parallelism) are
    refused by name."""
    if not is_sharded(t):
        return None
    from torch.distributed.tensor import Shard
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"dormant: a parameter is laid out as {placements} on a {mesh.ndim}-D "
                         "mesh; dormant reads FSDP2's row shards (Shard(0) on a 1-D mesh) only")
    return mesh.get_group()


def ready(model: nn.Module) -> nn.Module:
    """An FSDP2 root initialises itself at the first forward through it, and refuses to if
    one of its sharded submodules ran first: site discovery runs submodules on their own, so
    the root is initialised here, before anything runs (a no-op for any other model)."""
    state = getattr(model, "_get_fsdp_state", None)
    if callable(state):
        state()._lazy_init()
    return model
