"""What every method shares: the Method API, driven from any training loop.

    method = dormant.methods.build("synaptic-stripping", factor=0.05)
    method.prepare(model, optimizer, probe=val_loader)    # sites, masks on the optimizer
    for epoch in range(epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            method.after_backward()      # gradient-side work (DemP's regulariser)
            optimizer.step()             # masks: gradients masked before, weights after
            method.after_step()          # step-cadence decisions; True: the model changed
        log(method.end_epoch())          # epoch-cadence decisions; the method's metrics
    method.finalize()                    # a plain model: no hooks, masks folded into weights

A method finds its sites in `prepare`, observes them with exact probe passes (eval mode, no
grad, every sample of the probe data; the caller's random state is left as it was), takes a
decision (a pure function of tensors, tested without training) and applies it, and in
`finalize` leaves a plain model: no hooks on the model, no optimizer hooks, no buffers of ours.
Weight masks live in a `Masks` object attached to the optimizer and saved with the method's
state, so a resumed run keeps them. Methods never import a training loop and never evaluate
test data; where the caller must act, the value a call returns says so (`EpochResult`).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..batching import Forward, default_forward, iter_batches, probe_example, to_device
from ..diagnose import probe
from ..masks import Masks
from ..monitor import ActivityMonitor
from ..options import OptionError, Options, option
from ..registry import Registry
from ..sharding import (
    gathered,
    is_fsdp,
    local,
    resharded,
    sharded_parameters,
    sum_rows,
)
from ..sites import (
    Site,
    _unwrap,
    find_sites,
    fused_experts,
    fused_experts_message,
    fused_layout,
    is_producer,
)
from ..units import incoming, outgoing

__all__ = ["EpochResult", "METHODS", "Method", "MethodOptions", "PeriodicOptions",
           "acting_on_shards", "not_on_shards", "prunable_weights", "weight_sparsity"]

# Every method registers itself beside its class: ``@METHODS.register`` (under its `name`).
METHODS = Registry("method")
METHODS.register("none", help="Plain training (the baseline).")(None)

Evaluate = Callable[[nn.Module], Mapping[str, Any]]


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of every Linear/ConvNd/Conv1D, by parameter name (the classifier included)."""
    return {f"{n}.weight" if n else "weight": m.weight
            for n, m in _unwrap(model).named_modules() if is_producer(m)}


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all Linear/ConvNd weights (under FSDP2: every
    rank counts its rows, summed over the shard group)."""
    ws = prunable_weights(resharded(_unwrap(model))).values()
    total = sum(w.numel() for w in ws)
    zeros = sum_rows((w, (local(w.detach()) == 0).sum().double()) for w in ws)
    return float(zeros) / max(total, 1)


@dataclass
class MethodOptions(Options):
    """Options every method has."""
    probe: str = option("val", "split the Trainer and the command line hand over as probe "
                        "data (never test); in your own loop you pass the data to prepare()",
                        choices=("train", "val"))
    probe_samples: int | None = option(None, "use only the first N probe samples (fixed, not "
                                       "random)", at_least=1)
    activations: tuple[str, ...] | None = option(None, "site activation kinds to act on "
                                                 "(None: every kind)")
    sites: Sequence[Site] | None = option(None, "explicit sites (default: find_sites, those "
                                          "with a producer)", python_only=True)
    eps: float = option(0.0, "an output counts as active when > eps", at_least=0)


@dataclass
class PeriodicOptions(MethodOptions):
    """Options of methods that act on a cadence of epochs or steps."""
    every: int = option(1, "act at the end of every N-th epoch", at_least=1)
    every_steps: int | None = option(None, "act every N optimizer steps instead (then "
                                     "`every` is not used)", at_least=1)


class EpochResult(dict):
    """The method's metrics for the epoch (a dict), plus what the caller must act on:

    model_changed: units were removed physically (parameters replaced, optimizer state
        sliced in place): rebuild what holds the old parameters (a DDP wrapper, an EMA copy).
    new_round: a pruning round ended: weights pruned, survivors rewound, optimizer state
        cleared; restart the learning-rate schedule if it runs per round.
    restored: the weights were replaced by the round's best epoch (`val_score`); a caller
        that reports accuracy should measure the model again (or pass `evaluate`).
    """

    model_changed: bool = False
    new_round: bool = False
    restored: bool = False


class Method:
    """Base of the methods: options, sites, probes, masks, a cadence, metrics, state.

    Subclasses set `name` and `Options` and override `update` (periodic methods) or the
    `_after_backward` / `_after_step` / `_end_epoch` hooks.
    """

    name = "method"
    Options: type[MethodOptions] = PeriodicOptions
    needs: tuple[str, ...] = ()          # prepare() arguments this method cannot do without
    rewrites_outgoing = False            # True: every reader of a site's units must be known
    acts_on_fused_experts = False        # True: knows a fused 3-D expert's slices (Site.slab)
    changes_model = False                # True: removes units physically (parameters replaced)
    uses_sites = True                    # False: acts on every parameter (no site discovery)
    acts_on_sharded = False              # True: its rule runs on FSDP2 shards (`editing`)

    def __init__(self, **options: Any):
        parsed = options.pop("_parsed", None)       # options parsed already (`from_options`)
        if parsed is not None and (options or not isinstance(parsed, self.Options)):
            raise TypeError(f"{self.name}: _parsed must be the only argument, a "
                            f"{self.Options.__name__}")
        self.opts = parsed if parsed is not None else self.Options.parse(self.name, options)
        self.sites: list[Site] | None = (list(self.opts.sites) if self.opts.sites is not None
                                         else None)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.forward: Forward = default_forward
        self.example: Any = None
        self.total_steps: int | None = None
        self.epochs: int | None = None
        self.seed = 0
        self.step = 0            # optimizer steps taken (after_step calls)
        self.epoch = 0           # epochs completed (end_epoch calls)
        self.masks: Masks | None = None
        self.metrics: dict = {}
        self._probe: Any = None
        self._saved_masks: dict | None = None
        self._changed = False
        self._sharded = False      # the model was sharded (FSDP2) when prepared
        self._offered: tuple[ActivityMonitor, list] | None = None   # see end_epoch(observed=)

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.opts.changed().items())
        return f"{type(self).__name__}({changed})"

    # -- prepare / finalize --------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                probe: Any = None, *, total_steps: int | None = None, epochs: int | None = None,
                seed: int = 0, forward: Forward | None = None, example: Any = None) -> "Method":
        """Bind the method to `model` and `optimizer` before training (after
        `load_state_dict` when resuming).

        probe: the data every decision observes -- a tensor, an ``(inputs, targets)`` tuple,
            a mapping of tensors, a list of batches or a DataLoader (not shuffled).
        total_steps / epochs: the run's length, for methods whose schedule needs it.
        seed: seeds the method's own random draws (IMP's random pruner).
        forward: ``forward(model, batch)`` calls the model on a probe batch (default: a
            tensor as ``model(x)``, a mapping as ``model(**batch)``, a tuple as
            ``model(batch[0])``).
        example: the model's inputs for site discovery, a tensor or a mapping of keyword
            inputs (default: what `forward` passes the model for the first two probe samples).
        """
        if not self.acts_on_sharded:      # first: no other fix would make it run
            _check_not_sharded(self.name, model)
        for need in self.needs:
            if {"total_steps": total_steps, "epochs": epochs, "probe": probe}[need] is None:
                raise ValueError(f"{self.name}: prepare() needs {need}=... (its schedule "
                                 "depends on the run's length)" if need != "probe" else
                                 f"{self.name}: prepare() needs probe=... (the data its "
                                 "decisions observe: a tensor, a DataLoader, ...)")
        for key, value in (("total_steps", total_steps), ("epochs", epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{self.name}: prepare(): {key} must be an integer >= 1 (the "
                                 f"run's length), got {value!r}")
        self.check_budget(epochs=epochs, total_steps=total_steps)
        _check_optimizer(self.name, model, optimizer)
        self.model, self.optimizer = model, optimizer
        self._sharded = is_fsdp(_unwrap(model))
        self.forward, self._probe = forward or default_forward, probe
        self.total_steps, self.epochs, self.seed = total_steps, epochs, int(seed)
        if self.uses_sites:
            self.example = self._example(example)
            if self.sites is None:
                self.sites = self._without_frozen(self._discover())
            elif self._frozen_of(self.sites):
                raise ValueError(f"{self.name}: the given sites touch frozen parameters "
                                 f"(requires_grad=False): {self._frozen_of(self.sites)}; pass "
                                 "sites=[...] without them, or unfreeze them")
            self._check_sites()
        else:
            self.example, self.sites = example, []
        if self._saved_masks is not None:
            self.ensure_masks().load_state_dict(self._saved_masks)
            self.masks.apply()
            self._saved_masks = None
        if self.masks is not None and self.optimizer is not None:
            self.masks.attach(self.optimizer)   # prepared again (another fit): this optimizer
        self._prepare()
        return self

    def _discover(self) -> list[Site]:
        """The model's sites of the wanted activation kinds that have a producer; sites
        without one (nothing proves which layer feeds them) are left alone, with a warning."""
        acts = self.opts.activations
        found = [s for s in find_sites(self.model, self.example)
                 if acts is None or s.activation in acts]
        if not found:
            kinds = sorted({s.activation for s in find_sites(self.model, self.example)})
            raise ValueError(f"{self.name}: the model has no site with activations {list(acts)} "
                             f"(it has {kinds}); nothing would be done: pass activations=... "
                             "or sites=...")
        alone = [s.name for s in found if s.producer is None]
        kept = [s for s in found if s.producer is not None]
        fused = [n for n in fused_experts(self.model)
                 if not fused_layout(_unwrap(self.model).get_submodule(n))]
        if fused and not kept:
            raise ValueError(f"{self.name}: {fused_experts_message(fused)}, and the model has no "
                             "other site: nothing would be done")
        if not kept:
            raise ValueError(f"{self.name}: no site of {type(_unwrap(self.model)).__name__} has "
                             f"a Linear/Conv layer feeding it along the data flow ({alone}), so "
                             "nothing would be done: pass sites=[dormant.make_site(...)]")
        if alone:
            warnings.warn(f"{self.name}: site(s) {alone} are left alone: no Linear/Conv layer "
                          "feeds them along the data flow, so their incoming weights are "
                          "unknown", stacklevel=3)
        slabs = sorted({s.producer for s in kept if s.slab is not None})
        if slabs and not self.acts_on_fused_experts:
            kept = [s for s in kept if s.slab is None]
            if not kept:
                raise ValueError(self._fused_refusal(slabs) + ", and the model has no other "
                                 "site: nothing would be done")
            warnings.warn(self._fused_refusal(slabs) + ": their sites are left alone",
                          stacklevel=3)
        return kept

    def frozen(self) -> set[str]:
        """Names of the model's frozen parameters (``requires_grad=False``): never edited."""
        return {n for n, p in _unwrap(self.model).named_parameters() if not p.requires_grad}

    def _touched(self, site: Site) -> list[str]:
        """The tensors the method edits at `site`: the units' incoming rows, and their
        outgoing columns when the method rewrites or removes them."""
        out = incoming(self.model, site, stats=False)
        if self.rewrites_outgoing or self.changes_model:
            out += outgoing(self.model, site)
        return [sl.name for sl in out]

    def touched_by(self, sites: Iterable[Site]) -> list[str]:
        """The parameters the method edits at `sites` (for `editing`; its sites touch no
        frozen parameter: `prepare` left those out)."""
        return sorted({n for s in sites for n in self._touched(s)})

    def _frozen_of(self, sites: list[Site]) -> dict[str, list[str]]:
        frozen = self.frozen()
        if not frozen:
            return {}
        out = {s.name: sorted(set(self._touched(s)) & frozen) for s in sites}
        return {n: names for n, names in out.items() if names}

    def _without_frozen(self, sites: list[Site]) -> list[Site]:
        """Discovered sites minus those whose edited tensors are frozen (with a warning;
        refused when nothing is left)."""
        hit = self._frozen_of(sites)
        if not hit:
            return sites
        kept = [s for s in sites if s.name not in hit]
        what = "; ".join(f"{n} ({', '.join(t)})" for n, t in hit.items())
        if not kept:
            raise ValueError(f"{self.name}: every site touches frozen parameters "
                             f"(requires_grad=False): {what}; nothing would be done")
        warnings.warn(f"{self.name}: site(s) touching frozen parameters are left alone: {what}",
                      stacklevel=3)
        return kept

    def _fused_refusal(self, modules: list[str]) -> str:
        return (f"{self.name} does not act on fused 3-D experts yet ({', '.join(modules)}: "
                "gate_up_proj / down_proj [experts, ...]); redo, synaptic-stripping and the "
                "monitor (dormant.diagnose) do")

    def _check_sites(self) -> None:
        """Refuse sites the method cannot act on correctly, before training."""
        slabs = sorted({s.producer for s in self.sites if s.slab is not None})
        if slabs and not self.acts_on_fused_experts:
            raise ValueError(self._fused_refusal(slabs) + ": pass sites=[...] without them")
        if not self.rewrites_outgoing:
            return
        unknown = [f"{s.name} (read by {', '.join(s.readers) or 'an unknown operation'})"
                   for s in self.sites if not s.consumers_complete]
        if unknown:
            raise ValueError(
                f"{self.name} rewrites the outgoing weights of the units it acts on, but "
                f"something other than a Linear/Conv layer also reads the units of site(s) "
                f"{'; '.join(unknown)}, so their outgoing weights are not known: pass "
                "sites=[...] without them (find_sites lists them)")

    def _prepare(self) -> None:
        """Method-specific preparation (override)."""

    def check_budget(self, *, epochs: int | None = None, total_steps: int | None = None) -> None:
        """Refuse a run length the method's schedule cannot use (override)."""

    def _example(self, example: Any) -> Any:
        model = _unwrap(self.model)
        if example is not None:
            return to_device(example, next(model.parameters()).device)
        if self._probe is None:
            raise ValueError(f"{self.name}: prepare() needs probe=... or example=... (a "
                             "batch the model accepts, for site discovery)")
        example = probe_example(model, self._probe, self.forward)
        if example is None:
            raise ValueError(f"{self.name}: the probe data is empty")
        return example

    @contextlib.contextmanager
    def seeded(self, salt: int = 0):
        """Random draws for a decision from a generator seeded by (seed, step, epoch, salt):
        every rank of a distributed run draws the same numbers, a resumed run the numbers
        the straight one drew, and the caller's random state is left as it was."""
        p = next(_unwrap(self.model).parameters())
        with torch.random.fork_rng(devices=[p.device.index or 0] if p.is_cuda else []):
            # offset so that it never replays the stream torch.manual_seed(seed) gave the model
            torch.manual_seed(1_000_003 * self.seed + 7_919 * self.step + 31 * self.epoch
                              + salt + 24_593)
            yield

    def editing(self, names: Iterable[str] | None = None, *, state: bool = True):
        """A block that reads or edits parameters outside a forward: under FSDP2 the model's
        sharded parameters (`names`, or all) are whole there, with their optimizer state
        (unless `state=False`: a block that leaves it alone), and each rank keeps its rows of
        the edits (`dormant.sharding.gathered`); nothing changes for any other model. The
        block must not run the model."""
        if not is_fsdp(_unwrap(self.model)):
            return contextlib.nullcontext()
        return gathered(_unwrap(self.model), self.optimizer if state else None, names)

    def ensure_masks(self) -> Masks:
        """The method's masks, created and attached to the optimizer on first use."""
        if self.masks is None:
            self.masks = Masks(_unwrap(self.model))
            if self.optimizer is not None:
                self.masks.attach(self.optimizer)
        return self.masks

    def finalize(self) -> nn.Module:
        """Leave a plain model: masks stay applied to the weights, every hook goes."""
        if self.masks is not None:
            self.masks.apply()
            self.masks.detach()
        return self.model

    # -- observe -------------------------------------------------------------------------
    def set_probe(self, probe: Any) -> None:
        """Observe other data from now on (continual learning: the current task's)."""
        self._probe = probe

    def _require_probe(self) -> None:
        if self._probe is None:
            raise ValueError(f"{self.name} observes units: prepare(..., probe=...) needs the "
                             "data to observe (a tensor, a DataLoader, ...)")

    def probe_batches(self, batch_size: int = 512):
        """The probe data's batches (at most `probe_samples` samples)."""
        self._require_probe()
        return iter_batches(self._probe, batch_size, limit=self.opts.probe_samples)

    def observe(self) -> ActivityMonitor:
        """An exact probe pass over the probe data (eval mode, no grad); the caller's random
        state is untouched (a DataLoader would draw from it). Inside `end_epoch`, the caller's
        own pass of the epoch (``observed=``) stands in for it while it applies: same eps,
        every probe sample, the method's sites among its own, no weight changed since."""
        self._require_probe()
        offered = self._offered_pass()
        if offered is not None:
            return offered
        with torch.random.fork_rng(devices=[]):
            return probe(self.model, self._probe, sites=self.sites, eps=self.opts.eps,
                         max_samples=self.opts.probe_samples, forward=self.forward)

    def _offered_pass(self) -> ActivityMonitor | None:
        if self._offered is None:
            return None
        mon, versions = self._offered
        if (self.opts.probe_samples is not None or mon.eps != self.opts.eps
                or versions != _versions(self.model)):
            return None
        return mon.subset(self.sites)

    # -- the loop's events ---------------------------------------------------------------
    def _require_prepared(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.name}: call prepare(model, optimizer, probe=...) first")

    def after_backward(self) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``."""
        self._require_prepared()
        self._after_backward()

    def after_step(self) -> bool:
        """After ``optimizer.step()``. Returns True when the model changed physically."""
        self._require_prepared()
        self.step += 1
        self._changed = False
        self._after_step()
        return self._changed

    def end_epoch(self, val_score: float | None = None, evaluate: Evaluate | None = None, *,
                  observed: ActivityMonitor | None = None) -> EpochResult:
        """At the end of an epoch: the method's epoch-cadence decisions and its metrics.

        val_score: the epoch's validation score (higher is better), for methods that keep
            the best epoch of a round (NNrelief).
        evaluate: ``evaluate(model) -> dict`` of metrics, called when the method changed the
            model after the caller measured it (best epoch restored, final removal); its
            values are merged into the result.
        observed: the caller's exact probe pass (`dormant.diagnose.probe`) over this method's
            probe data, of the model as it is now: a decision of this epoch reads it instead of
            passing the data through the model again, as long as it applies (see `observe`).
        """
        self._require_prepared()
        check_layout(self.name, self.model, self._sharded)
        self.epoch += 1
        self._changed = False
        result = EpochResult()
        self._offered = (observed, _versions(self.model)) if observed is not None else None
        try:
            self._end_epoch(result, val_score, evaluate)
        finally:
            self._offered = None
        result.model_changed = self._changed
        return result

    def _after_backward(self) -> None: ...

    def _after_step(self) -> None:
        every = self.opts.every_steps
        if every is not None and self.step % every == 0:
            self.update()

    def _end_epoch(self, result: EpochResult, val_score, evaluate) -> None:
        if self.opts.every_steps is None:
            self.update(act=self.epoch % self.opts.every == 0)
        result.update(self.metrics)

    def update(self, act: bool = True) -> None:
        """Observe, record metrics in `self.metrics`, and (when `act`) decide and apply."""
        raise NotImplementedError

    def last_epoch(self) -> bool:
        """True at the end of the run's last epoch (when its length is known)."""
        if self.epochs is not None:
            return self.epoch >= self.epochs
        return self.total_steps is not None and self.step >= self.total_steps

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict() if self.masks is not None else None,
                "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state; call before `prepare` (which re-attaches the masks)."""
        self._saved_masks = state.get("masks")
        self.step, self.epoch = int(state.get("step", 0)), int(state.get("epoch", 0))


