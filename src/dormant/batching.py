"""Probe data and the forward call: how any batch a user has becomes a model call.

Probe data (what a method or `probe`/`diagnose` runs through the model) may be

* a tensor of inputs (cut into batches of `batch_size`);
* a ``tuple`` ``(inputs, targets)`` of tensors with the same first dimension (the inputs are
  used; a *list* is never taken for a pair: ``[b1, b2]`` is two batches);
* a mapping of tensors (Hugging Face style: ``{"input_ids": ..., "attention_mask": ...}``),
  cut into batches along the first dimension;
* an object with an ``inputs`` tensor (a `dormant.data.Split`);
* any re-iterable of batches: a ``DataLoader``, a list. A batch is a tensor, a mapping of
  model inputs, or a tuple/list ``(inputs, targets, ...)``.

One function turns a batch into a forward call, `default_forward`, and it is explicit:
a tensor is called as ``model(x)``, a mapping as ``model(**batch)``, a tuple or list as
``model(batch[0])`` (the rest are targets). Anything else -- inputs spread over several
positional arguments, a batch whose first element is not the model input -- needs
``forward=lambda model, batch: ...``, passed wherever probe data is taken.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

__all__ = ["Forward", "capture_inputs", "default_forward", "eval_mode", "iter_batches",
           "model_input", "num_samples", "probe_example", "take", "to_device"]

Forward = Callable[[nn.Module, Any], Any]


def model_input(batch: Any) -> Any:
    """The part of a batch that the default forward call feeds the model."""
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"cannot call a model on a batch of type {type(batch).__name__}: give a "
                    "tensor, a mapping of model inputs, an (inputs, targets) tuple, or pass "
                    "forward=lambda model, batch: ...")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(x)`` for a tensor, ``model(**batch)`` for a mapping, ``model(batch[0])`` for
    a tuple/list (inputs, targets, ...). A tuple whose second element is shaped like the
    first, for a model that takes more inputs, gets a warning: it may be an input (a mask)."""
    x = model_input(batch)
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and _input_like(batch) \
            and _more_inputs(model):
        warnings.warn(f"dormant: a {type(batch).__name__} batch is called as model(batch[0]), "
                      f"the rest taken for targets, but {type(model).__name__}.forward takes "
                      "more inputs: if batch[1] is one (an attention mask), pass "
                      "forward=lambda model, b: model(*b) (or a mapping batch)", stacklevel=2)
    return model(x)


def _input_like(batch) -> bool:
    a, b = batch[0], batch[1]
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape


def _more_inputs(model: nn.Module) -> bool:
    """True when forward() names a second input besides the first (self excluded)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(named) > 1


def num_samples(batch: Any) -> int:
    """Samples in a batch (the first dimension of its model input)."""
    x = model_input(batch)
    if isinstance(x, Mapping):
        x = next(v for v in x.values() if isinstance(v, torch.Tensor))
    return int(x.shape[0])


def take(batch: Any, n: int) -> Any:
    """The first `n` samples of a batch, same structure (tensors cut on dim 0)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: take(v, n) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(v, n) if isinstance(v, torch.Tensor) else v for v in batch)
    return batch


def drop(batch: Any, n: int) -> Any:
    """A batch without its first `n` samples, same structure (the rest of `take`)."""
    if isinstance(batch, torch.Tensor):
        return batch[n:]
    if isinstance(batch, Mapping):
        return {k: drop(v, n) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(drop(v, n) if isinstance(v, torch.Tensor) else v for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch (nested in mappings, tuples, lists) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args_, self.kwargs = args, kwargs


def capture_inputs(model: nn.Module, batch: Any, forward: Forward = default_forward) -> Any:
    """The inputs `forward(model, batch)` gives the model, as site discovery and surgery take
    them: a tensor (one positional input) or a mapping of keyword inputs (positional ones
    bound to their parameter names). The model itself does not run."""
    def grab(module, args, kwargs):
        raise _Captured(args, kwargs)
    # first of the pre-hooks: FSDP2's would gather the root's parameters for a forward that
    # never ends, and leave them so
    handle = model.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        forward(model, batch)
    except _Captured as c:
        args, kwargs = c.args_, c.kwargs
    else:
        raise ValueError("forward(model, batch) did not call the model")
    finally:
        handle.remove()
    if not kwargs and len(args) == 1:
        return args[0]
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def _is_pair(data: Any) -> bool:
    return (isinstance(data, tuple) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)
            and data[0].ndim >= 1 and data[1].ndim >= 1 and data[0].shape[0] == data[1].shape[0])


def _chunks(data, batch_size: int) -> Iterator[Any]:
    """A whole set (tensor or mapping of tensors) cut into batches along dim 0."""
    n = num_samples(data)
    for i in range(0, n, batch_size):
        yield (data[i:i + batch_size] if isinstance(data, torch.Tensor)
               else {k: v[i:i + batch_size] if isinstance(v, torch.Tensor) else v
                     for k, v in data.items()})


def iter_batches(data: Any, batch_size: int = 512, limit: int | None = None) -> Iterator[Any]:
    """Batches of probe `data` (see the module docstring), at most `limit` samples in all
    (the last batch is cut). Targets in an ``(inputs, targets)`` pair are dropped; batches of
    an iterable are yielded as they are (the forward call picks the inputs)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, (torch.Tensor, Mapping)):
        source = _chunks(data, batch_size)
    elif _is_pair(data):
        source = _chunks(data[0], batch_size)
    elif isinstance(getattr(data, "inputs", None), torch.Tensor):
        source = _chunks(data.inputs, batch_size)
    elif hasattr(data, "__iter__"):
        if iter(data) is data:
            raise TypeError("probe data must be re-iterable (a DataLoader, a list, a tensor): "
                            "a generator or iterator is used up after one pass")
        source = iter(data)
    else:
        raise TypeError(f"probe data of type {type(data).__name__} is not supported: give a "
                        "tensor, an (inputs, targets) tuple, a mapping of tensors, or an "
                        "iterable of batches (a DataLoader)")
    seen = 0
    for batch in source:
        if limit is not None:
            if seen >= limit:
                return
            n = num_samples(batch)
            if seen + n > limit:
                batch = take(batch, limit - seen)
            seen += min(n, limit - seen)
        yield batch


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block; every module's train flag is restored after it
    (so a probe or a trace moves no running statistics and changes no mode)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def probe_example(model: nn.Module, probe: Any, forward: Forward = default_forward,
                  n: int = 2) -> Any:
    """The model's inputs for the first `n` samples of probe data (what `forward` passes
    the model; see `capture_inputs`), on the model's device; the global random state is left
    alone (a DataLoader draws from it each time it is iterated). None if the probe is empty."""
    with torch.random.fork_rng(devices=[]):
        first = next(iter_batches(probe, n, limit=n), None)
    if first is None:
        return None
    device = next(model.parameters()).device
    return to_device(capture_inputs(model, to_device(first, device), forward), device)
