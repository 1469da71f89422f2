"""ActivityMonitor: streaming per-unit activity counters (what "dead" means: `dormant.criteria`).

The monitor observes each site's activation output through its taps (`dormant.taps`)
and accumulates, on the device of the activations and without any host sync:

    positions       outputs seen per unit (batch x tokens x spatial positions)
    samples/batches samples and batches seen
    active[u]       outputs  > eps
    zeros[u]        outputs == 0 exactly (activation sparsity, dynamic DNR)
                    (counted as positions - nonzero)
    silent[u]       samples in which every output of the unit was <= eps
    active_batches  batches in which the unit was active at least once
    sum/abs_sum[u]  sum of outputs / of |outputs| (float64)
    max[u]          largest output (only with ``track_max=True``: one more pass over each
                    activation, which nothing in dormant needs)

Counts come from ``sign()`` and float sums, not from comparisons and boolean reductions
(which are several times slower on CPU): for an output y, #(y > 0) = sum max(sign(y), 0) and,
with eps == 0, #(y != 0) = 2 #(y > 0) - sum sign(y) and sum |y| = 2 sum max(y, 0) - sum y
(no abs() pass; the two combinations are made when pending steps are summed in); for
non-negative activations (ReLU family) #(y > 0) = sum sign(y) and |y| = y. Active counts
are first reduced to per-sample ``(N, units)`` sums, which keeps conv and token tensors cheap
and gives the per-sample "silent" count. A step's per-unit results wait in a short list and
are summed into the counters every 32 steps and whenever the counters are read (one stacked
sum instead of several small updates per step). Small CPU outputs of one position per sample
(an MLP's (batch, units)) are counted on one thread: for them, waking the OpenMP team costs
more than the reductions.

Training-time cost: hooks are attached only on watched steps. With ``every_steps=k`` and a call of
`step()` after each optimizer step, the monitor attaches its hooks for every k-th step and
removes them otherwise, so unwatched steps pay nothing (a registered hook alone costs a few
percent on small models). Rates from a sampled monitor are unbiased estimates over the
training batches; a "never active" decision needs every sample, so decisions that act on a
model should come from an exact probe pass (``every_steps=1``, e.g. `diagnose`).
"""
from __future__ import annotations

import warnings
from functools import cache
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .criteria import CRITERIA, SiteStats, always_zero, register_criterion  # noqa: F401
from .sites import Site, _unwrap, find_sites
from .taps import MODES, SiteTaps

__all__ = ["ActivityMonitor", "SiteStats", "CRITERIA", "register_criterion"]

# Per-unit accumulators, all float64 on the activations' device: integer counts stay exact
# below 2**53 and one all-reduce sums them all. `nonzero` and `abs_sum` are not accumulated
# for non-negative activations with eps == 0 (they equal `active` and `sum` there), `silent`
# not for outputs with one position per sample (it is `samples - active` there).
_FIELDS = ("active", "nonzero", "silent", "active_batches", "sum", "abs_sum")
_COUNT_FIELDS = ("positions", "samples", "batches")
# what one watched step leaves per unit until `_flush` sums it in (active_batches is counted
# from the pending `active`)
# (a signed site with eps == 0 leaves `sign_sum` and `relu_sum` instead of `nonzero` and
# `abs_sum`, see the module's docstring)
_PENDING_FIELDS = ("active", "nonzero", "silent", "sum", "abs_sum", "sign_sum", "relu_sum")
FLUSH_EVERY = 32
# A CPU output with one position per sample (batch, units) smaller than this is counted on
# one thread: waking the OpenMP team for its batch reductions costs more than it saves
# (2-core CPU: 16 vs 30 us for a (128, 300) ReLU output, 41 vs 54 us at 2**17 elements).
# Outputs with positions (tokens, pixels) keep every thread: their per-sample reductions
# split well (a (128, 17, 64) token output: 90 us on 2 threads, 122 us on one).
SERIAL_NUMEL = 2 ** 17


class _Plan(NamedTuple):
    """How one site counts an output of one shape (cached per site and shape)."""
    d: int                      # the unit dim
    inner: tuple[int, ...]      # other dims but the batch: positions within a sample
    per_unit: int               # outputs per unit in one batch
    acc: torch.dtype            # dtype of per-step sums (exact integers)
    serial: bool                # count on one CPU thread
    fast: bool                  # non-negative outputs, eps 0 (see `ActivityMonitor._fast`)