def _versions(model: nn.Module) -> list[tuple[int, int, int]]:
    """Identity and in-place versions of every parameter and buffer: any edit changes them."""
    m = _unwrap(model)      # a shard edited in place bumps its local tensor's version only
    return [(id(t), t._version, local(t)._version) for t in (*m.parameters(), *m.buffers())]


def check_layout(name: str, model: nn.Module, sharded: bool) -> None:
    """Refuse a model sharded with FSDP2 after it was handed over unsharded (its optimizer
    and the method's state would hold the old parameters, silently untrained)."""
    if is_fsdp(_unwrap(model)) and not sharded:
        raise RuntimeError(f"{name}: the model was sharded with FSDP2 after prepare()/start(): "
                           "its optimizer and dormant's state hold the old parameters. Shard "
                           "first (fully_shard), then build the optimizer, then prepare/start")


def acting_on_shards() -> list[str]:
    """The registered methods that act on FSDP2-sharded parameters."""
    return [n for n in METHODS.names() if getattr(METHODS.get(n), "acts_on_sharded", False)]


def not_on_shards(name: str) -> str:
    """Why method `name` refuses FSDP2 shards, and what works instead."""
    return (f"{name} does not act on FSDP2-sharded parameters (it removes units physically, "
            "so every shard would change shape, or it was not written for shards). These do: "
            f"{', '.join(acting_on_shards())}; the monitor, dormant.diagnose and the epoch-end "
            f"metrics work too (Session(None)). Run {name} without sharding "
            "(DistributedDataParallel: torchrun -m dormant run ... without --fsdp)")


