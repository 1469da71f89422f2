"""DemP speed: training wall-clock of DemP vs dense for the same epochs, and inference latency
of the compacted vs the dense model, each as a ratio measured in one run, next to the FLOP
(MAC) ratio.

Training: the two runs advance epoch by epoch in turn in this process (same data, seed and
batches), so both see the same machine conditions; the ratio is total dense time / total
DemP time over the epochs' training loops (evaluation excluded). Inference: forward passes
of a batch through the dense and the compacted model, interleaved, median of paired ratios.
Training step: one AdamW step (forward, backward, update) on copies of the trained dense and
the final compacted model, interleaved, median of paired ratios -- the speed-up the run
would reach if the units had died at step 0, which separates what the kernels give from
what the schedule gives (units die around the peak of the one-cycle, 30% into its span).

On a GPU (`--device cuda`) the data and both models live on the device and every timer
waits for the device's queue first. Small models there are bound by kernel launches, not by
arithmetic, so `--width` (channel multiplier of vgg-small) shows where the FLOPs start to
matter.

    python benchmarks/demp_speed.py --model vgg-small --epochs 8 --reg-peak 0.02
    python benchmarks/demp_speed.py --device cuda --width 4 --epochs 10
    python benchmarks/demp_speed.py --round-to 0 --pct-start 0.3,0.15 --prune-every 100,50
                                        # the peak/cadence trade-off, in one run
    python benchmarks/demp_speed.py --device cuda --width 8 --compile reduce-overhead
                                        # compiled, CUDA graphs (also --precision bf16,
                                        # --memory-format channels_last)

--precision, --memory-format and --compile apply to every run alike (the Trainer's options);
with --compile the deployed models are also timed compiled.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dormant.data import load_dataset
from dormant.methods import DemP
from dormant.models import build_model
from dormant.schedules import make_scheduler
from dormant.tables import Column, Table
from dormant.train import Trainer
from dormant.train.loop import COMPILE_MODES, MEMORY_FORMATS, PRECISIONS, compiled, synchronize


def trainer(model, data, epochs, lr, callbacks, seed, batch_size=128, **execution):
    """`execution`: the Trainer's precision, memory_format and compile, the same for every
    run of the benchmark."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    return Trainer(model, data, opt, epochs=epochs, batch_size=batch_size, seed=seed,
                   scheduler=make_scheduler("cosine", opt, epochs), callbacks=callbacks,
                   show_progress=False, **execution)


def train_interleaved(trainers: list[Trainer], report=None) -> list[list[dict]]:
    """The runs epoch by epoch in turn; `report(epoch, rows)` after each epoch (one row per
    run)."""
    rows: list[list[dict]] = [[] for _ in trainers]
    for t in trainers:
        t._call("on_fit_start")
    try:
        while trainers[0].epoch < trainers[0].epochs:
            for t, r in zip(trainers, rows):
                r.append(t._run_epoch())
            if report is not None:
                report(trainers[0].epoch, [r[-1] for r in rows])
    finally:
        for t in trainers:
            t._call("on_fit_end")
    return rows


def interleaved(fa, fb, rounds: int, warmup: int = 3, sync: torch.Tensor | None = None
                ) -> tuple[float, float, float]:
    """Call fa and fb in turn (after `warmup` untimed pairs): their median times and the
    median of the paired ratios time(fa) / time(fb). With `sync` (a tensor on the device
    that runs the work) each timer waits for that device's queue."""
    def wait():
        if sync is not None:
            synchronize(sync)
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(rounds):
        for f, ts in ((fa, ta), (fb, tb)):
            wait()
            t0 = time.perf_counter()
            f()
            wait()
            ts.append(time.perf_counter() - t0)
    return (statistics.median(ta), statistics.median(tb),
            statistics.median([u / v for u, v in zip(ta, tb)]))