@cache
def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _every_steps(owner: str, every: int | None, every_steps: int | None, default: int) -> int:
    """`every_steps` (its default when None); `every`, its old name, still accepted with a
    warning, and refused when it contradicts an `every_steps` also given."""
    if every is None:
        return default if every_steps is None else every_steps
    if every_steps is not None and every_steps != every:
        raise ValueError(f"{owner}: every={every} and every_steps={every_steps} disagree; "
                         "every is the old name of every_steps: give every_steps only")
    warnings.warn(f"{owner}: every=... is now every_steps=... (it counts training steps; a "
                  "method's every counts epochs)", FutureWarning, stacklevel=3)
    return every


# ----------------------------------------------------------------------------------------
def _fast_stats(y: torch.Tensor, inner: tuple[int, ...], d: int, acc: torch.dtype,
                with_max: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Non-negative outputs, eps 0: (active positions per sample and unit, or per unit when a
    sample has one position; sum per unit; max per unit, or None without `with_max`). Pure
    tensor code, so that torch.compile can fuse it into one pass over `y`."""
    if not inner:
        return (y.sign().sum(0, dtype=acc), y.sum(0, dtype=acc),
                y.amax(0) if with_max else None)
    active_ps = y.sign().sum(inner, dtype=acc)                       # (N, units)
    return (active_ps, y.sum((0, *inner), dtype=acc),
            _unit_max(y, d) if with_max else None)


def _unit_max(y: torch.Tensor, d: int) -> torch.Tensor:
    """Max per unit (dim `d`) over every other dim."""
    mx = y.amax(0)                                                    # batch first: fast
    return mx.movedim(d - 1, 0).flatten(1).amax(1) if mx.ndim > 1 else mx


class ActivityMonitor:
    """Per-unit activity counters for every site of a model.

    Use as a context manager; hooks are attached on entry and always removed on exit::

        with ActivityMonitor(model, example_input=x[:2]) as mon:
            model(x)
        mon.dead_units()          # {site: BoolTensor[num_units]}

    Args:
        model: the network (hooks go on its modules; nothing else is changed).
        sites: Site objects; default: `find_sites(model, example_input)`.
        example_input: a small batch, needed when `sites` is not given.
        eps: an output counts as active when > eps.
        every_steps: watch every k-th training step (see `step`); 1 = every forward. (Methods'
            ``every`` counts epochs; a monitor counts steps, hence the name; ``every=`` is
            still accepted, with a warning.)
        mode: ``"train"``, ``"eval"`` or ``"any"``: which forwards to count.
        fused: count non-negative sites (ReLU & co. with eps 0) with one compiled kernel
            (``torch.compile``): one pass over each activation instead of four, for the exact
            mode (``every_steps=1``) on large activations. The first watched step compiles (about a
            minute on a CPU, a new batch shape a few seconds); the counts are the same. True
            uses inductor; a string names another ``torch.compile`` backend.
        track_max: also keep each unit's largest output (`SiteStats.max`; None without it).
            Off by default: it is one more pass over every activation and no criterion or
            method of dormant reads it.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site] | None = None, *,
                 example_input=None, eps: float = 0.0, every_steps: int | None = None,
                 mode: str = "any", fused: bool | str = False, track_max: bool = False,
                 every: int | None = None):
        every_steps = _every_steps("ActivityMonitor", every, every_steps, 1)
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'train', 'eval' or 'any', got {mode!r}")
        if not eps >= 0 or eps == float("inf"):       # nan fails every comparison
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        self.model = _unwrap(model)
        if sites is None:
            if example_input is None:
                raise ValueError("ActivityMonitor needs `sites` or an `example_input` to find them")
            sites = find_sites(self.model, example_input)
        self.sites: dict[str, Site] = {s.name: s for s in sites}
        if len(self.sites) != len(sites):
            raise ValueError("site names must be unique")
        self.eps, self.every_steps, self.mode = float(eps), int(every_steps), mode
        self.fused, self.track_max = fused, bool(track_max)
        self._compiled: Callable | None = None
        self.taps = SiteTaps(self.model, list(self.sites.values()), self.observe, mode=mode)
        self._entered = False
        self._step = 0
        self._counters: dict[str, dict] = {}
        self._pending: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._plans: dict[str, dict[torch.Size, _Plan]] = {n: {} for n in self.sites}
        self.reset()

    # -- counters ------------------------------------------------------------------------
    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def reset(self) -> None:
        """Zero every counter (keeps hooks as they are)."""
        dev = self._device()
        for name, s in self.sites.items():
            u = s.num_units
            c: dict = {f: torch.zeros(u, dtype=torch.float64, device=dev) for f in _FIELDS}
            c["max"] = torch.full((u,), float("-inf"), device=dev)
            c.update({f: 0 for f in _COUNT_FIELDS})
            self._counters[name] = c
            self._pending[name] = {f: [] for f in _PENDING_FIELDS}

    def _fast(self, site: Site) -> bool:
        """Non-negative outputs and eps == 0: active == nonzero and |y| == y."""
        return self.eps == 0.0 and site.observes_nonneg

    def _plan(self, site: Site, y: torch.Tensor) -> _Plan:
        d = site.unit_dim % y.ndim
        per_unit = y.numel() // site.num_units
        inner = tuple(i for i in range(1, y.ndim) if i != d)
        return _Plan(d, inner, per_unit, torch.float32 if per_unit < 2 ** 24 else torch.float64,
                     not inner and y.device.type == "cpu" and y.numel() < SERIAL_NUMEL
                     and _openmp(), self._fast(site))

    def observe(self, site: Site, y: torch.Tensor) -> None:
        """Count one activation output of `site` (what the taps call; public for callers that
        already hold the output)."""
        # Runs inside the forward: device ops only, no .item(), no branching on values; on
        # `y.detach()`, so nothing joins the autograd graph (no no_grad context: entering one
        # costs as much as a small reduction). Each step's per-unit vectors wait in
        # `_pending` and are summed into the counters by `_flush` (every FLUSH_EVERY steps and
        # before anything reads them): one stacked sum instead of an add, a comparison and
        # another add per counter and step.
        y = y.detach()
        if y.ndim == 1:
            y = y.unsqueeze(0)
        name = site.name
        plans = self._plans[name]
        plan = plans.get(y.shape)
        if plan is None:
            if len(plans) >= 64:        # many shapes (e.g. padded to each batch's length)
                plans.clear()
            plan = plans[y.shape] = self._plan(site, y)
        threads = torch.get_num_threads() if plan.serial else 1
        if threads > 1:
            torch.set_num_threads(1)
        try:
            self._count(site, y, plan)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        c = self._counters[name]
        c["positions"] += plan.per_unit
        c["samples"] += y.shape[0]
        c["batches"] += 1
        if len(self._pending[name]["active"]) >= FLUSH_EVERY:
            self._flush_site(name)

    def _count(self, site: Site, y: torch.Tensor, plan: _Plan) -> None:
        """Reduce one output to per-unit vectors, left in `_pending`."""
        inner, d, acc = plan.inner, plan.d, plan.acc
        pend = self._pending[site.name]
        if plan.fast:
            active_ps, sum_u, mx = self._counting(y, inner, d, acc, self.track_max)
        else:
            reduce_all = (0, *inner)
            sign = y.sign()
            sum_u = y.sum(reduce_all, dtype=acc)
            if self.eps == 0.0:     # nonzero and abs_sum are made from these in `_flush`
                active_ps = sign.clamp_min(0).sum(inner or 0, dtype=acc)
                pend["sign_sum"].append(sign.sum(reduce_all, dtype=acc))
                pend["relu_sum"].append(y.clamp_min(0).sum(reduce_all, dtype=acc))
            else:
                active_ps = (y - self.eps).clamp_min(0).sign().sum(inner or 0, dtype=acc)
                pend["nonzero"].append(sign.abs().sum(reduce_all, dtype=acc))
                pend["abs_sum"].append(y.abs().sum(reduce_all, dtype=acc))
            mx = _unit_max(y, d) if self.track_max else None
        if inner:  # per sample: the unit said nothing at any token/position
            pend["silent"].append((active_ps == 0).sum(0))
            active_ps = active_ps.sum(0)
        pend["active"].append(active_ps)
        pend["sum"].append(sum_u)
        if mx is not None:
            c = self._counters[site.name]
            torch.maximum(c["max"], mx.to(c["max"].dtype), out=c["max"])

    def _flush_site(self, name: str) -> None:
        pend, c = self._pending[name], self._counters[name]
        if not pend["active"]:
            return
        active = torch.stack(pend["active"])            # (steps, units): exact integers
        total = {"active": active.sum(0, dtype=torch.float64)}
        c["active_batches"] += active.sign().sum(0, dtype=torch.float64)
        for f, vs in pend.items():
            if f != "active" and vs:
                total[f] = torch.stack(vs).sum(0, dtype=torch.float64)
        if "sign_sum" in total:     # signed, eps == 0: #(y != 0) and sum |y| from these
            total["nonzero"] = 2 * total["active"] - total.pop("sign_sum")
            total["abs_sum"] = 2 * total.pop("relu_sum") - total["sum"]
        for f, v in total.items():
            c[f] += v
        for vs in pend.values():
            vs.clear()

    def _flush(self) -> None:
        """Sum every pending step into the counters."""
        for name in self._pending:
            self._flush_site(name)

    @property
    def _counting(self) -> Callable:
        """`_fast_stats`, compiled once when `fused` asks for it."""
        if self._compiled is None:
            self._compiled = (_fast_stats if not self.fused else torch.compile(
                _fast_stats, backend="inductor" if self.fused is True else self.fused,
                dynamic=None))
        return self._compiled

    @property
    def observed(self) -> bool:
        """True once any activation was counted on this process."""
        return any(c["batches"] for c in self._counters.values())

    @property
    def attached(self) -> bool:
        """True while the hooks are registered (on watched steps of a sampled monitor)."""
        return self.taps.attached

    def open(self) -> "ActivityMonitor":
        """Start watching: the hooks are attached (on watched steps only when
        ``every_steps > 1``) until `close`. Returns the monitor; ``with monitor:`` does the
        same and closes it on exit."""
        self._entered = True
        self._step = 0
        self.taps.attach()
        return self

    def close(self) -> None:
        """Remove every hook (the counters stay readable)."""
        self._entered = False
        self.taps.detach()

    def __enter__(self) -> "ActivityMonitor":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def set_step(self, step: int) -> None:
        """Align the watch phase with a training step counter (e.g. after a resume)."""
        self._step = int(step)
        if self._entered and self.every_steps > 1:
            self._watch(self._step % self.every_steps == 0)

    def step(self) -> None:
        """Call once per training step (after the optimizer step): arms the hooks for the next
        step when it is a watched one (every k-th), disarms them otherwise."""
        if not self._entered or self.every_steps == 1:
            return
        self._step += 1
        self._watch(self._step % self.every_steps == 0)

    def _watch(self, on: bool) -> None:
        self.taps.attach() if on else self.taps.detach()

    # -- results -------------------------------------------------------------------------
    def _gathered(self) -> dict[str, dict]:
        """Counters, summed (max-ed) over ranks when torch.distributed is initialised.
        Local counters are never modified, so asking twice does not double-count."""
        self._flush()
        counters = {n: dict(c) for n, c in self._counters.items()}
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return counters
        names = list(counters)
        dev = counters[names[0]]["active"].device
        sums = torch.cat([torch.cat([counters[n][f] for f in _FIELDS] + [torch.tensor(
            [float(counters[n][f]) for f in _COUNT_FIELDS], dtype=torch.float64, device=dev)])
            for n in names])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        if self.track_max:      # untracked maxima stay -inf: nothing to send
            maxes = torch.cat([counters[n]["max"] for n in names])
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        i = m = 0
        for n in names:
            u = self.sites[n].num_units
            c = counters[n]
            for fld in _FIELDS:
                c[fld], i = sums[i:i + u], i + u
            for fld in _COUNT_FIELDS:
                c[fld], i = int(sums[i]), i + 1
            if self.track_max:
                c["max"], m = maxes[m:m + u], m + u
        return counters

    def stats(self) -> dict[str, SiteStats]:
        """Per-site counters (all-reduced across ranks) with their definition."""
        out = {}
        for name, c in self._gathered().items():
            site = self.sites[name]
            count = lambda t: t.round().long()
            active = count(c["active"])
            fast = self._fast(site)
            nonzero = active if fast else count(c["nonzero"])
            abs_sum = c["sum"] if fast else c["abs_sum"]
            silent = count(c["silent"])
            if c["positions"] == c["samples"]:  # one position per sample: silent = not active
                silent = c["samples"] - active
            out[name] = SiteStats(site, active, c["positions"] - nonzero, silent,
                                  count(c["active_batches"]), c["sum"].clone(), abs_sum.clone(),
                                  c["max"].clone() if self.track_max else None,
                                  c["positions"], c["samples"], c["batches"],
                                  self.eps, self.mode, self.every_steps)
        return out

    def dead_units(self, criterion: str | Callable = "never_active", **params) -> dict[str, torch.Tensor]:
        """``{site: BoolTensor[num_units]}``, True where the unit is dead under `criterion`
        (a name from `CRITERIA` or a function SiteStats -> BoolTensor).

        ``never_active`` at a site whose activation can output negative values (tanh, GELU,
        leaky ReLU, soft threshold) or whose observed output is a gated product is evaluated
        as ``always_zero``: a negative output is activity too, so only a unit that outputs
        exactly 0 everywhere is dead there. An expert that no token reached (`unobserved`)
        has no unit dead: no evidence is not death."""
        fn = CRITERIA.get(criterion) if isinstance(criterion, str) else criterion
        stats = self.stats()
        empty = [n for n, s in stats.items() if s.positions == 0 and s.site.expert is None]
        if empty or not any(s.positions for s in stats.values()):
            raise RuntimeError(f"no activations were observed at sites {empty or list(stats)}: "
                               "run data through the model inside the monitor first")
        signed = {n for n, site in self.sites.items() if not site.observes_nonneg}
        out = {}
        for n, s in stats.items():
            if s.positions == 0:     # an expert no token was routed to: no evidence, not dead
                out[n] = torch.zeros(s.site.num_units, dtype=torch.bool, device=s.active.device)
            elif criterion == "never_active" and n in signed:
                out[n] = always_zero(s)
            else:
                out[n] = fn(s, **params)
        return out

    def unobserved(self) -> list[str]:
        """Sites no output reached (experts no token was routed to): their units are
        unobserved, never counted dead."""
        return [n for n, s in self.stats().items() if s.positions == 0]

    def dead_fraction(self, criterion: str | Callable = "never_active", *, per_site: bool = False,
                      **params) -> float | dict[str, float]:
        """Fraction of units that are dead, over all sites or per site."""
        dead = self.dead_units(criterion, **params)
        if per_site:
            return {n: d.double().mean().item() for n, d in dead.items()}
        total = sum(d.numel() for d in dead.values())
        return sum(int(d.sum()) for d in dead.values()) / max(total, 1)

    def dynamic_dnr(self, *, per_site: bool = False) -> float | dict[str, float]:
        """Dynamic dead-neuron rate (AP, Liu et al. 2023): the fraction of (sample, position,
        unit) outputs that are exactly zero, over the observed batches."""
        stats = self.stats()
        if per_site:
            return {n: s.zeros.sum().item() / max(s.positions * s.site.num_units, 1)
                    for n, s in stats.items()}
        zeros = sum(int(s.zeros.sum()) for s in stats.values())
        total = sum(s.positions * s.site.num_units for s in stats.values())
        return zeros / max(total, 1)

    def dnr_metrics(self) -> dict[str, float]:
        """Flat metric keys: dynamic_dnr and dnr/<site> (empty before anything was watched)."""
        if not self.observed:
            return {}
        return {"dynamic_dnr": self.dynamic_dnr(),
                **{f"dnr/{n}": v for n, v in self.dynamic_dnr(per_site=True).items()}}

    def activation_sparsity(self) -> dict[str, float]:
        """Per site: fraction of outputs that are exactly zero (Price et al. 2024)."""
        return self.dynamic_dnr(per_site=True)

    def subset(self, sites: Sequence[Site]) -> "ActivityMonitor | None":
        """A closed monitor holding a copy of this one's counters for `sites` only (None when
        one of them is not watched here, or differs from the site watched under its name)."""
        if any(self.sites.get(s.name) != s for s in sites):
            return None
        self._flush()
        out = ActivityMonitor(self.model, sites, eps=self.eps, every_steps=self.every_steps,
                              mode=self.mode, track_max=self.track_max)
        for s in sites:
            out._counters[s.name] = {k: (v.clone() if torch.is_tensor(v) else v)
                                     for k, v in self._counters[s.name].items()}
        out._step = self._step
        return out

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters as tensors and ints (loads with ``torch.load(weights_only=True)``)."""
        self._flush()
        return {"eps": self.eps, "mode": self.mode, "every_steps": self.every_steps,
                "step": self._step,
                "sites": {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in c.items()}
                          for n, c in self._counters.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        saved = set(state["sites"])
        if saved != set(self.sites):
            raise KeyError(f"state has sites {sorted(saved)}, monitor has {sorted(self.sites)}")
        if float(state["eps"]) != self.eps:
            raise ValueError(f"state was counted with eps={state['eps']}, monitor uses {self.eps}")
        dev = self._device()
        for n, c in state["sites"].items():
            if c["active"].numel() != self.sites[n].num_units:
                raise ValueError(f"site {n}: state has {c['active'].numel()} units, "
                                 f"monitor {self.sites[n].num_units}")
            missing = set(_FIELDS + _COUNT_FIELDS + ("max",)) - set(c)
            if missing:
                raise KeyError(f"site {n}: state lacks counters {sorted(missing)}")
            self._counters[n] = {k: (v.to(dev) if torch.is_tensor(v) else int(v))
                                 for k, v in c.items()}
            self._pending[n] = {f: [] for f in _PENDING_FIELDS}
        self._step = int(state.get("step", 0))
