"""Loss of plasticity (Dohare et al., Nature 2024) on permuted Fashion-MNIST: an MLP of width
100 trained on a sequence of tasks (a new pixel permutation each, `--samples` training
examples, one epoch per task), plain backprop vs Synaptic Stripping, ReDo, Continual
Backprop, Shrink & Perturb and L2 Init, same tasks, seeds and budget, with SGD and Adam.
Writes docs/results/plasticity.md: accuracy on each task after training on it (plot), the
mean over the last 10% of tasks, the dead fraction and the effective rank over tasks.

    python reproduce/plasticity.py --jobs 2                  # 200 tasks x 10k: many CPU hours
    python reproduce/plasticity.py --tasks 40 --samples 5000 --jobs 2   # a reduced study
    python reproduce/plasticity.py --quick                   # 1 seed, 3 tasks: a smoke run
"""
from __future__ import annotations

from pathlib import Path

from dormant.experiments import CompareSpec, ExperimentConfig, reproduce_parser, run_compare
from dormant.experiments.presets import PLASTICITY_METHODS as METHODS
from dormant.report import (
    Cell,
    comparisons,
    curves,
    final,
    load_comparison,
    plot_series,
    read_section,
    regenerate,
    results_block,
    variant_table,
    window,
    write_section,
)
from dormant.tables import Column, stat

OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0},
              "adam": {"optimizer": "adam", "lr": 1e-3}}


def spec(opt: str, tasks: int, samples: int, seeds) -> CompareSpec:
    base = ExperimentConfig(dataset="fashion-mnist", model="mlp",
                            model_args={"depth": 2, "width": 100}, batch_size=16,
                            epochs=tasks, tasks={"kind": "permuted", "epochs_per_task": 1,
                                                 "samples": samples}, **OPTIMIZERS[opt])
    return CompareSpec(base, METHODS, seeds, title=f"Plasticity, {opt}", columns=("task",),
                       name=f"plasticity_{opt}_{tasks}x{samples}")


def _windows(hist: list[dict], size: int) -> list[float]:
    acc = [r["test_acc"] for r in hist]
    return [sum(acc[i:i + size]) / size for i in range(len(acc) - size + 1)]


def best_window(size: int) -> Cell:
    """Per seed, the best mean test accuracy over `size` consecutive tasks (the peak before
    any decline); mean ± std over seeds."""
    return lambda cmp, v: stat((max(_windows(h, size)) for n, h in cmp.runs if n == v), 100)


def last_minus_best(size: int) -> Cell:
    """Per seed, the last `size` tasks' mean minus its best window: the loss of plasticity."""
    def gap(hist: list[dict]) -> float:
        means = _windows(hist, size)
        return means[-1] - max(means)
    return lambda cmp, v: stat((gap(h) for n, h in cmp.runs if n == v), 100)


def erank_key(cmp) -> str:
    """The effective rank of the last hidden layer."""
    return sorted(k for k in cmp.runs[0][1][-1] if k.startswith("erank/"))[-1]


def table(cmp):
    """Per method: test accuracy on the task just trained, mean over the first 10% of tasks,
    the best 10% window and the last 10%, and the last minus the best (per seed); dead units
    % and effective rank of the last hidden layer after the last task (mean ± std over
    seeds)."""
    tasks = len(cmp.runs[0][1])
    tail = max(1, tasks // 10)
    erank = erank_key(cmp)
    return variant_table(cmp, [
        (Column("first 10% of tasks, test acc %"), window("test_acc", 0, tail, 100)),
        (Column("best 10% window"), best_window(tail)),
        (Column("last 10%"), window("test_acc", -tail, None, 100)),
        (Column("last − best", sign=True), last_minus_best(tail)),
        (Column("dead units %", fmt="{:.1f}"), final("dead_fraction", 100)),
        (Column("effective rank (last layer)", fmt="{:.1f}"), final(erank))],
        first=Column("method", align="left"))


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--tasks", type=int, default=200, help="tasks in the sequence (200)")
    p.add_argument("--samples", type=int, default=10_000, help="training examples per task")
    p.add_argument("--optimizers", default="sgd,adam", help="comma-separated: sgd, adam")
    args = p.parse_args()
    if args.tasks < 1 or args.samples < 1:
        p.error("--tasks and --samples must be >= 1")
    bad = sorted(set(args.optimizers.split(",")) - set(OPTIMIZERS))
    if bad:
        p.error(f"unknown optimizer(s) {bad}; choose from {', '.join(OPTIMIZERS)}")
    tasks, samples = (3, 1000) if args.quick else (args.tasks, args.samples)
    seeds = [0] if args.quick else [0, 1, 2]
    out = Path(args.out)
    for opt in [] if args.pages_only else args.optimizers.split(","):
        s = spec(opt, tasks, samples, seeds)
        run_compare(s, args.root, s.folder(out), show_progress=False, jobs=args.jobs)
        cmp = load_comparison(s.folder(out), args.root)
        plot = plot_series([("test accuracy % on the task just trained",
                             curves(cmp, "test_acc")),
                            ("dead units %", curves(cmp, "dead_fraction")),
                            ("effective rank, last hidden layer",   # (the panels' x100)
                             {v: (x, [a / 100 for a in m], [b / 100 for b in sd])
                              for v, (x, m, sd) in curves(cmp, erank_key(cmp)).items()})],
                           out / f"{s.name}.png", xlabel="task", scale=100.0)
        write_section(s.folder(out), "\n".join([
            f"## {opt}: {tasks} tasks of {samples} examples", "",
            f"Machine: {cmp.machine}. Seeds {seeds}. {regenerate(cmp)}", "",
            table(cmp).to_markdown(), "", f"![{opt}]({plot.name})"]))
    text = ["# Loss of plasticity on permuted Fashion-MNIST", "",
            "One epoch per task, MLP 2 x 100, batch 16. Test accuracy is on the task just "
            "trained.", ""]
    for folder, _ in comparisons(out, "plasticity_"):
        text += [read_section(folder), ""]
        results_block(out.parent / "results.md", folder, args.root, table)
    (out / "plasticity.md").write_text("\n".join(text))
    print(f"wrote {out / 'plasticity.md'}")


if __name__ == "__main__":
    main()
