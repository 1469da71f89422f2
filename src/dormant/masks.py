"""Weight masks that compose: pruned stays pruned.

`Masks` holds one boolean mask per parameter (by qualified name). It is a plain object, not
state on the model, so a model with masks applied is an ordinary model: deepcopy, state_dict
and ``torch.load(weights_only=True)`` work on both, and `Masks.state_dict()` round-trips;
``copy.deepcopy(masks)`` copies its model with it.
`attach(optimizer)` re-applies the masks after every optimizer step and zeroes the masked
gradients before it (so momentum/Adam moments of pruned weights stay zero); `detach()`
removes those hooks. Interop: `to_torch_prune` / `from_torch_prune` convert to and from
``torch.nn.utils.prune``'s ``weight_orig`` / ``weight_mask`` reparametrisation.

Under FSDP2 the masks stay whole (shaped like the full parameter, the same on every rank);
each rank applies its own rows of them to its shard of the parameter and of its gradient.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from .sharding import full, is_fsdp, is_sharded, local, resharded, rows

__all__ = ["Masks"]


class Masks:
    """Boolean masks keyed by parameter name (True = kept)."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self._params = dict(model.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._fsdp = is_fsdp(model)     # parameters looked up by name: FSDP2 swaps them
        for name, m in (masks or {}).items():
            self.update(name, m)

    @classmethod
    def ones(cls, model: nn.Module, names: Iterable[str]) -> "Masks":
        params = dict(model.named_parameters())
        return cls(model, {n: torch.ones_like(params[n], dtype=torch.bool) for n in names})

    def _param(self, name: str) -> torch.Tensor:
        if name not in self._params:
            raise KeyError(f"no parameter {name!r}; parameters: {sorted(self._params)}")
        return self.model.get_parameter(name) if self._fsdp else self._params[name]

    def update(self, name: str, mask: torch.Tensor) -> None:
        """Compose `mask` into the mask of `name` (logical AND: pruned stays pruned)."""
        p = self._param(name)
        mask = full(mask).to(device=p.device, dtype=torch.bool)
        if mask.shape != p.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, "
                             f"parameter has {tuple(p.shape)}")
        old = self.masks.get(name)
        self.masks[name] = mask.clone() if old is None else old & mask

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight in place."""
        if not self._fsdp:                # every step: the plain path first
            for name, m in self.masks.items():
                self._params[name].mul_(m)
            return
        resharded(self.model)             # the root's parameters stay whole after a forward
        for name, m in self.masks.items():
            p = self._param(name)
            local(p).mul_(rows(p, m))

    @torch.no_grad()
    def mask_grads(self) -> None:
        for name, m in self.masks.items():
            p = self._param(name)
            if p.grad is not None:
                if self._fsdp and is_sharded(p.grad):
                    local(p.grad).mul_(rows(p, m))
                else:
                    p.grad.mul_(m)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Masks":
        """Mask gradients before and re-apply masks after every `optimizer.step()`."""
        self.detach()
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self.mask_grads()),
            optimizer.register_step_post_hook(lambda *_: self.apply()),
        ]
        self.apply()
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- summaries -----------------------------------------------------------------------
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def sparsity(self, per_param: bool = False) -> float | dict[str, float]:
        """Fraction of masked-out weights (over the masked parameters)."""
        if per_param:
            return {n: 1.0 - m.float().mean().item() for n, m in self.masks.items()}
        return 1.0 - self.kept() / max(self.total(), 1)

    # -- persistence and interop ---------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.clone() for n, m in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.masks = {}
        for n, m in state.items():
            self.update(n, m)

    def __getstate__(self) -> dict:
        # deepcopy/pickle copy the model together with the masks; optimizer hooks stay behind.
        state = dict(self.__dict__)
        state["_handles"] = []
        return state

    def bind(self, model: nn.Module) -> "Masks":
        """The same masks for another model with the same parameter names (e.g. a copy)."""
        return Masks(model, self.state_dict())

    def to_torch_prune(self) -> None:
        """Export: reparametrise each masked parameter with torch.nn.utils.prune."""
        for name, m in self.masks.items():
            module, attr = self._owner(name)
            prune.custom_from_mask(module, attr, m)

    @classmethod
    def from_torch_prune(cls, model: nn.Module, remove: bool = True) -> "Masks":
        """Import ``*_mask`` buffers of torch.nn.utils.prune; with `remove`, make the pruning
        permanent so the model is plain again (the masks then live in the returned object)."""
        found = {}
        for mod_name, module in model.named_modules():
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    attr = hook._tensor_name
                    found[(mod_name, attr)] = getattr(module, attr + "_mask").detach().bool()
                    if remove:
                        prune.remove(module, attr)
        out = cls(model)
        for (mod_name, attr), m in found.items():
            out.update(f"{mod_name}.{attr}" if mod_name else attr, m)
        return out

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        mod_name, _, attr = name.rpartition(".")
        return self.model.get_submodule(mod_name), attr
