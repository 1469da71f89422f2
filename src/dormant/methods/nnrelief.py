"""NNrelief (Dekhovich, Tax, Sluiter & Bessa, "Neural network relief: a pruning algorithm
based on neural activity", Machine Learning 113, 2024; arXiv 2109.10795).

Rule implemented (official code `adekhovich/NNrelief`): at every iteration, in eval mode, run
a fixed pruning set (N training samples) through the network with the masks of the previous
iteration and record each Conv layer's input; then, with this iteration's conv pruning
applied, run it again and record each Linear layer's input (the official `lenet_pruning` /
`vgg_pruning` recompute the features after pruning the convolutions and score the fully
connected layers on them; a model without convolutions needs one pass). Dead units are found
on the same passes: conv sites on the first, the others on the second.
* Linear, connection i -> j: s_ij = mean_n |w_ij x_ni|, bias score |b_j|.
* Conv, kernel K_ji (input channel i -> filter j): by default the code's VGG/ResNet form
  ||K^_ji * mean_n |x_n,i| ||_F (K^ = |K|, * = the layer's convolution), bias score
  |b_j| sqrt(H'W'); `conv_score="sum"` sums over positions instead of the norm (the code's
  LeNets), `conv_score="per-sample"` takes mean_n ||K^_ji * |x_n,i| ||_F (the paper).
* Per unit (every Linear row / Conv filter, the classifier included), sort its scores with
  the bias as one more candidate in descending order; keep the shortest prefix whose
  cumulative score reaches alpha of the unit's total (alpha_fc / alpha_conv) and prune every
  entry <= the next score (ties at the threshold are pruned, as in the code).
* A unit that is never active on the pruning set is pruned whole (incoming weights, bias,
  norm scale and offset).
* Backward pass, from the last site to the first: a unit with no outgoing weight left loses
  its incoming weights, bias and norm parameters.
Then the survivors are rewound to initialisation (LeNets) or fine-tuned (rewind="none"),
retrained for `epochs_per_round` epochs, and the epoch with the best *validation* accuracy of
each retraining is restored before the next iteration.

Deviations from the official code:
* the best retraining epoch is chosen on a validation split carved from the training data,
  never on the test set (the code picks it on test);
* the ResNet-specific rule that cuts residual channels or shortcuts is not implemented; the
  backward pass skips units on a residual stream, and units of a site whose readers are not
  all known (`Site.consumers_complete`), since it cannot see all their readers;
* a layer the probe pass never calls as a module (``nn.MultiheadAttention``'s ``out_proj``,
  applied functionally inside the attention) has no recorded input and is left unpruned;
* a dead unit's norm layer gets scale and offset masked to zero (its output is then 0 whatever
  its running statistics), instead of also zeroing the running statistics.
* a gated unit (``act(gate) * up -> down``, not in the paper): the gate and the up projection
  are each scored as an incoming layer (contributions |w_ij x_j| of that projection; a fused
  gate/up layer is one layer, so each of its rows keeps alpha of its own input); a unit dead
  on the pruning set, or whose gate row or up row loses every connection, is pruned whole
  (gate row, up row, down column); down's columns are scored as its incoming connections.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batching import Forward, default_forward, eval_mode, num_samples, to_device
from ..options import option
from ..sharding import local, resharded, rows
from ..sites import CONVS, _unwrap, is_conv1d
from ..units import as_rows, from_rows, incoming, outgoing, tensor, unit_mask_for
from .base import METHODS
from .iterative import IterativePruning, RoundOptions

__all__ = ["NNrelief", "relief_keep", "linear_scores", "conv_scores", "layer_inputs"]

CONV_SCORES = ("norm", "sum", "per-sample")


def relief_keep(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Keep-mask (units, candidates): per row, the smallest prefix of the descending scores
    whose cumulative sum reaches alpha of the row total; entries <= the next score go."""
    s, _ = scores.sort(dim=1, descending=True)
    total = s.sum(1, keepdim=True)
    pivot = (s.cumsum(1) < alpha * total).sum(1, keepdim=True)      # index of the crossing
    threshold = s.gather(1, pivot.add(1).clamp_max(s.shape[1] - 1))
    return scores > threshold


