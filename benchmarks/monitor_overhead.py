"""Training-step time with the ActivityMonitor attached, as a ratio to the same step without it.

Three variants of each model are timed interleaved in one process (round-robin, same data):
plain training, the monitor's default training-time mode (sampled: hooks attached on every
k-th step only), and the exact mode (hooks on every step). Ratios are medians over rounds.

    python benchmarks/monitor_overhead.py            # LeNet-300-100, small VGG, tiny ViT
    python benchmarks/monitor_overhead.py --every 10 --rounds 30
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from dormant import ActivityMonitor, find_sites
from dormant.experiments import ExperimentConfig
from dormant.models import build_model

MODELS = {"lenet300": {}, "vgg-small": {}, "vit-tiny": {}}


def _steps(model, opt, xs, ys, monitor=None) -> float:
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if monitor is not None:
            monitor.step()
    return time.perf_counter() - t0


def bench(name: str, every: int, steps: int, rounds: int, batch: int) -> dict:
    torch.manual_seed(0)
    base = build_model(name, (1, 28, 28), 10, **MODELS[name])
    xs = [torch.randn(batch, 1, 28, 28) for _ in range(steps)]
    ys = [torch.randint(10, (batch,)) for _ in range(steps)]
    sites = find_sites(base, xs[0][:2])
    variants = {}
    for label in ("plain", "sampled", "exact"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mon = None
        if label != "plain":
            mon = ActivityMonitor(model, sites, every=every if label == "sampled" else 1,
                                  mode="train").__enter__()
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
             for k in ("sampled", "exact")}
    return {"model": name, "step_ms": 1000 * med["plain"] / steps,
            "sampled": ratio["sampled"], "exact": ratio["exact"], "sites": len(sites)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--every", type=int, default=ExperimentConfig().monitor_every,
                   help="sampled mode: watch every k-th step (default: the training default)")
    p.add_argument("--steps", type=int, default=40, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps, sampled every {args.every} steps")
    print(f"{'model':<10} {'sites':>5} {'step ms':>8} {'sampled (default)':>18} {'exact (every step)':>19}")
    for name in args.models.split(","):
        r = bench(name, args.every, args.steps, args.rounds, args.batch_size)
        print(f"{r['model']:<10} {r['sites']:>5} {r['step_ms']:>8.2f} {r['sampled']:>17.3f}x "
              f"{r['exact']:>18.3f}x", flush=True)


if __name__ == "__main__":
    main()
