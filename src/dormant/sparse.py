"""Activation sparsity as speed: consumers that read only the active units.

With an exactly-sparse activation (ReLU, ReLU6, ReLU², shifted ReLU, soft threshold, CReLU,
CST) most units output exactly 0 for a token, so the layer reading them needs only the
columns of the active ones:

    y = sum over i with h_i != 0 of  h_i * W[:, i]   (+ bias)

exact up to the order of a float sum. `sparse_inference(model, ...)` makes every such site's
consumer (a Linear or transformers' Conv1D) compute that sum with
``F.embedding_bag(idx, W_t, per_sample_weights=h[idx])``, which reads the rows of the
transposed weight in place (``W[:, idx]`` would copy them first and lose); a single token's
active units go in two bags per thread, summed after, since embedding_bag reads one bag's
rows on one thread. The weight is kept in one layout only: a Linear's weight is re-laid out
as the transpose of a contiguous ``(units, out)`` tensor, and the dense path multiplies by
that view. Past a crossover in active units, measured per site at setup
(`max_active="auto"`), the dense product wins and is used. A gated MLP's up projection is
also computed only for units whose gate is open (the gate is computed first, as
Llama/Mistral/Qwen2 do): for one token in fp32/fp64 without autograd, the open rows' dot
products are taken in place (``torch.sparse.sampled_addmm`` over a CSR pattern of those
rows); otherwise the open rows are copied first. Nothing else changes: no second copy of any
weight, the same parameters, `remove()` restores the layout. Pure PyTorch.
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sites import Site, _unwrap, find_sites, is_conv1d

__all__ = ["EXACTLY_SPARSE", "SparseInference", "sparse_inference"]

EXACTLY_SPARSE = frozenset({"relu", "relu6", "relu_squared", "shifted_relu", "soft_threshold",
                            "crelu", "cst"})


@dataclass
class _Site:
    """One site's sparse consumer: the module, its weight as (units, out) rows, and the
    largest number of (token, active unit) pairs for which the gather beats dense."""
    name: str
    consumer: nn.Module
    rows: torch.Tensor
    max_pairs: float
    up: nn.Module | None = None
    calls: dict = field(default_factory=lambda: {"sparse": 0, "dense": 0})
    gate_open: list = field(default_factory=list)   # gated: (tokens, open units) of this call


class SparseInference:
    """The handle of `sparse_inference`: a context manager; `remove()` restores the model."""

    def __init__(self, sites: list[_Site], restore: list):
        self.sites = {s.name: s for s in sites}
        self._restore = restore

    def __enter__(self) -> "SparseInference":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """The original forwards and weight layouts back (idempotent)."""
        while self._restore:
            self._restore.pop()()

    def calls(self) -> dict[str, dict[str, int]]:
        """Per site: how many consumer calls took the sparse and the dense path."""
        return {n: dict(s.calls) for n, s in self.sites.items()}


def sparse_inference(model: nn.Module, example_input=None, *, sites: Sequence[Site] | None = None,
                     max_active: float | str = "auto", gated_up: bool = True) -> SparseInference:
    """Make every exactly-sparse MLP site of `model` compute its consumer over the active
    units only (see the module docstring); returns a handle (a context manager) whose
    ``remove()`` undoes it.

    example_input: a batch for site discovery (or pass `sites`). max_active: "auto" measures,
    per site at setup, the share of active units up to which the gather is faster than the
    dense product (one token; n tokens use the gather while n x active <= that count); a float
    in [0, 1] sets it (1.0: always sparse). gated_up: also compute a gated unit's up
    projection only where its gate is open.
    Sites with a smooth activation (GELU, SiLU: no exact zeros) or whose units are read by
    anything but one Linear/Conv1D are left dense, with a warning; none usable is an error.
    """
    model = _unwrap(model)
    if not (max_active == "auto" or (isinstance(max_active, (int, float))
                                     and 0 <= max_active <= 1)):
        raise ValueError(f"max_active must be 'auto' or a share in [0, 1], got {max_active!r}")
    if sites is None:
        if example_input is None:
            raise ValueError("sparse_inference needs example_input (a batch the model accepts) "
                             "or sites=...")
        sites = find_sites(model, example_input)
    usable, skipped = [], []
    for s in sites:
        why = _unusable(model, s)
        (skipped.append(f"{s.name} ({why})") if why else usable.append(s))
    if not usable:
        raise ValueError("sparse_inference: no site can skip inactive units: "
                         f"{'; '.join(skipped)}. It needs an exactly-sparse activation "
                         f"({', '.join(sorted(EXACTLY_SPARSE))}) read by one Linear layer")
    if skipped:
        warnings.warn(f"sparse_inference: left dense: {'; '.join(skipped)}", stacklevel=2)
    restore: list = []
    out = []
    acts = [s.act_module for s in usable if s.act_module]
    try:
        for s in usable:         # an activation module shared by several sites: no up skip
            alone = acts.count(s.act_module) == 1
            out.append(_install(model, s, max_active, gated_up and alone, restore))
    except BaseException:
        while restore:
            restore.pop()()
        raise
    return SparseInference(out, restore)


def _unusable(model: nn.Module, site: Site) -> str:
    """Why `site` cannot take the sparse path ('' when it can)."""
    if site.activation not in EXACTLY_SPARSE:
        return f"{site.activation} has no exact zeros"
    if site.slab is not None or site.flatten_consumers or len(site.consumers) != 1:
        return "not read by exactly one Linear layer"
    if not site.consumers_complete:
        return f"also read by {', '.join(site.readers) or 'an unknown operation'}"
    m = model.get_submodule(site.consumers[0])
    if not (isinstance(m, nn.Linear) or is_conv1d(m)):
        return f"its consumer is a {type(m).__name__}"
    return ""


def _install(model: nn.Module, site: Site, max_active, gated_up: bool, restore: list) -> _Site:
    consumer = model.get_submodule(site.consumers[0])
    weight = consumer.weight
    conv1d = is_conv1d(consumer)               # Conv1D stores (in, out): rows already
    rows = weight.data if conv1d else weight.data.t().contiguous()
    units = rows.shape[0]
    if max_active == "auto":
        pairs = _crossover(rows)
    else:                                      # 1.0: always sparse, whatever the tokens
        pairs = int(max_active * units) if max_active < 1 else float("inf")
    if pairs == 0:               # never faster here: the layer keeps its forward and layout
        return _Site(site.name, consumer, weight.data if conv1d else weight.data.t(), pairs)
    state = _Site(site.name, consumer, rows, pairs)
    if not conv1d:                             # Linear (out, in): laid out as (in, out)
        weight.data = rows.t()
        restore.append(lambda: setattr(weight, "data", weight.data.contiguous()))
    _patch(consumer, _sparse_forward(state), restore)
    if gated_up and site.gated and not site.fused and site.act_module:
        state.up = model.get_submodule(site.up)
        _gate_up(model.get_submodule(site.act_module), state.up, state.gate_open, restore)
    return state


def _patch(module: nn.Module, forward, restore: list) -> None:
    module.forward = forward
    restore.append(lambda: module.__dict__.pop("forward", None))


def _sparse_forward(state: _Site):
    consumer, rows = state.consumer, state.rows
    bias = consumer.bias

    def forward(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        n = flat.shape[0]
        opened = state.gate_open.pop() if state.gate_open else None
        if opened is not None and opened[0] == n:      # a gated unit is 0 where its gate is
            idx = opened[1]
        else:
            idx = _active(flat)
        if n * idx.numel() > state.max_pairs or idx.numel() == 0:
            state.calls["dense"] += 1
            y = flat @ rows
        else:
            state.calls["sparse"] += 1
            y = _gather(flat, idx, rows)
        if bias is not None:
            y = y + bias
        return y.reshape(*h.shape[:-1], y.shape[-1])
    return forward


def _gather(flat: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum over the active units i of flat[:, i] * rows[i], one bag per token; one token's
    units are split into two bags per thread (embedding_bag parallelises over bags: one bag
    reads its rows on one thread) and the bags summed."""
    n, k = flat.shape[0], idx.numel()
    bags = 2 * torch.get_num_threads()
    if n > 1 or bags < 4 or k < 32 * bags or rows.device.type != "cpu":
        return F.embedding_bag(idx.expand(n, -1), rows,
                               per_sample_weights=flat.index_select(1, idx), mode="sum")
    offsets = torch.arange(0, k, -(-k // bags), device=idx.device)
    y = F.embedding_bag(idx, rows, offsets, per_sample_weights=flat[0].index_select(0, idx),
                        mode="sum")
    return y.sum(0, keepdim=True)


def _active(flat: torch.Tensor) -> torch.Tensor:
    """The units (columns) active in any token (one token, decoding: its nonzeros)."""
    return (flat[0] if flat.shape[0] == 1 else flat.ne(0).any(0)).nonzero().flatten()


def _gate_up(act: nn.Module, up: nn.Module, open_units: list, restore: list) -> None:
    """The up projection computed only for units whose gate is open: the gate's activation
    (called first) leaves its open units in `open_units` for the up projection's next call
    and the down projection's (which pops them)."""
    def seen(module, inputs, output):
        flat = output.reshape(-1, output.shape[-1])
        open_units[:] = [(flat.shape[0], _active(flat))]

    _quiet_csr()
    handle = act.register_forward_hook(seen)
    restore.append(handle.remove)
    weight, bias = up.weight, up.bias
    dense = type(up).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        pending = open_units[0] if open_units else None
        flat = x.reshape(-1, x.shape[-1])
        if pending is None or pending[0] != flat.shape[0] or \
                pending[1].numel() * 2 > weight.shape[0]:
            return dense(up, x)
        sub = _rows_times(weight, bias, pending[1], flat)
        out = flat.new_zeros(flat.shape[0], weight.shape[0]).index_copy_(1, pending[1], sub)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    _patch(up, forward, restore)


_SAMPLED = (torch.float32, torch.float64)


def _rows_times(weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor,
                flat: torch.Tensor) -> torch.Tensor:
    """flat @ weight[idx].T (+ bias[idx]), idx ascending (as nonzero() gives it: the CSR
    pattern's values follow its rows). One token on the CPU without autograd: the dot
    products of the selected rows in place, by `torch.sparse.sampled_addmm` over a CSR
    pattern holding those rows (fp32/fp64 only); otherwise the rows are copied first."""
    k = idx.numel()
    if flat.shape[0] != 1 or flat.dtype not in _SAMPLED or flat.device.type != "cpu" or \
            (torch.is_grad_enabled() and (weight.requires_grad or flat.requires_grad)):
        return F.linear(flat, weight.index_select(0, idx),
                        bias.index_select(0, idx) if bias is not None else None)
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64)
    crow[idx + 1] = 1
    start = bias.index_select(0, idx) if bias is not None else flat.new_zeros(k)
    pattern = torch.sparse_csr_tensor(crow.cumsum_(0), torch.zeros(k, dtype=torch.int64),
                                      start, (weight.shape[0], 1), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, weight, flat.t()).values()[None]


@functools.cache
def _quiet_csr() -> None:
    """torch warns once per process that sparse CSR tensors are in beta: spent here, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), (1, 1))


@torch.no_grad()
def _crossover(rows: torch.Tensor, reps: int = 5) -> int:
    """The largest number of active units (one token) for which the sparse path -- finding
    the active units included -- is faster than the dense product with this weight, measured
    on it (0: always dense, e.g. where the layer is too small to gain)."""
    units = rows.shape[0]
    sync = torch.cuda.synchronize if rows.device.type == "cuda" else (lambda: None)

    def clock(fn) -> float:
        fn()
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    def sparse(h):
        return _gather(h, h[0].nonzero().flatten(), rows)

    g = torch.Generator().manual_seed(0)
    best = 0
    for share in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
        k = max(1, int(share * units))
        h = torch.zeros(1, units, dtype=rows.dtype, device=rows.device)
        h[0, torch.randperm(units, generator=g)[:k].to(rows.device)] = 1.0
        if clock(lambda h=h: sparse(h)) < clock(lambda h=h: h @ rows):
            best = k
        else:
            break
    return best
