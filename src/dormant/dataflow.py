"""Site discovery from real data flow, for models torch.fx cannot trace.

One eval-mode forward of the example runs under a `TorchFunctionMode` that records every torch
function and tensor method called outside the layers dormant knows (producers, norms,
activations, dropout/identity, pools, flatten), while module hooks record those layers' calls.
Every tensor is keyed by ``(id, version)``, so in-place updates (``x += r``, ``ReLU(inplace)``)
make new values, and all tensors are kept alive during the trace so no id is reused. An
activation's producer, norm and residual membership are then read back along the tensors its
input came from, and its consumers forward along the tensors its output went to: a pairing is
only ever reported when data flowed that way. A reader that is not understood (a permute, an
indexing, a matmul with another tensor) marks the site's consumers as incomplete instead of
being skipped, so methods that rewrite outgoing weights can refuse the site.

Functional activations (``F.relu`` inside a Hugging Face block, ``activation="relu"`` of
``nn.TransformerEncoderLayer``) are seen here too. PyTorch's fused fast path of the encoder
layer (eval mode, no grad) calls none of its submodules; `no_fastpath` turns it off while
dormant traces or probes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .batching import eval_mode

__all__ = ["no_fastpath", "trace_dataflow", "Event", "Dataflow"]

# a tensor value: (id(tensor), tensor._version) when recorded here; sites.py reads an fx graph
# into the same structure with its nodes as keys
Key = Hashable


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Turn off the fused fast path of nn.TransformerEncoderLayer / MultiheadAttention (it
    skips every submodule, so no hook would see the units)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@dataclass
class Event:
    """One recorded call: a known layer (`module` set) or a torch function / tensor method."""
    index: int
    inputs: list[Key]
    outputs: list[Key]
    module: str | None = None          # qualified name of a recorded layer
    call_index: int = 0                # which call of that module
    func: Callable | None = None       # the torch function or method
    name: str = ""                     # the function's name (add, relu, view, ...)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shape: tuple = ()                  # shape of the first output


@dataclass
class Dataflow:
    events: list[Event]
    producer: dict[Key, Event]         # which event made a tensor value
    readers: dict[Key, list[Event]]    # which events read it, in call order
    calls: dict[str, int]              # calls per recorded module

    def add(self, ev: Event) -> None:
        self.events.append(ev)
        for k in ev.inputs:
            if k not in ev.outputs:
                self.readers.setdefault(k, []).append(ev)
        for k in ev.outputs:
            if k not in ev.inputs:      # an op that returns its input unchanged (x.to(x.dtype))
                self.producer[k] = ev


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _key(t: torch.Tensor) -> tuple[int, int]:
    # inference tensors (under torch.inference_mode) have no version counter: in-place
    # updates of them are rare in a forward pass and keep one key
    return id(t), (0 if t.is_inference() else t._version)


class _Recorder(TorchFunctionMode):
    def __init__(self, flow: Dataflow, keep: list):
        super().__init__()
        self.flow, self.keep, self.inside = flow, keep, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside:
            return func(*args, **kwargs)
        ins = _tensors((args, kwargs))
        in_keys = [_key(t) for t in ins]
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if outs:
            self.keep.extend(ins + outs)
            self.flow.add(Event(len(self.flow.events), in_keys, [_key(t) for t in outs],
                                func=func, name=getattr(func, "__name__", str(func)),
                                args=args, kwargs=kwargs, shape=tuple(outs[0].shape)))
        return out


def trace_dataflow(model: nn.Module, example: Any, recorded: Callable[[nn.Module], bool]
                   ) -> Dataflow:
    """Run `example` (a tensor, a tuple of positional inputs or a mapping of keyword inputs)
    through `model` once, in eval mode under no_grad, recording the calls of the modules for
    which `recorded(module)` is True and every torch call made outside them."""
    flow = Dataflow([], {}, {}, {})
    keep: list[torch.Tensor] = []
    rec = _Recorder(flow, keep)
    pending: dict[int, list] = {}
    handles = []
    for name, m in model.named_modules():
        if not recorded(m):
            continue

        def pre(mod, args, kwargs, name=name):
            ins = _tensors((args, kwargs))[:1]      # the layer's input: its first tensor
            keep.extend(ins)
            pending.setdefault(id(mod), []).append([_key(t) for t in ins])
            rec.inside += 1

        def post(mod, args, kwargs, out, name=name):
            rec.inside -= 1
            outs = _tensors(out)[:1]
            keep.extend(outs)
            idx = flow.calls.get(name, 0)
            flow.calls[name] = idx + 1
            flow.add(Event(len(flow.events), pending[id(mod)].pop(), [_key(t) for t in outs],
                           module=name, call_index=idx,
                           shape=tuple(outs[0].shape) if outs else ()))
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad(), no_fastpath(), rec:
            if isinstance(example, Mapping):
                model(**example)
            else:
                model(*(example if isinstance(example, tuple) else (example,)))
    finally:
        for h in handles:
            h.remove()
    return flow
