"""AP (Activate-while-Pruning, Liu et al. 2023) next to iterative magnitude pruning on
Fashion-MNIST: IMP with rewinding to init, 20% of the remaining weights per round, 18 rounds
(98.2% sparsity), vs IMP + AP with p_ap = 2% of each round's 20%. LeNet-300-100 and LeNet-5,
3 seeds, same data, seeds and budget. Writes docs/results/ap.md and its plots.

    python reproduce/ap.py --jobs 2          # ~2.5 h on 2 CPU cores (LeNet-5 dominates)
    python reproduce/ap.py --quick           # 1 seed, 2 rounds: a smoke run

Finished runs are reused (runs/reproduce/...), so an interrupted reproduction resumes.
"""
from __future__ import annotations

from pathlib import Path

from dormant.experiments import CompareSpec, ExperimentConfig, reproduce_parser, run_compare
from dormant.report import by_round, load_comparison, machine, paired, plot_series

MODELS = {  # model -> (epochs per round, learning rate)
    "lenet300": (8, 1.2e-3),
    "lenet5": (3, 1e-3),
}


def spec(model: str, rounds: int, epochs_per_round: int, lr: float, seeds) -> CompareSpec:
    prune = {"rate": 0.2, "rounds": rounds, "epochs_per_round": epochs_per_round,
             "rewind": "init"}
    base = ExperimentConfig(dataset="fashion-mnist", model=model, optimizer="adam", lr=lr,
                            batch_size=128, epochs=(rounds + 1) * epochs_per_round)
    variants = {"IMP": {"method": "imp", "method_args": prune},
                "IMP + AP": {"method": "ap", "method_args": {**prune, "p_ap": 0.02}}}
    return CompareSpec(base, variants, seeds, title=f"{model}: IMP vs IMP + AP")


def diff_table(cmp, min_sparsity: float) -> str:
    lines = ["| sparsity % | IMP acc % | IMP + AP acc % | AP − IMP (points) | IMP DNR % | AP DNR % |",
             "|---:|---:|---:|---:|---:|---:|"]
    acc, dnr = by_round(cmp, "test_acc"), by_round(cmp, "dynamic_dnr")
    diffs = paired(cmp, "test_acc", "IMP", "IMP + AP")
    for i, (sp, d, sd) in enumerate(diffs):
        if sp < min_sparsity:
            continue
        a, b = acc["IMP"], acc["IMP + AP"]
        lines.append(f"| {100 * sp:.1f} | {100 * a[1][i]:.2f} ± {100 * a[2][i]:.2f} | "
                     f"{100 * b[1][i]:.2f} ± {100 * b[2][i]:.2f} | {100 * d:+.2f} ± {100 * sd:.2f} | "
                     f"{100 * dnr['IMP'][1][i]:.1f} | {100 * dnr['IMP + AP'][1][i]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    out = Path(args.out)
    rounds, seeds = (2, [0]) if args.quick else (18, [0, 1, 2])
    text = ["# AP (Activate-while-Pruning) vs IMP on Fashion-MNIST", "",
            f"Machine: {machine()}. Rounds: {rounds} at 20% (rewind to init), seeds {seeds}. "
            "Regenerate with `python reproduce/ap.py --jobs 2`.", ""]
    for model in args.models.split(","):
        epr, lr = MODELS[model]
        epr = 1 if args.quick else epr
        folder = out / f"ap_{model}"
        run_compare(spec(model, rounds, epr, lr, seeds), args.root, folder, show_progress=False,
                    jobs=args.jobs)
        cmp = load_comparison(folder, args.root)
        remaining = lambda s: 100 * (1 - s)
        plot_series([("test accuracy %", by_round(cmp, "test_acc")),
                     ("dynamic DNR % (training batches)", by_round(cmp, "dynamic_dnr"))],
                    out / f"ap_{model}.png", xlabel="weights remaining % (log)", xscale="log",
                    scale=100, x_transform=remaining)
        text += [f"## {model} ({epr} epochs per round, Adam lr {lr})", "",
                 diff_table(cmp, 0.0 if args.quick else 0.9), "",
                 f"![{model}](ap_{model}.png)", ""]
    (out / "ap.md").write_text("\n".join(text))
    print(f"wrote {out / 'ap.md'}")


if __name__ == "__main__":
    main()
