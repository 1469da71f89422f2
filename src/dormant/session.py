"""One training run's dormant side, whoever owns the loop: the sites, a sampled monitor of
the training steps, an optional method driven through the Method API, and the whole
end-of-epoch measurement. The built-in `Trainer` (`dormant.train.callbacks.SessionCallback`),
the Lightning callback and the Hugging Face callback are short adapters that map their
framework's events to these calls, so every host logs the same metrics.

    session = Session("synaptic-stripping", every_steps=10)
    session.start(model, optimizer, probe=val_data, total_steps=..., epochs=...)
    for epoch ...:
        for batch ...:
            loss.backward(); session.after_backward(); optimizer.step()
            session.after_step()                 # True: the method removed units
        metrics = session.end_epoch()            # one exact probe pass, then the method
    session.close()

At each epoch's end the probe data goes through the model once (eval mode, no grad, every
sample): that pass gives the dead fraction and activation sparsity per site, the plasticity
metrics (on its first `plasticity_samples` samples), the activity histograms a logger may
draw (`last`), and -- when the method observes the same data -- the method's decision.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any

import torch
import torch.nn as nn

from .batching import Forward, capture_inputs, default_forward, probe_example
from .criteria import CRITERIA
from .diagnose import diagnosis, probe
from .methods import EpochResult, Method, build
from .methods.base import check_layout
from .metrics import FeatureRecorder, distance_from, initial_state, plasticity_from
from .monitor import ActivityMonitor, _every_steps
from .sharding import gathered_state, is_fsdp, resharded, rows, sharded_parameters, whole_rows
from .sites import Site, find_sites

__all__ = ["Session", "SESSION_FORMAT", "numbers"]

SESSION_FORMAT = "dormant-session/1"


class Session:
    """A monitor, the epoch-end measurement and (optionally) a method for one training run.

    method: a `Method`, a registered name, or None; monitor: watch training batches every
    `every_steps`-th step (dynamic DNR, gradient norm) and measure the model on the probe
    data at each epoch's end (False: drive the method only); criterion/eps: the definition
    of dead; plasticity: also the plasticity metrics (`dormant.metrics`) on the first
    `plasticity_samples` probe samples; sites: the sites to watch (default: every site
    `find_sites` finds; found again after a removal); forward: how a batch is fed to the
    model, ``forward(model, batch)``; host: the name of the framework that owns
    the parameters, for messages (a method that removes units is then refused, and so is one
    that keeps the best epoch). A method's options go with it: ``Session(build("redo",
    tau=0.1))``.
    """

    def __init__(self, method: Method | str | None = None, *, monitor: bool = True,
                 every_steps: int | None = None, criterion: str = "never_active",
                 eps: float = 0.0, plasticity: bool = True, plasticity_samples: int = 1024,
                 sites: list[Site] | None = None, forward: Forward | None = None,
                 host: str | None = None, every: int | None = None):
        every_steps = _every_steps("Session", every, every_steps, 10)
        _check_arguments(every_steps, criterion, eps, plasticity_samples)
        self.method = build(method) if isinstance(method, str) else method
        _check_host(self.method, host)
        self.watch, self.every_steps = monitor, every_steps
        self.criterion, self.eps = criterion, eps
        self.plasticity, self.plasticity_samples = plasticity, plasticity_samples
        self.forward = forward or default_forward
        self.given_sites = sites
        self.model: nn.Module | None = None
        self.probe: Any = None               # the epoch-end pass's data
        self.test: Any = None                # measured once, after the last epoch
        self.sites: list[Site] = []
        self.inputs: Any = None              # the model's inputs for site discovery
        self.monitor: ActivityMonitor | None = None
        self.last: ActivityMonitor | None = None   # the last epoch-end pass (histograms)
        self.initial: dict[str, torch.Tensor] = {}  # theta_0, for distance_from_init
        self.step = 0
        self._grad_sum: torch.Tensor | None = None  # watched steps' gradient norms (device)
        self._grad_steps = 0
        self._found = False                  # sites found once (given ones used first)
        self._saved: dict | None = None      # a checkpoint's state, applied at `start`
        self._sharded = False                # the model was sharded (FSDP2) at `start`

    # -- the run's events ----------------------------------------------------------------
    def start(self, model: nn.Module, optimizer, *, probe: Any = None, example: Any = None,
              method_probe: Any = ..., test: Any = None, total_steps: int | None = None,
              epochs: int | None = None, seed: int = 0, step: int = 0) -> None:
        """Before the first step (of a resumed run too, after `load_state_dict`). `probe`:
        the data of the epoch-end pass; `method_probe`: the method's decision data (default:
        the same); `example`: a batch for site discovery (default: the probe's first
        samples); `test`: data whose activation sparsity is measured after the last epoch;
        `step`: optimizer steps already taken (a resumed run)."""
        if self.monitor is not None:        # started before (a second fit): hooks off first
            self.monitor.close()
        self.model, self.probe, self.test, self.step = model, probe, test, int(step)
        self._sharded = is_fsdp(model)
        if self.forward is default_forward and not _has_forward(model):
            raise TypeError(f"dormant: {type(model).__name__} has no forward(), so a probe batch "
                            "cannot be fed to it: give it a forward() that takes a batch's "
                            "inputs, or pass forward=lambda model, batch: model(...) to the "
                            "session or the callback")
        self.inputs = (capture_inputs(model, example, self.forward) if example is not None
                       else probe_example(model, probe, self.forward) if probe is not None
                       else None)
        if self.inputs is None:
            raise ValueError("dormant: give probe data (a validation loader) or an example batch")
        self._found = False              # given sites first, again at every start
        if self.watch:
            self._find_sites()
        saved, self._saved = self._saved or {}, None
        if saved.get("shard") is not None and saved["shard"] != _shard_of(model):
            raise ValueError(f"dormant: the state holds the initial weights of shard "
                             f"{saved['shard']} (rank, world size), saved per rank by an "
                             f"earlier dormant; this process is {_shard_of(model)}: load it "
                             "on its own rank (states saved now hold whole tensors)")
        if self.watch:
            self.monitor = self._new_monitor()
            if saved.get("monitor") is not None:    # its own step: the watch phase goes on
                self.monitor.load_state_dict(saved["monitor"])
                self.step = self.monitor._step
            self.monitor.set_step(self.step)
            # theta_0 on the host (a GPU keeps no second copy of the weights); a second
            # start (another fit) keeps the first one
            self.initial = (self._initial_rows(saved.get("initial")) or self.initial
                            or initial_state(model))
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer     # accelerate's wrapper: hooks go on the real one
        if self.method is not None:
            if saved.get("method") is not None:
                self.method.load_state_dict(saved["method"])     # before prepare: masks
            try:
                self.method.prepare(model, optimizer, probe=probe if method_probe is ... else
                                    method_probe, total_steps=total_steps, epochs=epochs,
                                    seed=seed, forward=self.forward, example=self.inputs)
            except BaseException:
                if self.monitor is not None:    # refused: no hook of ours stays behind
                    self.monitor.close()
                raise

    def after_backward(self) -> None:
        """After ``loss.backward()``, before the optimizer step."""
        if self.monitor is not None and self.monitor.attached:     # watched steps only
            self._add_grad_norm()
        if self.method is not None:
            self.method.after_backward()

    def after_step(self) -> bool:
        """After the optimizer step. True when the method removed units (the caller rebuilds
        what holds the old parameters; the session re-finds its sites itself)."""
        self.step += 1
        if self.monitor is not None:
            self.monitor.step()
        changed = self.method.after_step() if self.method is not None else False
        if changed:
            self.model_changed()
        return changed

    def end_epoch(self, val_score: float | None = None, evaluate=None, *,
                  final: bool = False, diverged: bool = False) -> EpochResult:
        """The epoch's metrics (and the method's flags, `EpochResult`): the watched steps'
        dynamic DNR and gradient norm, one exact pass over the probe data (dead fraction,
        sparsity, plasticity), the test data's sparsity when `final`, then the method's
        decision and metrics. A `diverged` epoch (NaN activations) is not measured."""
        if self.model is None:
            raise RuntimeError("dormant: call session.start(model, optimizer, probe=...) "
                               "before end_epoch()")
        check_layout("dormant", self.model, self._sharded)
        out = EpochResult()
        self.last = None           # the pass of this epoch only, never an older one
        if self.watch and not diverged:
            out.update(self.measure(final))
        elif self.monitor is not None:
            self.monitor.reset()
        if self.method is not None:
            same = self.last is not None and self.method._probe is self.probe
            result = self.method.end_epoch(val_score=val_score, evaluate=evaluate,
                                           observed=self.last if same else None)
            out.update(result)
            out.model_changed, out.new_round = result.model_changed, result.new_round
            out.restored = result.restored
            if result.model_changed:
                self.model_changed()
        return out

    def set_probe(self, probe: Any, method_probe: Any = ..., test: Any = ...) -> None:
        """Observe other data from now on (continual learning: the current task's)."""
        self.probe = probe
        if test is not ...:
            self.test = test
        if self.method is not None:
            self.method.set_probe(probe if method_probe is ... else method_probe)

    def model_changed(self) -> None:
        """Units were removed physically (or modules replaced): sites and monitor follow the
        new model. `after_step` calls it when the method removed units."""
        if not self.watch:
            return
        self.monitor.close()
        self._find_sites()
        self.monitor = self._new_monitor()
        self.monitor.set_step(self.step)

    def close(self) -> None:
        """After training: hooks gone, the method's masks folded into the weights (the
        initial weights are kept for another `start` of the same run)."""
        if self.monitor is not None:
            self.monitor.close()
        if self.method is not None and self.method.model is not None:
            self.method.finalize()

    # -- the measurement -----------------------------------------------------------------
    def measure(self, final: bool = False) -> dict[str, float]:
        """Everything but the method: the watched steps' rates (then reset), and one exact
        pass over the probe data (none without probe data); after the last epoch (`final`)
        the test data's sparsity."""
        out: dict[str, float] = {}
        out.update(self.monitor.dnr_metrics())
        self.monitor.reset()
        if self.probe is not None:
            out.update(self._probe_pass())
        out.update(self._grad_and_distance())
        if final and self.test is not None:
            with torch.random.fork_rng(devices=[]):
                test = probe(self.model, self.test, sites=self.sites, eps=self.eps,
                             forward=self.forward)
            rates = test.activation_sparsity()
            out["test_sparsity"] = sum(rates.values()) / len(rates)
        return out

    def _probe_pass(self) -> dict[str, float]:
        """One exact pass over the probe data: the diagnosis, and the plasticity metrics of
        its first `plasticity_samples` samples (counted at eps 0, as `plasticity` does)."""
        out: dict[str, float] = {}
        listeners = []
        if self.plasticity:
            first = ActivityMonitor(self.model, self.sites)
            features = FeatureRecorder(self.sites, self.plasticity_samples, also=[first.observe])
            listeners.append(features)
        with torch.random.fork_rng(devices=[]):    # a DataLoader draws its seed from it
            self.last = probe(self.model, self.probe, sites=self.sites, eps=self.eps,
                              forward=self.forward, listeners=listeners)
        report = diagnosis(self.last, self.criterion)
        out.update(report.metrics())
        out["sparsity"] = sum(r.sparsity for r in report.rows) / len(report.rows)
        if self.plasticity:
            out.update(plasticity_from(self.model, features.result(), first))
        return out

    def _grad_and_distance(self) -> dict[str, float]:
        out = {}
        if self._grad_steps:
            out["grad_norm"] = self._grad_sum.item() / self._grad_steps
            self._grad_sum, self._grad_steps = None, 0
        out["distance_from_init"] = distance_from(self.model, self.initial)
        return out

    def _add_grad_norm(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).double()
        self._grad_sum = norm if self._grad_sum is None else self._grad_sum + norm  # no sync
        self._grad_steps += 1

    def _find_sites(self) -> None:
        self.sites = (list(self.given_sites) if self.given_sites is not None and
                      not self._found else find_sites(self.model, self.inputs))
        self._found = True

    def _new_monitor(self) -> ActivityMonitor:
        return ActivityMonitor(self.model, self.sites, every_steps=self.every_steps,
                               eps=self.eps, mode="train").open()

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint must carry for a resumed run to equal a straight one: the
        method's state (masks, counters, snapshots), the monitor's counters, the initial
        weights (distance from init). Under FSDP2 a collective (every rank calls it) whose
        tensors are whole: any rank loads it, under any number of ranks."""
        state = {"method": self.method.state_dict() if self.method is not None else None,
                 "method_name": self.method.name if self.method is not None else None,
                 "monitor": self.monitor.state_dict() if self.monitor is not None else None,
                 "initial": self.initial}
        if self.model is None or not is_fsdp(self.model):
            return state
        params = dict(resharded(self.model).named_parameters())
        state["initial"] = {n: whole_rows(params[n], v) if n in params else v
                            for n, v in self.initial.items()}
        return gathered_state(state)

    def _initial_rows(self, saved: dict | None) -> dict[str, torch.Tensor]:
        """Saved initial weights (whole tensors) as this process keeps them: under FSDP2 its
        rows of each sharded parameter."""
        if not saved or not is_fsdp(self.model):
            return dict(saved or {})
        params = dict(resharded(self.model).named_parameters())
        return {n: rows(params[n], v).clone() if n in params and v.shape == params[n].shape
                else v for n, v in saved.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` before `start` (which applies it)."""
        if not isinstance(state, dict) or not {"method", "monitor"} <= set(state):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError("dormant: not a Session state (expected the keys 'method' and "
                             f"'monitor', got {got})")
        if (state["method"] is None) != (self.method is None):
            raise ValueError("dormant: the checkpoint was saved "
                             f"{'without' if state['method'] is None else 'with'} a method and "
                             f"this run has {'one' if self.method is not None else 'none'}: "
                             "resume with the method the run was trained with")
        saved = state.get("method_name")
        if saved is not None and self.method is not None and saved != self.method.name:
            raise ValueError(f"dormant: the checkpoint holds the state of {saved}, this run's "
                             f"method is {self.method.name}: resume with the method the run "
                             "was trained with")
        self._saved = state


def numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The metrics a framework's logger takes, keys prefixed: numbers (and flags, as 0/1)
    only; tables such as a removal's new widths are left out."""
    return {prefix + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _has_forward(model: nn.Module) -> bool:
    """False for a module whose forward is PyTorch's or Lightning's placeholder."""
    f = type(model).forward
    return not (f is nn.Module.forward or getattr(f, "__qualname__", "") ==
                "LightningModule.forward")


def _shard_of(model: nn.Module | None) -> list | None:
    """(rank, world size) when the model is sharded (FSDP2); an earlier dormant tagged each
    rank's state with it (its initial weights were that rank's rows)."""
    if model is None or not sharded_parameters(model):
        return None
    return [torch.distributed.get_rank(), torch.distributed.get_world_size()]


def _check_arguments(every_steps, criterion, eps, plasticity_samples) -> None:
    """Refused when the session is made, not at the first epoch's end."""
    for name, value in (("every_steps", every_steps), ("plasticity_samples", plasticity_samples)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"dormant: {name} must be an integer >= 1, got {value!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"dormant: eps must be a finite number >= 0, got {eps!r}")
    if isinstance(criterion, str):
        CRITERIA.get(criterion)      # unknown names list the valid ones (or a function)


def _check_host(method: Method | None, host: str | None) -> None:
    """Hosts that own the parameters in their own wrappers refuse what they cannot carry."""
    if host is None or method is None:
        return
    if method.changes_model:
        raise ValueError(f"{method.name} removes units physically; {host} keeps the old "
                         "parameters in its own wrappers (optimizer, strategy), so run it in "
                         "your own loop (docs/own-loop.md) or with dormant run")
    if getattr(getattr(method, "opts", None), "keep_best", False):
        raise ValueError(f"{method.name}: keep_best restores each round's epoch with the best "
                         f"validation score, which {host} does not hand the callback: build "
                         "it with keep_best=False")
