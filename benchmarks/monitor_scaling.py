"""How the monitor's cost grows with the model: a ResNet-50-sized CNN and a GPT-2-small-sized
transformer (the stock config: tanh-approximated GELU in its MLP blocks, counted on the
monitor's signed path; `--gpt2-activation relu` for the non-negative one), both built from
their `transformers` config (random weights, nothing downloaded), at two batch sizes each.

Per model and batch size, printed as ratios measured in one process:

- training-step time with the monitor watching every step (exact) and every 10th step
  (sampled, the training default), over the same step without it (interleaved rounds,
  median of the per-round ratios);
- `diagnose` throughput: samples per second of the exact probe pass (eval, no grad, every
  site counted) over a plain eval forward of the same batches.

Needs the `hf` extra (`pip install 'dormant[hf]'`). On 2 CPU cores the defaults take about
5 minutes, but three rounds are noise there (±0.1); the table in docs/monitor.md used
`--rounds 15` (18 minutes). `--image-size` and `--seq-len` trade size for time.

    python benchmarks/monitor_scaling.py --rounds 15
    python benchmarks/monitor_scaling.py --models gpt2 --batches 2,8 --seq-len 128
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dormant import ActivityMonitor, diagnose, find_sites

MODELS = ("resnet50", "gpt2")


def build(name: str, args) -> tuple[torch.nn.Module, callable, callable]:
    """(model, make_batch(n) -> inputs dict, loss(model, inputs))."""
    import transformers as tf
    torch.manual_seed(0)
    if name == "resnet50":
        cfg = tf.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                              embedding_size=64, layer_type="bottleneck", num_labels=1000)
        model = tf.ResNetForImageClassification(cfg)
        size = args.image_size

        def batch(n):
            return {"pixel_values": torch.randn(n, 3, size, size),
                    "labels": torch.randint(1000, (n,))}
    else:
        cfg = tf.GPT2Config(n_positions=max(args.seq_len, 64),
                            activation_function=args.gpt2_activation)
        model = tf.GPT2LMHeadModel(cfg)
        seq = args.seq_len

        def batch(n):
            ids = torch.randint(cfg.vocab_size, (n, seq))
            return {"input_ids": ids, "labels": ids}
    return model, batch, lambda m, b: m(**b).loss


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_ratios(model, batch, loss, sites, n: int, steps: int, rounds: int) -> dict:
    xs = [batch(n) for _ in range(steps)]
    runs = {}
    for label, every in (("plain", 0), ("sampled", 10), ("exact", 1)):
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)
        mon = ActivityMonitor(m, sites, every_steps=every, mode="train").open() if every else None

        def run(m=m, opt=opt, mon=mon):
            for b in xs:
                opt.zero_grad(set_to_none=True)
                loss(m, b).backward()
                opt.step()
                if mon is not None:
                    mon.step()
        runs[label] = (run, mon)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run, _ in runs.values():
        run()                                                   # warm-up
    order = list(runs)
    for _ in range(rounds):
        order = order[1:] + order[:1]
        for k in order:
            times[k].append(_time(runs[k][0]))
    for _, mon in runs.values():
        if mon is not None:
            mon.close()
    return {"step_s": statistics.median(times["plain"]) / steps,
            **{k: statistics.median(a / b for a, b in zip(times[k], times["plain"]))
               for k in ("sampled", "exact")}}


def diagnose_ratio(model, batch, sites, n: int, batches: int) -> tuple[float, float]:
    """(plain eval samples/s, diagnose samples/s) over the same batches."""
    model = model.eval()
    xs = [{k: v for k, v in batch(n).items() if k != "labels"} for _ in range(batches)]

    def plain():
        with torch.no_grad():
            for b in xs:
                model(**b)
    forward = lambda m, b: m(**b)
    plain()                                                     # warm-up
    t_plain = _time(plain)
    t_diag = _time(lambda: diagnose(model, xs, sites=sites, forward=forward))
    total = n * batches
    return total / t_plain, total / t_diag


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--batches", default="2,8", help="two (or more) batch sizes")
    p.add_argument("--image-size", type=int, default=128, help="ResNet-50 input side")
    p.add_argument("--seq-len", type=int, default=128, help="GPT-2 tokens per sample")
    p.add_argument("--gpt2-activation", default="gelu_new", choices=("gelu_new", "relu"),
                   help="GPT-2's MLP activation: gelu_new (the stock config) or relu")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    names = args.models.split(",")
    if bad := [n for n in names if n not in MODELS]:
        p.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    try:
        sizes = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: expected integers like 2,8, got {args.batches!r}")
    if min(sizes) < 1 or min(args.steps, args.rounds, args.image_size, args.seq_len) < 1:
        p.error("--batches, --steps, --rounds, --image-size and --seq-len must be >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} rounds x "
          f"{args.steps} steps; ResNet-50 at {args.image_size}px, GPT-2 small at "
          f"{args.seq_len} tokens ({args.gpt2_activation})")
    print(f"{'model':<9} {'params':>7} {'sites':>5} {'units':>6} {'batch':>5} {'step s':>7} "
          f"{'sampled':>8} {'exact':>7} {'eval/s':>8} {'diagnose/s':>10} {'diag/eval':>9}")
    for name in names:
        model, batch, loss = build(name, args)
        example = {k: v for k, v in batch(2).items() if k != "labels"}
        sites = find_sites(model, example)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        units = sum(s.num_units for s in sites)
        for n in sizes:
            r = train_ratios(model, batch, loss, sites, n, args.steps, args.rounds)
            ev, dg = diagnose_ratio(model, batch, sites, n, args.steps)
            print(f"{name:<9} {params:>6.1f}M {len(sites):>5} {units:>6} {n:>5} "
                  f"{r['step_s']:>7.2f} {r['sampled']:>7.3f}x {r['exact']:>6.3f}x {ev:>8.1f} "
                  f"{dg:>10.1f} {dg / ev:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
