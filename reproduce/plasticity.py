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
from dormant.report import curves, load_comparison, machine, mean_std, plot_series

OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0},
              "adam": {"optimizer": "adam", "lr": 1e-3}}


def base(tasks: int, samples: int) -> ExperimentConfig:
    return ExperimentConfig(dataset="fashion-mnist", model="mlp",
                            model_args={"depth": 2, "width": 100}, batch_size=16,
                            epochs=tasks, tasks={"kind": "permuted", "epochs_per_task": 1,
                                                 "samples": samples})


def table(cmp, tasks: int) -> str:
    """Per method: accuracy on the last 10% of tasks, on the first 10%, dead % and effective
    rank of the last hidden layer at the end (mean ± std over seeds)."""
    tail = max(1, tasks // 10)
    lines = ["| method | first 10% of tasks, test acc % | last 10% | dead units % | "
             "effective rank (last layer) |", "|---|---:|---:|---:|---:|"]
    for variant in cmp.variants:
        hists = [h for v, h in cmp.runs if v == variant]
        first = mean_std([100 * sum(r["test_acc"] for r in h[:tail]) / tail for h in hists])
        last = mean_std([100 * sum(r["test_acc"] for r in h[-tail:]) / tail for h in hists])
        dead = mean_std([100 * h[-1]["dead_fraction"] for h in hists])
        erank_key = sorted(k for k in hists[0][-1] if k.startswith("erank/"))[-1]
        erank = mean_std([h[-1][erank_key] for h in hists])
        lines.append(f"| {variant} | {first[0]:.2f} ± {first[1]:.2f} | {last[0]:.2f} ± "
                     f"{last[1]:.2f} | {dead[0]:.1f} ± {dead[1]:.1f} | {erank[0]:.1f} ± "
                     f"{erank[1]:.1f} |")
    return "\n".join(lines)


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
    text = ["# Loss of plasticity on permuted Fashion-MNIST", "",
            f"Machine: {machine()}. Seeds {seeds}. {tasks} tasks of {samples} examples, one "
            "epoch each, MLP 2 x 100, batch 16. Test accuracy is on the task just trained. "
            f"Regenerate with `python reproduce/plasticity.py --tasks {tasks} --samples "
            f"{samples} --optimizers {args.optimizers} --jobs 2`.", ""]
    for opt in args.optimizers.split(","):
        folder = out / f"plasticity_{opt}_{tasks}x{samples}"
        spec = CompareSpec(base(tasks, samples).override(**OPTIMIZERS[opt]), METHODS, seeds,
                           title=f"Plasticity, {opt}", columns=("task",))
        run_compare(spec, args.root, folder, show_progress=False, jobs=args.jobs)
        cmp = load_comparison(folder, args.root)
        plot = plot_series([("test accuracy % on the task just trained",
                             curves(cmp, "test_acc")),
                            ("dead units %", curves(cmp, "dead_fraction"))],
                           out / f"plasticity_{opt}_{tasks}x{samples}.png", xlabel="task",
                           scale=100.0)
        text += [f"## {opt}", "", table(cmp, tasks), "", f"![{opt}]({plot.name})", ""]
    (out / "plasticity.md").write_text("\n".join(text))
    print(f"wrote {out / 'plasticity.md'}")


if __name__ == "__main__":
    main()
