"""Activation sparsity as speed: consumers that read only the active units.

With an exactly-sparse activation (ReLU, ReLU6, ReLU², shifted ReLU, soft threshold, CReLU,
CST) most units output exactly 0 for a token, so the layer reading them needs only the
columns of the active ones:

    y = sum over i with h_i != 0 of  h_i * W[:, i]   (+ bias)

exact up to the order of a float sum. `sparse_inference(model, ...)` makes every such site's
consumer (a Linear or transformers' Conv1D) compute that sum with
``F.embedding_bag(idx, W_t, per_sample_weights=h[idx])``, which reads the rows of the
transposed weight in place (``W[:, idx]`` would copy them first and lose). Several tokens
take one bag each, over their own active units (not the union of the tokens'); a single
token's active units go in two bags per thread, summed after, since embedding_bag reads one
bag's rows on one thread. The weight is kept in one layout only: a Linear's weight is re-laid
out as the transpose of a contiguous ``(units, out)`` tensor, and the dense path multiplies
by that view. Past a crossover in (token, active unit) pairs, measured per site at setup
(`max_active="auto"`), the dense product wins and is used. A gated MLP's up projection is
also computed only where the gate is open (the gate is computed first, as
Llama/Mistral/Qwen2 do): on the CPU in fp32/fp64 without autograd, the dot products of the
open (unit, token) pairs are taken in place (``torch.sparse.sampled_addmm`` over a CSR pattern of
them); otherwise the rows of the units open in any token are copied first. Nothing else
changes: no second copy of any weight, the same parameters, `remove()` restores the layout.
Pure PyTorch.
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


_BATCHES = (1, 4, 16)      # token counts at which "auto" times the dense product
_FLAT = ((1, 1.0),)        # a crossover that does not grow with the tokens


@dataclass
class _Site:
    """One site's sparse consumer: the module and the largest number of (token, active unit)
    pairs for which the gather beats dense: `max_pairs` at one token, times the dense
    product's cost at n tokens over its cost at one (`scale`: (n, factor) pairs, ascending; a
    batch of tokens costs the dense product more, the gather only per pair)."""
    name: str
    consumer: nn.Module
    max_pairs: float
    scale: tuple = _FLAT
    up: nn.Module | None = None
    calls: dict = field(default_factory=lambda: {"sparse": 0, "dense": 0})
    gate_open: list = field(default_factory=list)   # gated: the _Open of this call

    def limit(self, tokens: int) -> float:
        """The most (token, active unit) pairs the sparse path takes for `tokens` tokens."""
        factor = next((f for n, f in reversed(self.scale) if n <= tokens), 1.0)
        return self.max_pairs * factor


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
    per site at setup, the number of active units up to which the gather is faster than the
    dense product at one token, and the dense product's cost at 4 and 16 tokens; n tokens use
    the gather while their (token, active unit) pairs stay under that count times the dense
    cost at the largest of 1, 4, 16 tokens not above n over its cost at one. A float in
    [0, 1] sets the count as a share of the units, for any number of tokens (1.0: always
    sparse). gated_up: also compute a gated unit's up projection only where its gate is open.
    Gradients flow as through the dense layers (the consumer's own parameter is read); under
    autocast the gather runs in the weight's dtype and returns the autocast dtype.
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
        pairs, scale = _crossover(rows)
    else:                                      # 1.0: always sparse, whatever the tokens
        pairs, scale = int(max_active * units) if max_active < 1 else float("inf"), _FLAT
    if pairs == 0:               # never faster here: the layer keeps its forward and layout
        return _Site(site.name, consumer, pairs)
    state = _Site(site.name, consumer, pairs, scale)
    if not conv1d:                             # Linear (out, in): laid out as (in, out)
        weight.data = rows.t()
        restore.append(lambda: setattr(weight, "data", weight.data.contiguous()))
    _patch(consumer, _sparse_forward(state), restore)
    if gated_up and site.gated and not site.fused and site.act_module:
        state.up = model.get_submodule(site.up)
        _gate_up(model.get_submodule(site.act_module), state, restore)
    return state


def _patch(module: nn.Module, forward, restore: list) -> None:
    module.forward = forward
    restore.append(lambda: module.__dict__.pop("forward", None))


def _sparse_forward(state: _Site):
    consumer = state.consumer
    weight, bias, conv1d = consumer.weight, consumer.bias, is_conv1d(consumer)

    def forward(h: torch.Tensor) -> torch.Tensor:
        rows = weight if conv1d else weight.t()    # the parameter itself: autograd reaches it
        flat = h.reshape(-1, h.shape[-1])
        cast = _autocast(flat, rows)
        if cast:                # autocast: gathered in the weight's dtype, returned in its own
            flat = flat.to(rows.dtype)
        n = flat.shape[0]
        opened = state.gate_open.pop() if state.gate_open else None
        if n == 1:              # one token: its active units (a gated unit is 0 where its
            idx = opened.pairs()[0] if opened is not None and opened.n == 1 else _active(flat)
            pairs = idx.numel()                                    # gate is shut)
        else:                   # several: each token's own active units, token by token
            tokens, idx = flat.nonzero(as_tuple=True)
            pairs = idx.numel()
        if pairs == 0 or pairs > state.limit(n):
            state.calls["dense"] += 1
            y = flat @ rows
        else:
            state.calls["sparse"] += 1
            y = _gather(flat, idx, rows) if n == 1 else _gather_pairs(flat, tokens, idx, rows)
        if bias is not None:
            y = y + bias
        if cast:
            y = y.to(cast)
        return y.reshape(*h.shape[:-1], y.shape[-1])
    return forward


def _gather(flat: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One token: the sum over its active units i of flat[0, i] * rows[i]. The units are split
    into two bags per thread (embedding_bag parallelises over bags: one bag reads its rows on
    one thread) and the bags summed."""
    k = idx.numel()
    bags = 2 * torch.get_num_threads()
    weights = flat[0].index_select(0, idx)
    if bags < 4 or k < 32 * bags or rows.device.type != "cpu":
        return F.embedding_bag(idx[None], rows, per_sample_weights=weights[None], mode="sum")
    offsets = torch.arange(0, k, -(-k // bags), device=idx.device)
    y = F.embedding_bag(idx, rows, offsets, per_sample_weights=weights, mode="sum")
    return y.sum(0, keepdim=True)


def _gather_pairs(flat: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor,
                  rows: torch.Tensor) -> torch.Tensor:
    """Several tokens: one bag per token over its own active units (`tokens`, `idx`: the
    nonzeros of `flat`, token by token), so a token reads only its rows -- not those of the
    union of the tokens' active units."""
    counts = torch.bincount(tokens, minlength=flat.shape[0])
    return F.embedding_bag(idx, rows, counts.cumsum(0) - counts,
                           per_sample_weights=flat[tokens, idx], mode="sum")


def _active(flat: torch.Tensor) -> torch.Tensor:
    """One token's active units (the nonzeros of its row), ascending."""
    return flat[0].nonzero().flatten()


class _Open:
    """A gate's activation output, left by its hook for the same call's up projection and
    down projection; what they need of it is found once, when first asked."""

    def __init__(self, flat: torch.Tensor):
        self.flat, self.n = flat, flat.shape[0]
        self._pairs: tuple | None = None

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit, token) of every open gate, unit by unit (a CSR pattern's order)."""
        if self._pairs is None:
            if self.n == 1:
                units = _active(self.flat)
                self._pairs = (units, torch.zeros_like(units))
            else:
                self._pairs = self.flat.t().nonzero(as_tuple=True)
        return self._pairs


def _gate_up(act: nn.Module, state: _Site, restore: list) -> None:
    """The up projection computed only where the gate is open: the gate's activation (called
    first) leaves its output in `state.gate_open` for the up projection's next call and the
    down projection's (which pops it). Past the site's crossover the up projection is dense."""
    up, open_units = state.up, state.gate_open

    def seen(module, inputs, output):
        open_units[:] = [_Open(output.reshape(-1, output.shape[-1]))]

    _quiet_csr()
    handle = act.register_forward_hook(seen)
    restore.append(handle.remove)
    weight, bias = up.weight, up.bias
    dense = type(up).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        opened = open_units[0] if open_units else None
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if opened is None or opened.n != n or n == 0:
            return dense(up, x)
        unit, token = opened.pairs()
        if unit.numel() > state.limit(n):
            return dense(up, x)
        out = _rows_times(weight, bias, unit, token, flat)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    _patch(up, forward, restore)


_SAMPLED = (torch.float32, torch.float64)


def _rows_times(weight: torch.Tensor, bias: torch.Tensor | None, unit: torch.Tensor,
                token: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """flat @ weight.T (+ bias) at the (token, unit) pairs given unit by unit, zero elsewhere.
    On the CPU in fp32/fp64 without autograd, only those pairs' dot products are taken, reading
    the rows in place (`torch.sparse.sampled_addmm` over a CSR pattern of the pairs: row =
    unit, column = token); otherwise the rows of the units open in any token are copied
    first."""
    n, units = flat.shape[0], weight.shape[0]
    if flat.dtype not in _SAMPLED or flat.device.type != "cpu" or _autocast(flat, weight) or \
            (torch.is_grad_enabled() and (weight.requires_grad or flat.requires_grad)):
        idx = unit if n == 1 else unit.unique()
        sub = F.linear(flat, weight.index_select(0, idx),
                       bias.index_select(0, idx) if bias is not None else None)
        return sub.new_zeros(n, units).index_copy_(1, idx, sub)
    out = flat.new_zeros(n, units)
    crow = torch._convert_indices_from_coo_to_csr(unit, units)   # one op (sorted rows)
    start = bias.index_select(0, unit) if bias is not None else flat.new_zeros(unit.numel())
    pattern = torch.sparse_csr_tensor(crow, token, start, (units, n), check_invariants=False)
    values = torch.sparse.sampled_addmm(pattern, weight, flat.t()).values()
    if n == 1:
        return out.index_copy_(1, unit, values[None])
    return out.view(-1).index_copy_(0, token * units + unit, values).view(n, units)


def _autocast(flat: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a Linear would return under the active autocast (None: not autocasting;
    autocast leaves fp64 alone)."""
    dev = flat.device.type
    if weight.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


@functools.cache
def _quiet_csr() -> None:
    """torch warns once per process that sparse CSR tensors are in beta: spent here, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), (1, 1))


@torch.no_grad()
def _crossover(rows: torch.Tensor, reps: int = 5) -> tuple[int, tuple]:
    """The largest number of active units (one token) for which the sparse path -- finding
    the active units included -- is faster than the dense product with this weight, measured
    on it (0: always dense, e.g. where the layer is too small to gain); and the dense
    product's cost at each of `_BATCHES` tokens over its cost at one (>= 1)."""
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
        return _gather(h, _active(h), rows)

    batches = {n: torch.ones(n, units, dtype=rows.dtype, device=rows.device) for n in _BATCHES}
    dense = {n: clock(lambda h=h: h @ rows) for n, h in batches.items()}
    g = torch.Generator().manual_seed(0)
    best = 0
    for share in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
        k = max(1, int(share * units))
        h = torch.zeros(1, units, dtype=rows.dtype, device=rows.device)
        h[0, torch.randperm(units, generator=g)[:k].to(rows.device)] = 1.0
        if clock(lambda h=h: sparse(h)) < dense[1]:
            best = k
        else:
            break
    if best == 0:
        return 0, _FLAT
    return best, tuple((n, max(1.0, dense[n] / dense[1])) for n in _BATCHES)
