"""Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds a
`DTensor` whose local part is a block of whole rows (dim 0, `torch.chunk`'s split).

What reads parameters outside a forward (the plasticity metrics, the distance from the
initial weights) reads each rank's local rows and sums over the shard group (`sum_rows`).
Elementwise rules (Shrink & Perturb, L2 Init, masks) act on each rank's rows of the full
tensors they combine (`rows`). Rules that read or rewrite whole units or whole layers
(ReDo, Synaptic Stripping, Continual Backprop, the pruners' decisions) run inside
`gathered`: the tensors they touch are full plain parameters there, with their optimizer
state, every rank computes on the same full tensors with the same random draws as one
process, and each rank keeps its own rows of the result. Nothing here imports
`torch.distributed.tensor` unless a process group is up.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["close_group", "full", "full_state", "gathered", "gathered_state", "group_of", "is_fsdp",
           "is_sharded", "load_full_state", "local", "plain_copy", "ready", "resharded",
           "row_range", "rows", "shard", "sharded_like", "sharded_parameters", "sum_rows",
           "whole_rows"]


def close_group() -> None:
    """After work that ended well on every rank: wait for the others, then destroy the
    process group (if one is open). Left to the interpreter's exit, gloo under FSDP2
    (torch 2.13) sometimes aborts the process: "terminate called without an active
    exception", about 1 run in 4 here."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor on every rank (a collective: every rank of its group
    calls it), the tensor itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def row_range(t: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of the whole tensor that this rank holds of a sharded `t`
    (`torch.chunk`'s split, which FSDP2 uses); all rows for a plain tensor."""
    n = t.shape[0] if t.ndim else 1
    if not is_sharded(t):
        return 0, n
    group = group_of(t)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    if stop - start != t.to_local().shape[0]:
        raise ValueError(f"dormant: a sharded tensor of {n} rows holds {t.to_local().shape[0]} "
                         f"on rank {rank} of {world}, not torch.chunk's {stop - start}")
    return start, stop


def rows(t: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `whole`, a tensor shaped like the whole of `t` (a view; `whole`
    itself when `t` is not sharded)."""
    if not is_sharded(t):
        return whole
    start, stop = row_range(t)
    return whole[start:stop]


def whole_rows(t: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which `mine` holds this rank's rows, laid out as the sharded `t`
    (a collective); `mine` itself when `t` is not sharded."""
    return _as_shard(t, mine).full_tensor() if is_sharded(t) else mine


def _as_shard(t: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """`mine`, this rank's rows, as a DTensor laid out like the sharded `t`."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(mine.to(device=local(t).device), t.device_mesh, t.placements,
                              shape=t.shape, stride=t.stride())


def is_fsdp(model: nn.Module) -> bool:
    """True when `fully_shard` wrapped `model` or one of its submodules."""
    return any(callable(getattr(m, "_get_fsdp_state", None)) for m in model.modules())


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


def _owners(model: nn.Module, names: Iterable[str] | None):
    """(module, attribute, parameter) of every sharded parameter of `model` (of `names` only,
    when given), each owner of a tied parameter listed."""
    wanted = None if names is None else set(names)
    by_id: dict[int, set[str]] = {}           # a tied parameter answers to each of its names
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(n)
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None and is_sharded(p) and (wanted is None
                                                    or by_id.get(id(p), set()) & wanted):
                yield m, attr, p


@contextlib.contextmanager
def gathered(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             names: Iterable[str] | None = None) -> Iterator[nn.Module]:
    """Inside the block, the sharded parameters of `model` (those named in `names`, or all)
    are full plain parameters on every rank, with their optimizer state (SGD momentum, Adam's
    moments) as full tensors keyed by them when `optimizer` is given (a block that only
    reads passes none); whatever the block edits in place, each rank then keeps its own rows
    of (parameters and state alike). A plain model is left as it is. The block must not run
    the model (FSDP2 would put its own tensors back). An exception inside it leaves the
    shards and their per-entry optimizer state as they were (a mask updated inside stays).
    Memory: the gathered tensors and their state, on every rank."""
    if not is_fsdp(model):
        yield model
        return
    resharded(model)
    swapped: dict[int, tuple[torch.Tensor, nn.Parameter, int]] = {}
    places = []
    for m, attr, p in list(_owners(model, names)):
        if id(p) not in swapped:
            whole = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
            swapped[id(p)] = (p, whole, whole._version)
            state = optimizer.state.get(p) if optimizer is not None else None
            if state:
                optimizer.state[whole] = {k: full(v) for k, v in state.items()}
        places.append((m, attr, p))
        m._parameters[attr] = swapped[id(p)][1]
    ok = False
    try:
        yield model
        ok = True
    finally:
        for m, attr, p in places:
            m._parameters[attr] = p
        for p, whole, version in swapped.values():
            state = optimizer.state.pop(whole, None) if optimizer is not None else None
            if not ok:
                continue
            with torch.no_grad():
                if whole._version != version:
                    local(p).copy_(rows(p, whole.detach()))
                for k, v in (state or {}).items():
                    mine = optimizer.state.get(p, {}).get(k)
                    if is_sharded(mine) and torch.is_tensor(v) and v.shape == p.shape:
                        local(mine).copy_(rows(p, v))


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` (FSDP2 refuses ``copy.deepcopy``): the module classes as
    they were before `fully_shard`, every parameter and buffer a full plain tensor; for
    re-initialising a layer the way one process would (``reset_parameters`` on the copy)."""
    if not is_fsdp(module):
        return copy.deepcopy(module)
    from torch.distributed.fsdp import FSDPModule
    memo: dict[int, torch.Tensor] = {}        # a tied parameter stays tied in the copy

    def whole(t: torch.Tensor | None, param: bool) -> torch.Tensor | None:
        if t is not None and id(t) not in memo:
            c = full(t.detach()).clone()
            memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if param else c
        return None if t is None else memo[id(t)]

    def clone(m: nn.Module) -> nn.Module:
        cls = next(k for k in type(m).__mro__ if not issubclass(k, FSDPModule))
        c = object.__new__(cls)
        c.__dict__ = dict(m.__dict__)
        c._parameters = {k: whole(p, True) for k, p in m._parameters.items()}
        c._buffers = {k: whole(b, False) for k, b in m._buffers.items()}
        c._modules = {k: None if s is None else clone(s) for k, s in m._modules.items()}
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            if attr in c.__dict__:
                c.__dict__[attr] = type(c.__dict__[attr])()
        return c

    return clone(resharded(module))


def shard(model: nn.Module) -> nn.Module:
    """`fully_shard` every Linear/Conv layer of `model`, then the root (which takes the rest:
    norms, embeddings, a layer with a tied weight, an ``nn.MultiheadAttention``, whose
    forward reads its projections' weights itself), on a one-dimensional mesh over the whole
    process group. The model's
    parameters are DTensors afterwards: build the optimizer after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("dormant: sharding with FSDP2 needs a process group (run under "
                           "torchrun)")
    p = next(model.parameters())
    mesh = init_device_mesh(p.device.type, (dist.get_world_size(),))
    attention = {id(s) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                 for s in m.modules()}
    owners: dict[int, int] = {}          # a tied weight (an LM head) stays with the root
    for m in model.modules():
        for q in m._parameters.values():
            if q is not None:
                owners[id(q)] = owners.get(id(q), 0) + 1
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for m in model.modules():
        tied = any(owners[id(q)] > 1 for q in m._parameters.values() if q is not None)
        if m is not model and isinstance(m, layers) and id(m) not in attention and not tied:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return ready(model)


def gathered_state(obj):
    """`obj` (nested dicts, lists and tuples, e.g. a method's or a session's state) with every
    sharded tensor replaced by its whole, on the host: a state any rank, and any number of
    ranks, can load. A collective when `obj` holds sharded tensors (every rank calls it)."""
    if is_sharded(obj):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: gathered_state(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(gathered_state(v) for v in obj)
    return obj


def sharded_like(model: nn.Module, state: dict | None) -> dict | None:
    """A state keyed by `model`'s parameter names (a state dict, initial weights) with each
    whole tensor of a sharded parameter turned into that parameter's layout: a DTensor of this
    rank's rows (what `gathered_state` undoes). Other entries are kept as they are."""
    if state is None or not is_fsdp(model):
        return state
    params = dict(resharded(model).named_parameters(remove_duplicate=False))   # tied: each name
    out = {}
    for k, v in state.items():
        p = params.get(k)
        if (p is not None and is_sharded(p) and torch.is_tensor(v) and not is_sharded(v)
                and v.shape == p.shape):
            v = _as_shard(p, rows(p, v).to(dtype=p.dtype).clone())
        out[k] = v
    return out


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[dict, dict | None]:
    """(model state, optimizer state) of an FSDP2 model with whole tensors on the host, for a
    checkpoint any number of ranks can load (`load_full_state`); the optimizer's state is
    keyed by parameter names. A collective: every rank calls it, rank 0 gets the state (the
    others empty dicts), gathered one tensor at a time onto the host."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(resharded(model), options=options)
    if optimizer is None:
        return model_state, None
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    model_state: dict, optim_state: dict | None) -> None:
    """Load what `full_state` returned into an FSDP2 model and its optimizer (every rank
    takes its rows)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(resharded(model), model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
