"""Methods on dead neurons, one file each, behind a registry.

A method is built as ``build_method(name, **options)`` and returns a list of training
callbacks (`dormant.train.Callback`): prepare in ``on_fit_start``, observe with exact probe
passes, decide and apply in ``on_epoch_end``/``on_step_end``, finalize in ``on_fit_end``.
"""
from __future__ import annotations

import inspect

from ..registry import Registry
from .base import Method, prunable_weights, weight_sparsity
from .ap import AP
from .demp import DemP
from .iterative import IMP, IterativePruning
from .nnrelief import NNrelief
from .redo import ReDo
from .structured import StructuredPruning
from .synaptic_stripping import SynapticStripping

__all__ = ["AP", "DemP", "IMP", "StructuredPruning", "IterativePruning", "METHODS", "Method", "NNrelief", "ReDo",
           "SynapticStripping", "build_method", "method_options",
           "prunable_weights", "weight_sparsity"]

METHODS = Registry("method")


@METHODS.register("none")
def none() -> list:
    """Plain training (the baseline)."""
    return []


METHODS.register("synaptic-stripping")(SynapticStripping)
METHODS.register("redo")(ReDo)
METHODS.register("imp")(IMP)
METHODS.register("ap")(AP)
METHODS.register("nnrelief")(NNrelief)
METHODS.register("demp")(DemP)
METHODS.register("structured")(StructuredPruning)


def method_options(name: str) -> list[str]:
    """The option names method `name` accepts."""
    fn = METHODS.get(name)
    if isinstance(fn, type):
        names: list[str] = []
        for klass in fn.__mro__:
            if "__init__" in vars(klass) and klass is not object:
                names += [p for p, v in inspect.signature(klass.__init__).parameters.items()
                          if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
        return sorted(set(names) - set(getattr(fn, "hidden_options", ())))
    return sorted(inspect.signature(fn).parameters)


def build_method(name: str, **options) -> list:
    """Callbacks for method `name`; unknown options are refused with the valid ones."""
    valid = method_options(name)
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(f"method {name!r} has no option(s) {bad}; valid: {valid or 'none'}")
    out = METHODS.get(name)(**options)
    return [out] if isinstance(out, Method) else list(out)
