"""Site taps: forward hooks keyed by site that hand each watched activation output to
callbacks, and nothing else. The counters (`dormant.monitor`), the plasticity features
(`dormant.metrics`) and Continual Backprop's per-step means all listen to taps instead of
hooking modules themselves.

    with SiteTaps(model, sites, lambda site, y: seen.append((site.name, y.shape))):
        model(x)

Hooks are owned: `attach` registers them (idempotent), `detach` removes them, and leaving
the context (or `close`) always removes them, also on an exception.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .sites import Site, _unwrap

__all__ = ["Listener", "SiteTaps", "MODES"]

Listener = Callable[[Site, torch.Tensor], None]
MODES = ("train", "eval", "any")     # which forwards a tap hands on: module.training or both


class SiteTaps:
    """Forward hooks on the modules the `sites` are observed at; each output of a site is
    passed to every listener as ``listener(site, y)``.

    mode: ``"train"``, ``"eval"`` or ``"any"``: hand on outputs of modules in training mode,
    in eval mode, or both. Listeners run inside the forward: device ops only (no host sync).
    An expert that no token was routed to in a batch passes nothing.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site], *listeners: Listener,
                 mode: str = "any"):
        if mode not in MODES:
            raise ValueError(f"mode must be 'train', 'eval' or 'any', got {mode!r}")
        self.model = _unwrap(model)
        self.sites = list(sites)
        self.listeners: list[Listener] = list(listeners)
        self.mode = mode
        self._handles: list = []
        self._calls: dict[tuple[str, str, str], int] = {}

    # -- listeners -----------------------------------------------------------------------
    def listen(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def _emit(self, site: Site, y: torch.Tensor) -> None:
        for listener in self.listeners:
            listener(site, y)

    # -- hooks ---------------------------------------------------------------------------
    def _wants(self, module: nn.Module) -> bool:
        return self.mode == "any" or (module.training == (self.mode == "train"))

    def _make_hook(self, key, by_call: dict[int, Site], ncalls: int, kind: str) -> Callable:
        def hook(module, inputs, output=None):
            idx = self._calls.get(key, 0)
            self._calls[key] = idx + 1
            site = by_call.get(idx % ncalls)
            if site is None or not self._wants(module):
                return
            if kind == "input":
                y = inputs[0]
            elif kind == "recompute":
                y = site.tap.fn(output)
            elif kind == "routed":      # one expert's routed tokens (counted on the host)
                y = site.tap.fn(module, inputs)
                if y.shape[0] == 0:     # no token routed: no evidence, nothing passed on
                    return
            else:
                y = output
            self._emit(site, y)
        # Inside a torch.compile'd model the listeners run eagerly behind a graph break: their
        # Python bookkeeping (call counters, pending lists) would otherwise become guards
        # that recompile the graph at every step. Eager models call `hook` directly.
        outside = torch.compiler.disable(hook)

        def dispatch(module, inputs, output=None):
            if torch.compiler.is_compiling():
                return outside(module, inputs, output)
            return hook(module, inputs, output)
        return dispatch

    def _groups(self) -> Iterable[tuple[tuple[str, str, str], dict[int, Site]]]:
        groups: dict[tuple[str, str, str], dict[int, Site]] = {}
        for s in self.sites:          # a fused experts module: one hook per expert
            own = s.name if s.tap.kind == "routed" else ""
            groups.setdefault((s.tap.module, s.tap.kind, own), {})[s.tap.call_index] = s
        return groups.items()

    def attach(self) -> None:
        """Register the hooks (nothing happens when they are registered already)."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        reused = False
        try:
            for (mod_name, kind, own), by_call in self._groups():
                if mod_name not in modules:
                    raise KeyError(f"site module {mod_name!r} not found in the model")
                ncalls = next(iter(by_call.values())).tap.calls
                reused |= ncalls > 1
                hook = self._make_hook((mod_name, kind, own), by_call, ncalls, kind)
                m = modules[mod_name]
                self._handles.append(m.register_forward_pre_hook(hook) if kind == "input"
                                     else m.register_forward_hook(hook))
            if reused:  # call counters restart at every forward of the whole model
                self._handles.append(self.model.register_forward_pre_hook(
                    lambda *_: self._calls.clear()))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "SiteTaps":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    close = detach
