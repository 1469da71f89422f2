"""What every training-framework adapter does, without the framework: watch the model with
a sampled `ActivityMonitor`, probe it exactly at each epoch's end, and drive a method through
the Method API. Adapters map their framework's events to these calls."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..batching import Forward, capture_inputs, default_forward, probe_example
from ..diagnose import diagnose
from ..methods import Method, build
from ..monitor import ActivityMonitor
from ..sites import Site, find_sites

__all__ = ["Session"]


class Session:
    """A monitor and (optionally) a method for one training run.

    method: a `Method`, a registered name, or None; monitor: watch training batches every
    `every`-th step (dynamic DNR) and probe the probe data exactly at each epoch's end (dead
    fraction per site, activation sparsity); criterion/eps: the definition of dead; host:
    the framework that owns the parameters (a method that removes units is then refused).
    """

    def __init__(self, method: Method | str | None = None, *, monitor: bool = True,
                 every: int = 10, criterion: str = "never_active", eps: float = 0.0,
                 forward: Forward | None = None, host: str | None = None):
        self.method = build(method) if isinstance(method, str) else method
        if host is not None and self.method is not None and self.method.changes_model:
            raise ValueError(f"{self.method.name} removes units physically; {host} keeps the "
                             "old parameters in its own wrappers (optimizer, strategy), so run "
                             "it in your own loop (docs/own-loop.md) or with dormant run")
        if host is not None and getattr(getattr(self.method, "opts", None), "keep_best", False):
            raise ValueError(f"{self.method.name}: keep_best restores each round's epoch with "
                             f"the best validation score, which {host} does not hand the "
                             f"callback: build it with keep_best=False")
        self.watch, self.every = monitor, every
        self.criterion, self.eps = criterion, eps
        self.forward = forward or default_forward
        self.model: nn.Module | None = None
        self.probe: Any = None
        self.sites: list[Site] = []
        self.inputs: Any = None            # the model's inputs for site discovery
        self.monitor: ActivityMonitor | None = None
        self._saved: dict | None = None      # a checkpoint's state, applied at `start`

    def start(self, model: nn.Module, optimizer, *, probe: Any = None, example: Any = None,
              total_steps: int | None = None, epochs: int | None = None, seed: int = 0) -> None:
        """Before the first step. `probe`: the data of the exact end-of-epoch pass (and of the
        method's decisions); `example`: a batch for site discovery (default: the probe's)."""
        self.model, self.probe = model, probe
        if example is not None:
            self.inputs = capture_inputs(model, example, self.forward)
        elif probe is not None:
            self.inputs = probe_example(model, probe, self.forward)
        if example is None and self.inputs is None:
            raise ValueError("dormant: give probe data (a validation loader) or an example batch")
        self.sites = find_sites(model, self.inputs)
        saved, self._saved = self._saved or {}, None
        if self.watch:
            self.monitor = ActivityMonitor(model, self.sites, every=self.every, eps=self.eps,
                                           mode="train").__enter__()
            if saved.get("monitor") is not None:
                self.monitor.load_state_dict(saved["monitor"])
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer     # accelerate's wrapper: hooks go on the real one
        if self.method is not None:
            if saved.get("method") is not None:
                self.method.load_state_dict(saved["method"])     # before prepare: masks
            self.method.prepare(model, optimizer, probe=probe, total_steps=total_steps,
                                epochs=epochs, seed=seed, forward=self.forward,
                                example=self.inputs)

    def after_backward(self) -> None:
        if self.method is not None:
            self.method.after_backward()

    def after_step(self) -> bool:
        """True when the method changed the model physically (the caller rebuilds wrappers)."""
        if self.monitor is not None:
            self.monitor.step()
        changed = self.method.after_step() if self.method is not None else False
        if changed:
            self._resites()
        return changed

    def end_epoch(self, val_score: float | None = None, evaluate=None) -> dict:
        """The epoch's metrics: dynamic DNR of the watched steps, dead fraction and sparsity
        per site on the probe data, and the method's own."""
        out: dict[str, float] = {}
        if self.method is not None:
            result = self.method.end_epoch(val_score=val_score, evaluate=evaluate)
            out.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
            if result.model_changed:
                self._resites()
        if self.monitor is not None:
            out.update(self.monitor.dnr_metrics())
            self.monitor.reset()
        if self.watch and self.probe is not None:
            out.update(diagnose(self.model, self.probe, sites=self.sites, eps=self.eps,
                                criterion=self.criterion, forward=self.forward).metrics())
        return out

    def _resites(self) -> None:
        """Units were removed: the monitor watches the new sites."""
        self.sites = find_sites(self.model, self.inputs)
        if self.monitor is not None:
            step = self.monitor._step
            self.monitor.close()
            self.monitor = ActivityMonitor(self.model, self.sites, every=self.every,
                                           eps=self.eps, mode="train").__enter__()
            self.monitor.set_step(step)

    def state_dict(self) -> dict:
        """What a framework checkpoint must carry for a resumed run to equal a straight one:
        the method's state (masks, counters, snapshots) and the monitor's counters."""
        return {"method": self.method.state_dict() if self.method is not None else None,
                "monitor": self.monitor.state_dict() if self.monitor is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` before `start` (which applies it)."""
        if not isinstance(state, dict) or not {"method", "monitor"} <= set(state):
            raise ValueError("dormant: not a Session state (expected the keys 'method' and "
                             f"'monitor', got {sorted(state) if isinstance(state, dict) else type(state).__name__})")
        if (state["method"] is None) != (self.method is None):
            raise ValueError("dormant: the checkpoint was saved "
                             f"{'without' if state['method'] is None else 'with'} a method and "
                             f"this run has {'one' if self.method is not None else 'none'}: "
                             "resume with the callback the run was trained with")
        self._saved = state

    def close(self) -> None:
        """After training: hooks gone, the method's masks folded into the weights."""
        if self.monitor is not None:
            self.monitor.close()
        if self.method is not None and self.method.model is not None:
            self.method.finalize()