def deployed(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    """An inference copy as one would ship it: eval mode, BatchNorm folded into the
    convolution before it (torch.fx), channels-last memory for 4-d inputs (oneDNN's layout on
    CPU, tensor cores' on GPU). The dense and the compacted model get the same treatment."""
    from torch.fx.experimental.optimization import fuse
    m = copy.deepcopy(model).eval()
    try:
        m = fuse(m)
    except Exception:      # not traceable by torch.fx: keep BatchNorm
        pass
    if x.ndim == 4:
        return m.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    return m, x


def latency_ratio(a, b, x, rounds: int = 30) -> tuple[float, float, float]:
    """Forward passes of x through a and b in eval mode."""
    a.eval(), b.eval()

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run
    return interleaved(forward(a), forward(b), rounds, sync=x)


def step_ratio(a, b, x, y, rounds: int = 20) -> tuple[float, float, float]:
    """One AdamW step (forward, backward, update) on copies of a and b."""
    def trainer_step(m):
        m = copy.deepcopy(m).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        return step
    return interleaved(trainer_step(a), trainer_step(b), rounds, sync=x)


def bookkeeping_ratio(model, demp: DemP, x, y, rounds: int = 20
                      ) -> tuple[float, float, float, float]:
    """DemP's per-step work next to the training step, on a copy of `model`: one AdamW step
    with and without a DemP of the same options (its `after_backward` and `after_step`: the
    live masks, the regulariser's gradient, the masked noise), its death checks left out.
    (median step with, without, median paired ratio, median time of the two calls themselves
    over the median step without them): the ratio also holds what the calls do to the
    caches; the share, timed directly, is not lost in the noise of two whole steps. It is
    timed in steps of its own after the paired ones, so that its device syncs stay out of
    the ratio."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    method = DemP(**{**demp.opts.changed(), "prune_after": 2 ** 62}).prepare(
        m, opt, probe=x, total_steps=2 ** 62)

    own: list[float] = []

    def timed(call) -> None:
        synchronize(x)
        t0 = time.perf_counter()
        call()
        synchronize(x)
        own[-1] += time.perf_counter() - t0

    def step(book: bool, timing: bool = False):
        def run():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if book:
                timed(method.after_backward) if timing else method.after_backward()
            opt.step()
            if book:
                timed(method.after_step) if timing else method.after_step()
        return run
    ta, tb, ratio = interleaved(step(True), step(False), rounds, sync=x)
    for _ in range(rounds):
        own.append(0.0)
        step(True, timing=True)()
    return ta, tb, ratio, statistics.median(own) / tb


def tradeoff(rows: dict[str, list[dict]], t_dense: float) -> Table:
    """Every DemP run of this process next to dense: accuracy, what it removed and the
    whole-run speed-up (the accuracy/speed trade-off of peak position and cadence)."""
    t = Table([Column("run", align="left"), Column("test acc %"),
               Column("vs dense (points)", sign=True), Column("units removed %", fmt="{:.1f}"),
               Column("FLOP reduction", fmt="{:.2f}x"), Column("whole-run speed-up",
                                                                fmt="{:.2f}x")])
    dense = rows["dense"][-1]["test_acc"]
    for name, r in rows.items():
        if name != "dense":
            t.add(name, 100 * r[-1]["test_acc"], 100 * (r[-1]["test_acc"] - dense),
                  100 * r[-1]["units_removed"], 1 / r[-1]["macs_ratio"],
                  t_dense / sum(x["train_time"] for x in r))
    return t


def _checked(p: argparse.ArgumentParser, args) -> tuple[list, list[int]]:
    """The arguments checked; (pct_start values, prune_every values)."""
    if args.epochs < 1 or args.train_batch < 1 or args.batch < 1:
        p.error("--epochs, --train-batch and --batch must be >= 1")
    if args.width is not None and args.width <= 0:
        p.error("--width must be > 0")
    if args.round_to < 0:
        p.error("--round-to must be >= 0 (0 or 1: no rounded run)")
    try:
        pct_starts = [None] if args.pct_start is None else [
            float(v) for v in args.pct_start.split(",")]
        cadences = [int(v) for v in args.prune_every.split(",")]
    except ValueError as e:
        p.error(f"--pct-start takes numbers and --prune-every whole numbers, comma-separated "
                f"({e})")
    if any(v is not None and not 0 < v < 1 for v in pct_starts):
        p.error("--pct-start must be in (0, 1)")
    if any(v < 1 for v in cadences):
        p.error("--prune-every must be >= 1")
    return pct_starts, cadences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg-small")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--reg-peak", type=float, default=0.02)
    p.add_argument("--noise-peak", type=float, default=5e-5)
    p.add_argument("--prune-every", default="100",
                   help="steps between DemP's death checks; a comma list (e.g. 50,100,200) "
                        "adds a DemP run per value to the same interleaved run")
    p.add_argument("--span", type=float, default=0.9,
                   help="DemP's death-pressure span, a fraction of the run (the official code: "
                        "0.87 on CIFAR-10, 0.3 on ImageNet)")
    p.add_argument("--round-to", type=int, default=8,
                   help="also run DemP with round_to=N (widths kept at multiples of N, the "
                        "extra units chosen by activity), in the same interleaved run; 1 or 0 "
                        "skips it")
    p.add_argument("--pct-start", default=None,
                   help="DemP's one-cycle: fraction of its span spent rising to the peak "
                        "(default 0.3); earlier peaks kill units earlier. A comma list "
                        "(e.g. 0.1,0.2,0.3) adds a DemP run per value: with --prune-every "
                        "lists, the accuracy/speed trade-off in one run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256, help="inference batch size")
    p.add_argument("--train-batch", type=int, default=128, help="training batch size")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier for models that take one (vgg-small: 1 = 32..128)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on this many training samples (default: all)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="every run's training forwards (bf16: under autocast)")
    p.add_argument("--memory-format", default="contiguous", choices=MEMORY_FORMATS,
                   help="every run's training layout (channels_last: NHWC)")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="every run's training forward through torch.compile in this mode "
                        "(compiled again after each removal; reduce-overhead: CUDA graphs), "
                        "and a compiled inference line")
    args = p.parse_args()
    pct_starts, cadences = _checked(p, args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    data = load_dataset(args.dataset, **({"train_size": args.train_size}
                                          if args.train_size else {})).to(device)
    options = {} if args.width is None else {"width": args.width}
    def fresh():
        torch.manual_seed(args.seed)
        return build_model(args.model, data.input_shape, data.num_classes, **options).to(device)
    def demp(pct_start, prune_every, round_to=1):
        return DemP(reg_peak=args.reg_peak, noise_peak=args.noise_peak, prune_every=prune_every,
                    span=args.span, round_to=round_to,
                    **({} if pct_start is None else {"pct_start": pct_start}))
    # the first value of each list is "DemP"; every other pair is a run of its own
    variants = {"dense": None, "DemP": demp(pct_starts[0], cadences[0])}
    if args.round_to > 1:
        variants[f"DemP round_to={args.round_to}"] = demp(pct_starts[0], cadences[0],
                                                          args.round_to)
    trade = {}          # the other pairs: in the trade-off table only
    for ps in pct_starts:
        for every in cadences:
            if (ps, every) != (pct_starts[0], cadences[0]):
                m = demp(ps, every)
                trade[f"DemP pct_start={m.opts.pct_start:g} every={every}"] = m
    variants.update(trade)
    models = {name: fresh() for name in variants}
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    nb = args.train_batch
    execution = {"precision": args.precision, "memory_format": args.memory_format,
                 "compile": args.compile}
    print(f"torch {torch.__version__}, {where}; {args.model}"
          f"{'' if args.width is None else f' width {args.width:g}'} on {args.dataset} "
          f"({len(data.train)} training samples, batch {nb}), {args.epochs} epochs, "
          f"DemP reg_peak={args.reg_peak} span={args.span:g}"
          + ("" if pct_starts[0] is None else f" pct_start={pct_starts[0]:g}")
          + ("" if cadences[0] == 100 else f" prune_every={cadences[0]}")
          + "".join(f"; {k} {v}" for k, v in execution.items() if v != p.get_default(k)))
    names = list(variants)
    print("epoch  dense s  demp s  ratio  units removed"
          + "".join(f"  | {n}: s, ratio, removed" for n in names[2:]), flush=True)

    def report(e, rows):   # as the epochs finish, so a run cut short still says something
        a, b = rows[0], rows[1]
        print(f"{e:>5}  {a['train_time']:>7.1f}  {b['train_time']:>6.1f}  "
              f"{a['train_time'] / b['train_time']:>5.2f}  {100 * b['units_removed']:>5.1f}%"
              + "".join(f"  | {r['train_time']:.1f} {a['train_time'] / r['train_time']:.2f} "
                        f"{100 * r['units_removed']:.1f}%" for r in rows[2:]), flush=True)
    runs = train_interleaved([trainer(models[n], data, args.epochs, args.lr,
                                      [] if variants[n] is None else [variants[n]], args.seed,
                                      nb, **execution) for n in names], report)
    rows = dict(zip(names, runs))
    t_dense = sum(r["train_time"] for r in rows["dense"])
    x = data.test.inputs[:args.batch]
    xb, yb = data.train.inputs[:nb], data.train.targets[:nb]
    for name in [n for n in names[1:] if n not in trade]:
        last = rows[name][-1]
        t_demp = sum(r["train_time"] for r in rows[name])
        mac_ratio = 1 / last["macs_ratio"]    # DemP reports its MACs over the dense model's
        la, lb, lat = latency_ratio(models["dense"], models[name], x)
        (da, xa), (db, _) = deployed(models["dense"], x), deployed(models[name], x)
        fa, fb, fold = latency_ratio(da, db, xa)
        sa, sb, step = step_ratio(models["dense"], models[name], xb, yb)
        if args.compile != "off":     # the deployed models, compiled in the same mode
            ca, cb, comp = latency_ratio(compiled(da, args.compile), compiled(db, args.compile),
                                         xa)
        label = "" if name == "DemP" else f"[{name}] "
        print(f"{label}test acc: dense {100 * rows['dense'][-1]['test_acc']:.2f}%, DemP "
              f"{100 * last['test_acc']:.2f}%; widths {last.get('width', {})}")
        print(f"{label}training speed-up (dense time / DemP time): {t_dense / t_demp:.2f}x "
              f"({t_dense:.0f}s vs {t_demp:.0f}s)")
        print(f"{label}inference (batch {args.batch}): dense {1e3 * la:.1f} ms, compacted "
              f"{1e3 * lb:.1f} ms, speed-up {lat:.2f}x; FLOP reduction {mac_ratio:.2f}x; "
              f"speed-up / FLOP reduction = {lat / mac_ratio:.2f}")
        print(f"{label}inference deployed, BN folded + channels-last (batch {args.batch}): "
              f"dense {1e3 * fa:.1f} ms, compacted {1e3 * fb:.1f} ms, speed-up {fold:.2f}x; "
              f"speed-up / FLOP reduction = {fold / mac_ratio:.2f}")
        if args.compile != "off":
            print(f"{label}inference deployed and compiled ({args.compile}, batch "
                  f"{args.batch}): dense {1e3 * ca:.1f} ms, compacted {1e3 * cb:.1f} ms, "
                  f"speed-up {comp:.2f}x; speed-up / FLOP reduction = {comp / mac_ratio:.2f}")
        print(f"{label}training step (batch {nb}), final widths: dense {1e3 * sa:.1f} ms, "
              f"compacted {1e3 * sb:.1f} ms, speed-up {step:.2f}x; speed-up / FLOP reduction = "
              f"{step / mac_ratio:.2f}")
        print(f"{label}whole-run training speed-up / FLOP reduction = "
              f"{t_dense / t_demp / mac_ratio:.2f}", flush=True)
    ba, bb, book, share = bookkeeping_ratio(models["dense"], variants["DemP"], xb, yb)
    print(f"DemP's per-step bookkeeping (live masks, regulariser, noise) on the dense model: "
          f"{100 * share:.2f}% of a step timed directly, a training step with it {book:.3f}x "
          f"one without (batch {nb}, {1e3 * bb:.1f} ms)", flush=True)
    if len(names) > 2:
        print("\nTrade-off, every DemP run of this process (same data, seed, batches):")
        print(tradeoff(rows, t_dense).to_markdown(), flush=True)


if __name__ == "__main__":
    main()