def _check_not_sharded(name: str, model: nn.Module) -> None:
    """Methods that remove units (or were not written for shards) refuse FSDP2 models."""
    sharded = sharded_parameters(_unwrap(model))
    if sharded:
        raise ValueError(f"{name}: the model's parameters are sharded by FSDP2 (fully_shard: "
                         f"{', '.join(sharded[:3])}{', ...' if len(sharded) > 3 else ''}); "
                         + not_on_shards(name))


def _check_optimizer(name: str, model: nn.Module, optimizer) -> None:
    """The optimizer a method resets state in and hooks into must be a torch optimizer that
    trains `model` (a wrong one would have its state reset for nothing)."""
    if optimizer is None:
        return
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer          # accelerate's / Lightning's wrapper
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{name}: optimizer must be a torch.optim.Optimizer (or None), got "
                        f"{type(optimizer).__name__}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(id(p) in held for p in _unwrap(model).parameters()):
        hint = (" (the model is sharded by FSDP2: build the optimizer after fully_shard, from "
                "the sharded parameters)" if is_fsdp(_unwrap(model)) else "")
        raise ValueError(f"{name}: the optimizer holds none of the model's parameters{hint}: "
                         "pass the optimizer that trains this model")


def check_option(ok: bool, owner: str, message: str) -> None:
    """Raise OptionError(`owner: message`) unless `ok`."""
    if not ok:
        raise OptionError(f"{owner}: {message}")
