"""Training-step time with the ActivityMonitor attached, as a ratio to the same step without it.

The variants of each model are timed interleaved in one process (round-robin, same data):
plain training, the monitor's default training-time mode (sampled: hooks attached on every
k-th step only), the exact mode (hooks on every step), the exact mode with its counting
compiled (`--fused`: ActivityMonitor(fused=True), one pass over each activation), and a
peer: the per-batch dormant-ratio hook plasticity codebases use (a forward hook on every
activation module computing ReDo's score, mean |a| per unit over the layer's mean, every
step; it sees activation modules only, not functional calls). Ratios are medians over
rounds of the per-round ratio to plain training.

    python benchmarks/monitor_overhead.py            # LeNet-300-100, small VGG, tiny ViT
    python benchmarks/monitor_overhead.py --every 10 --rounds 30 --fused
    git show REV:src/dormant/monitor.py > /tmp/old_monitor.py
    python benchmarks/monitor_overhead.py --models lenet300 --rounds 41 --against /tmp/old_monitor.py
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dormant import ActivityMonitor, find_sites
from dormant.experiments import ExperimentConfig
from dormant.models import build_model
from dormant.train.loop import synchronize

MODELS = {"lenet300": {}, "vgg-small": {}, "vit-tiny": {}}


def _steps(model, opt, xs, ys, monitor=None) -> float:
    synchronize(xs[0])         # on a GPU: time the work, not its queueing
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if monitor is not None:
            monitor.step()
    synchronize(xs[0])
    return time.perf_counter() - t0


ACTIVATIONS = (torch.nn.ReLU, torch.nn.GELU, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SiLU,
               torch.nn.Tanh)


class PeerDormantHooks:
    """The peer: forward hooks on activation modules computing, every step, ReDo's score per
    unit (mean |a| over the batch and positions, over the layer's mean) and the fraction of
    units at or below tau -- kept as tensors (no host sync), as a careful codebase would."""

    def __init__(self, model: torch.nn.Module, tau: float = 0.0):
        self.tau, self.ratios = tau, {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules()
                        if isinstance(m, ACTIVATIONS)]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            a = output.detach().abs()
            dims = (0, 2, 3) if a.ndim == 4 else tuple(range(a.ndim - 1))   # per channel / unit
            score = a.mean(dims)
            score = score / score.mean().clamp_min(1e-9)
            self.ratios[name] = (score <= self.tau).float().mean()
        return hook

    def step(self) -> None:
        pass

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def load_monitor(path: str):
    """Another version of dormant/monitor.py (e.g. from `git show REV:...`), imported as its
    own module next to the installed one, for an A/B in one process."""
    spec = importlib.util.spec_from_file_location("dormant._monitor_against", path)
    if spec is None:
        raise SystemExit(f"--against {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "dormant"               # its relative imports resolve in the package
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.ActivityMonitor


def bench(name: str, every: int, steps: int, rounds: int, batch: int, fused: bool,
          device: str = "cpu", against=None) -> dict:
    torch.manual_seed(0)
    base = build_model(name, (1, 28, 28), 10, **MODELS[name]).to(device)
    xs = [torch.randn(batch, 1, 28, 28, device=device) for _ in range(steps)]
    ys = [torch.randint(10, (batch,), device=device) for _ in range(steps)]
    sites = find_sites(base, xs[0][:2])
    variants = {}
    labels = (["plain", "sampled", "exact"] + (["fused"] if fused else []) + ["peer"]
              + (["against"] if against else []))
    for label in labels:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mon = None
        if label == "peer":
            mon = PeerDormantHooks(model)
        elif label == "against":
            mon = against(model, sites, every=1, mode="train").__enter__()
        elif label != "plain":
            mon = ActivityMonitor(model, sites, every_steps=every if label == "sampled" else 1,
                                  mode="train", fused=label == "fused").open()
        variants[label] = (model, opt, mon)
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for _ in range(2):                                     # warm-up
        for _label, (m, o, mon) in variants.items():
            _steps(m, o, xs, ys, mon)
    for _ in range(rounds):
        order = order[1:] + order[:1]                      # rotate who goes first
        for label in order:
            m, o, mon = variants[label]
            times[label].append(_steps(m, o, xs, ys, mon))
    for _, _, mon in variants.values():
        if mon is not None:
            mon.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratio per round (paired), then the median: robust to slow phases of the machine
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["plain"]))
             for k in labels[1:]}
    if against:
        ratio["exact/against"] = statistics.median(
            a / b for a, b in zip(times["exact"], times["against"]))
    return {"model": name, "step_ms": 1000 * med["plain"] / steps, "sites": len(sites),
            "peer_hooks": len(variants["peer"][2].handles), **ratio}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--every", type=int, default=ExperimentConfig().monitor_every,
                   help="sampled mode: watch every k-th step (default: the training default)")
    p.add_argument("--steps", type=int, default=40, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--against", metavar="MONITOR_PY",
                   help="also time the exact mode of another monitor.py (e.g. an older "
                        "version from git show) and print this one's step time over it")
    p.add_argument("--fused", action="store_true",
                   help="also time the exact mode with fused (compiled) counting; compiling "
                        "takes about a minute per model on a CPU")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.against and not os.path.isfile(args.against):
        p.error(f"--against {args.against}: no such file (e.g. git show "
                "REV:src/dormant/monitor.py > old_monitor.py)")
    against = load_monitor(args.against) if args.against else None
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps, sampled every {args.every} steps")
    cols = ["sampled (default)", "exact (every step)"] + (["exact, fused"] if args.fused
                                                           else []) + ["peer (per-batch hook)"]
    print(f"{'model':<10} {'sites':>5} {'step ms':>8} " + " ".join(f"{c:>21}" for c in cols))
    for name in args.models.split(","):
        r = bench(name, args.every, args.steps, args.rounds, args.batch_size, args.fused,
                  args.device, against)
        keys = ["sampled", "exact"] + (["fused"] if args.fused else []) + ["peer"]
        print(f"{r['model']:<10} {r['sites']:>5} {r['step_ms']:>8.2f} "
              + " ".join(f"{r[k]:>20.3f}x" for k in keys)
              + f"   (peer hooks: {r['peer_hooks']})"
              + (f"; exact, {args.against}: {r['against']:.3f}x, this exact / that one "
                 f"{r['exact/against']:.3f}x" if against else ""), flush=True)


if __name__ == "__main__":
    main()
