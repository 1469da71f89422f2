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
from dormant.report import (
    by_round,
    comparisons,
    load_comparison,
    paired,
    plot_series,
    read_section,
    regenerate,
    results_block,
    write_section,
)
from dormant.tables import Column, Stat, Table

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
    return CompareSpec(base, variants, seeds, title=f"{model}: IMP vs IMP + AP",
                       name=f"ap_{model}")


def diff_table(cmp, min_sparsity: float) -> Table:
    """Per pruning round from `min_sparsity` on: accuracy of both (mean ± std over seeds),
    AP − IMP paired by seed, and the dynamic DNR of both (mean)."""
    t = Table([Column("sparsity %", fmt="{:.1f}"), Column("IMP acc %"),
               Column("IMP + AP acc %"), Column("AP − IMP (points)", sign=True),
               Column("IMP DNR %", fmt="{:.1f}"), Column("AP DNR %", fmt="{:.1f}")])
    acc, dnr = by_round(cmp, "test_acc"), by_round(cmp, "dynamic_dnr")
    pct = lambda series, i: Stat(100 * series[1][i], 100 * series[2][i])
    for i, (sp, d, sd) in enumerate(paired(cmp, "test_acc", "IMP", "IMP + AP")):
        if sp >= min_sparsity:
            t.add(100 * sp, pct(acc["IMP"], i), pct(acc["IMP + AP"], i), Stat(100 * d, 100 * sd),
                  100 * dnr["IMP"][1][i], 100 * dnr["IMP + AP"][1][i])
    return t


def headline(cmp, at=(0.956, 0.982)) -> Table:
    """The results page's table of one model: at the rounds nearest the sparsities `at`,
    accuracy of both (mean ± std), AP − IMP paired by seed and the dynamic DNR of both."""
    t = Table([Column("sparsity", align="left"), Column("IMP acc %"), Column("IMP + AP acc %"),
               Column("AP − IMP (paired)", sign=True), Column("dynamic DNR IMP → AP")])
    acc, dnr = by_round(cmp, "test_acc"), by_round(cmp, "dynamic_dnr")
    diffs = paired(cmp, "test_acc", "IMP", "IMP + AP")
    for target in at:
        i = min(range(len(diffs)), key=lambda k: abs(diffs[k][0] - target))
        sp, d, sd = diffs[i]
        t.add(f"{100 * sp:.1f}%", Stat(100 * acc["IMP"][1][i], 100 * acc["IMP"][2][i]),
              Stat(100 * acc["IMP + AP"][1][i], 100 * acc["IMP + AP"][2][i]),
              Stat(100 * d, 100 * sd),
              f"{100 * dnr['IMP'][1][i]:.1f} → {100 * dnr['IMP + AP'][1][i]:.1f}%")
    return t


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    out = Path(args.out)
    rounds, seeds = (2, [0]) if args.quick else (18, [0, 1, 2])
    for model in [] if args.pages_only else args.models.split(","):
        epr, lr = MODELS[model]
        epr = 1 if args.quick else epr
        s = spec(model, rounds, epr, lr, seeds)
        run_compare(s, args.root, s.folder(out), show_progress=False, jobs=args.jobs)
        cmp = load_comparison(s.folder(out), args.root)
        remaining = lambda sp: 100 * (1 - sp)
        plot_series([("test accuracy %", by_round(cmp, "test_acc")),
                     ("dynamic DNR % (training batches)", by_round(cmp, "dynamic_dnr"))],
                    out / f"{s.name}.png", xlabel="weights remaining % (log)", xscale="log",
                    scale=100, x_transform=remaining)
        write_section(s.folder(out), "\n".join([
            f"## {model} ({epr} epochs per round, Adam lr {lr})", "",
            f"Machine: {cmp.machine}. Rounds: {rounds} at 20% (rewind to init), seeds {seeds}. "
            + regenerate(cmp), "",
            diff_table(cmp, 0.0 if args.quick else 0.9).to_markdown(), "",
            f"![{model}]({s.name}.png)"]))
    order = list(MODELS)
    found = sorted(comparisons(out, "ap_"), key=lambda fs: order.index(fs[1]["base"]["model"]))
    text = ["# AP (Activate-while-Pruning) vs IMP on Fashion-MNIST", ""]
    for folder, _ in found:
        text += [read_section(folder), ""]
        results_block(out.parent / "results.md", folder, args.root, headline)
    (out / "ap.md").write_text("\n".join(text))
    print(f"wrote {out / 'ap.md'}")


if __name__ == "__main__":
    main()
