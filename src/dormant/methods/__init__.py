"""Methods on dead neurons, one file each, behind a registry.

A method is an object driven from any training loop (the Method API, `methods.base`):

    method = dormant.methods.build("synaptic-stripping", factor=0.05)
    method.prepare(model, optimizer, probe=val_loader)
    ... loss.backward(); method.after_backward(); optimizer.step(); method.after_step() ...
    metrics = method.end_epoch()
    method.finalize()

Each method declares its options once, as a dataclass (`Method.Options`): the Python call,
``--method-args`` and YAML configs are checked through it before anything trains, and parsed
once (`from_options` builds a method from options parsed already). Each registers itself
beside its class (``@METHODS.register``); adding one is a new file and one import line here
(docs/adding-a-method.md).
"""
from __future__ import annotations

from ..options import OptionError
from .ap import AP
from .base import (
    METHODS,
    EpochResult,
    Method,
    MethodOptions,
    acting_on_shards,
    prunable_weights,
    weight_sparsity,
)
from .continual_backprop import ContinualBackprop
from .demp import DemP
from .iterative import IMP, IterativePruning
from .nnrelief import NNrelief
from .plasticity import L2Init, ShrinkPerturb
from .redo import ReDo
from .structured import StructuredPruning
from .synaptic_stripping import SynapticStripping

__all__ = ["AP", "ContinualBackprop", "DemP", "EpochResult", "IMP", "IterativePruning", "L2Init",
           "METHODS", "Method", "MethodOptions", "NNrelief", "OptionError", "ReDo", "ShrinkPerturb",
           "StructuredPruning", "SynapticStripping", "acting_on_shards", "build",
           "describe_options", "from_options", "method_options", "parse_options",
           "prunable_weights", "weight_sparsity"]


def _class(name: str) -> type[Method] | None:
    return METHODS.get(name)


def method_options(name: str) -> list[str]:
    """The option names method `name` accepts."""
    cls = _class(name)
    return [] if cls is None else sorted(row[0] for row in cls.Options.describe())


def describe_options(name: str) -> list[tuple[str, str, str, str]]:
    """(option, type and range, default, help) of method `name`, in declaration order."""
    cls = _class(name)
    return [] if cls is None else cls.Options.describe()


def build(name: str, **options) -> Method | None:
    """Method `name` with `options`, each checked (unknown names and bad values raise
    `OptionError` naming the option). ``build("none")`` is None: plain training."""
    cls = _class(name)
    if cls is None:
        if options:
            raise OptionError(f"method 'none' has no options; got {sorted(options)}")
        return None
    return cls(**options)


def from_options(name: str, options: MethodOptions | None) -> Method | None:
    """Method `name` from options parsed already (`parse_options`): nothing is parsed again."""
    cls = _class(name)
    return None if cls is None else cls(_parsed=options)


def parse_options(name: str, **options) -> MethodOptions | None:
    """Method `name`'s options, each converted and checked (as `build` does); None for
    ``none``."""
    method = build(name, **options)
    return None if method is None else method.opts