def linear_scores(weight: torch.Tensor, bias: torch.Tensor | None, mean_abs_x: torch.Tensor):
    """Scores (out, in [+1 bias column]) of a Linear layer: |w_ij| mean_n |x_ni|, |b_j|."""
    s = weight.detach().abs() * mean_abs_x[None, :]
    if bias is not None:
        s = torch.cat([s, bias.detach().abs()[:, None]], 1)
    return s


def conv_scores(conv: nn.Module, x_stat: torch.Tensor, form: str) -> torch.Tensor:
    """Scores (filters, in_channels [+1 bias]) of a ConvNd. `x_stat` is mean_n |x_n| of shape
    (C_in, *spatial) for forms "norm"/"sum", or |x| of shape (N, C_in, *spatial) for
    "per-sample" (then the per-sample norms are averaged)."""
    w = conv.weight.detach().abs()
    cout, cin = w.shape[:2]
    if conv.groups != 1:
        raise NotImplementedError("NNrelief scores for grouped convolutions are not implemented")
    conv_fn = getattr(F, f"conv{w.ndim - 2}d")
    wg = w.transpose(0, 1).reshape(cin * cout, 1, *w.shape[2:])       # (i, j) pairs as groups
    x = x_stat if form == "per-sample" else x_stat.unsqueeze(0)
    y = conv_fn(x, wg, None, conv.stride, conv.padding, conv.dilation, groups=cin)
    y = y.flatten(2)                                                   # (N, cin*cout, H'W')
    red = y.sum(2) if form == "sum" else y.norm(dim=2)
    s = red.mean(0).view(cin, cout).t()                                # (cout, cin)
    if conv.bias is not None:
        npos = y.shape[2]
        scale = npos if form == "sum" else math.sqrt(npos)
        s = torch.cat([s, conv.bias.detach().abs()[:, None] * scale], 1)
    return s


