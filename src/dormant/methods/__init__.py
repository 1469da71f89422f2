"""Methods on dead neurons, one file each, behind a registry.

A method is built as ``METHODS.build(name, **options)`` and returns a list of training
callbacks (`dormant.train.Callback`): prepare in ``on_fit_start``, observe through the
monitor, decide and apply in ``on_epoch_end``/``on_step_end``, finalize in ``on_fit_end``.
"""
from __future__ import annotations

from ..registry import Registry

__all__ = ["METHODS", "build_method"]

METHODS = Registry("method")


@METHODS.register("none")
def none() -> list:
    """Plain training (the baseline)."""
    return []


def build_method(name: str, **options) -> list:
    """Callbacks for method `name`; unknown options are refused with the valid ones."""
    import inspect
    fn = METHODS.get(name)
    valid = set(inspect.signature(fn).parameters)
    bad = sorted(set(options) - valid)
    if bad:
        raise ValueError(f"method {name!r} has no option(s) {bad}; valid: {sorted(valid) or 'none'}")
    return fn(**options)