@contextlib.contextmanager
def _masked(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Apply keep-masks to the model's tensors for the block, then put the values back (under
    FSDP2: each rank's rows, which its forward gathers)."""
    saved = {}
    with torch.no_grad():
        for name, keep in masks.items():
            t = tensor(resharded(model), name)
            saved[name] = local(t).detach().clone()
            local(t).mul_(rows(t, keep).to(t.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                local(tensor(resharded(model), name)).copy_(value)


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: Iterable[Any], names: list[str], per_sample: bool,
                 forward: Forward = default_forward) -> dict[str, torch.Tensor]:
    """Eval-mode statistics of each named Linear/Conv layer's input over the probe
    `batches`: mean_n |x_n| per feature (Linear) or per (channel, position) (Conv); with
    `per_sample`, Conv layers get |x_n| of every sample instead."""
    model = _unwrap(model)
    sums: dict[str, torch.Tensor] = {}
    keep: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in names:
        m = model.get_submodule(name)

        def hook(mod, inputs, name=name):
            a = inputs[0].detach().abs()
            if isinstance(mod, CONVS):
                if per_sample:
                    keep.setdefault(name, []).append(a)
                    return
                a = a.sum(0)
            else:
                a = a.flatten(0, -2).sum(0) * (a.shape[0] / max(a[..., 0].numel(), 1))
            sums[name] = sums[name] + a if name in sums else a
        handles.append(m.register_forward_pre_hook(hook))
    n = 0
    try:
        with eval_mode(model):
            for batch in batches:
                forward(model, batch)
                n += num_samples(batch)
    finally:
        for h in handles:
            h.remove()
    out = {k: v / n for k, v in sums.items()}
    out.update({k: torch.cat(v) for k, v in keep.items()})
    return out


@METHODS.register
class NNrelief(IterativePruning):
    """Keep, per unit, the connections that carry a fraction alpha of its input activity.

    alpha_fc / alpha_conv: kept share of each unit's importance (0.95 / 0.9);
    conv_score: "norm" (code, VGG/ResNet), "sum" (code, LeNets) or "per-sample" (paper).
    Defaults: rewind to init (as for LeNets; use rewind="none" to fine-tune), best epoch of
    each retraining on the validation split, pruning set = the first 1000 training samples.
    """

    name = "nnrelief"

    @dataclass
    class Options(RoundOptions):
        keep_best: bool = option(True, "restore each retraining's epoch with the best "
                                 "validation score before pruning (end_epoch(val_score=...))")
        probe: str = option("train", "split the Trainer and the command line hand over as the "
                            "pruning set; in your own loop you pass the data to prepare()",
                            choices=("train", "val"))
        probe_samples: int | None = option(1000, "samples of the pruning set (the first N)",
                                           at_least=1)
        alpha_fc: float = option(0.95, "kept share of each Linear unit's input importance",
                                 within=(0, 1), bounds="(]")
        alpha_conv: float = option(0.9, "kept share of each Conv filter's input importance",
                                   within=(0, 1), bounds="(]")
        conv_score: str = option("norm", "Conv kernel score: norm (code, VGG/ResNet), sum "
                                 "(code, LeNets), per-sample (paper)", choices=CONV_SCORES)

    def _prepare(self) -> None:
        super()._prepare()
        model = _unwrap(self.model)
        grouped = [n for n in self.names if getattr(model.get_submodule(n[:-len(".weight")]),
                                                     "groups", 1) != 1]
        if grouped:
            raise ValueError(f"{self.name}: {grouped} are grouped convolutions; NNrelief's "
                             "kernel scores for them are not implemented")
        params = dict(model.named_parameters())
        for n in self.names:     # biases are candidates too: give them masks
            b = n[:-len("weight")] + "bias"
            if b in params and b not in self.masks.masks:
                self.masks.update(b, torch.ones(params[b].shape, dtype=torch.bool,
                                                device=params[b].device))

    # -- the decision --------------------------------------------------------------------
    def decide(self, rnd: int) -> dict[str, torch.Tensor]:
        """Conv layers first, on one pass with the previous masks; then, as the official
        code does, the fully connected layers on features recomputed with this iteration's
        conv pruning applied (a model without convolutions needs one pass)."""
        model = _unwrap(self.model)
        layers = [n[:-len(".weight")] for n in self.names]
        convs = [n for n in layers if isinstance(model.get_submodule(n), CONVS)]
        fcs = [n for n in layers if n not in convs]
        new: dict[str, torch.Tensor] = {}
        stats, dead = self._pass(model, layers)
        with self.editing(state=False):     # under FSDP2 the parameters are read whole
            self._score(model, convs, stats, new)
            self._drop_dead(model, dead, new, convs)
        if convs and fcs:
            with _masked(model, new):
                stats, dead = self._pass(model, fcs)
        with self.editing(state=False):
            self._score(model, fcs, stats, new)
            self._drop_dead(model, dead, new, fcs)
            self._backward_pass(model, new)
        return new

    def _pass(self, model, layers: list[str]) -> tuple[dict, dict]:
        """One probe pass: the inputs of `layers` and the dead units of every site."""
        per_sample = self.opts.conv_score == "per-sample"
        with torch.random.fork_rng(devices=[]):     # a DataLoader draws a seed per pass
            stats = layer_inputs(model, self.probe_batches(500), layers, per_sample,
                                 self._forward_on_device)
        return stats, self.observe().dead_units("never_active")

    def _score(self, model, layers: list[str], stats: dict, new: dict) -> None:
        """Keep-masks of `layers` (weights and biases) from their input statistics."""
        for layer in layers:
            if layer not in stats:   # never called as a layer (nn.MultiheadAttention's
                continue             # out_proj is applied functionally): left unpruned
            m = model.get_submodule(layer)
            if isinstance(m, CONVS):
                s, alpha = conv_scores(m, stats[layer], self.opts.conv_score), self.opts.alpha_conv
            else:
                w = as_rows(m, m.weight)             # (out, in); Conv1D stores (in, out)
                s, alpha = linear_scores(w, m.bias, stats[layer]), self.opts.alpha_fc
            keep = relief_keep(s, alpha)
            w_keep = keep[:, :s.shape[1] - (m.bias is not None)]
            new[f"{layer}.weight"] = (from_rows(m, w_keep) if is_conv1d(m)
                                      else self._expand(w_keep, m.weight))
            if m.bias is not None:
                new[f"{layer}.bias"] = keep[:, -1]

    def _drop_dead(self, model, dead: dict, new: dict, layers: list[str]) -> None:
        """Dead units of the sites whose producer is one of `layers` go whole."""
        for site in self.sites:
            if site.producer in layers and f"{site.producer}.weight" in new:
                self._drop_units(model, site, dead[site.name], new)

    def _forward_on_device(self, model: nn.Module, batch: Any) -> Any:
        return self.forward(model, to_device(batch, next(model.parameters()).device))

    @staticmethod
    def _expand(keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) kernel decisions -> a mask shaped like the weight."""
        return keep.view(*keep.shape, *[1] * (weight.ndim - 2)).expand_as(weight)

    def _drop_units(self, model, site, units: torch.Tensor, new: dict) -> None:
        """Prune every incoming weight, bias and norm parameter of `units`."""
        if not units.any():
            return
        for sl in incoming(model, site, stats=False):
            where = unit_mask_for(model, sl, units, site.num_units)
            if sl.name not in new:
                new[sl.name] = self.masks.masks.get(
                    sl.name, torch.ones_like(tensor(model, sl.name), dtype=torch.bool)).clone()
            new[sl.name] = new[sl.name] & ~where

    def _rows_alive(self, model, site, new: dict) -> torch.Tensor:
        """Per unit: every incoming weight row (gate and up) keeps a connection."""
        alive = torch.ones(site.num_units, dtype=torch.bool)
        for sl in incoming(model, site, stats=False):
            if sl.kind != "weight":
                continue
            mask = new.get(sl.name, self.masks.masks.get(sl.name))
            if mask is None:
                continue
            alive &= sl.units_of(mask.movedim(sl.dim, 0).flatten(1).any(1).cpu(), site.num_units)
        return alive

    def _backward_pass(self, model, new: dict) -> None:
        """From the last site back: units whose outgoing weights are all pruned go."""
        for site in reversed(self.sites):
            if site.gated:         # a gated unit whose gate or up row lost every input goes
                self._drop_units(model, site, ~self._rows_alive(model, site, new), new)
            # a unit read by something unknown (or a residual stream) may still be used
            slices = outgoing(model, site) if not site.residual and site.consumers_complete else []
            if not slices or any(sl.name not in new for sl in slices):
                continue
            has_out = torch.zeros(site.num_units, dtype=torch.bool,
                                  device=new[slices[0].name].device)
            for sl in slices:
                if sl.conv_groups > 1:    # a filter reads only its group: per input channel
                    w = new[sl.name].flatten(2).any(2)                       # (out, C/g)
                    g = sl.conv_groups
                    has_out |= w.view(g, -1, w.shape[1]).any(1).flatten()
                    continue
                keep = new[sl.name].movedim(sl.dim, 0).flatten(1).any(1)   # per column
                if sl.group > 1:
                    keep = (keep.view(-1, sl.group) if sl.layout == "block"
                            else keep.view(sl.group, -1).t()).any(1)
                has_out |= keep
            self._drop_units(model, site, ~has_out, new)
