"""NNrelief (Dekhovich et al. 2024) vs iterative magnitude pruning at the same final sparsity
and retraining budget, on Fashion-MNIST: LeNet-300-100 (alpha_fc 0.95) and LeNet-5
(alpha_conv 0.9, alpha_fc 0.95), 3 seeds. Both: pre-train, then K iterations of prune ->
rewind to init -> retrain, the best epoch of each retraining picked on the validation split.
IMP's per-round rate is set so that K rounds reach NNrelief's mean final sparsity.
Writes docs/results/nnrelief.md.

    python reproduce/nnrelief.py --jobs 2     # ~1.5 h on 2 CPU cores (LeNet-300-100 alone: ~25 min)
    python reproduce/nnrelief.py --quick      # 1 seed, 1 iteration: a smoke run
"""
from __future__ import annotations

from pathlib import Path

from dormant.experiments import CompareSpec, ExperimentConfig, reproduce_parser, run_compare
from dormant.report import by_round, load_comparison, machine, mean_std, paired, round_ends

MODELS = {  # model -> (pruning iterations, epochs per iteration, relief options)
    # alpha_fc 0.95 removes less each iteration (35% of the weights, then 28%, 23%, ... 14% at
    # the 7th): 14 iterations are needed to pass 10x compression on LeNet-300-100.
    "lenet300": (14, 8, {"alpha_fc": 0.95}),
    "lenet5": (7, 4, {"alpha_fc": 0.95, "alpha_conv": 0.9, "conv_score": "sum"}),
}


def base(model: str, rounds: int, epr: int) -> ExperimentConfig:
    return ExperimentConfig(dataset="fashion-mnist", model=model, optimizer="adam", lr=1e-3,
                            weight_decay=5e-4, batch_size=128, epochs=(rounds + 1) * epr,
                            schedule="step", schedule_args={"milestones": [epr // 2 or 1]})


def rounds_args(rounds: int, epr: int) -> dict:
    return {"rounds": rounds, "epochs_per_round": epr, "rewind": "init", "keep_best": True}


def table(cmp, variant: str) -> str:
    lines = ["| iteration | sparsity % | compression | test acc % | surviving units | "
             "FLOPs (non-zero) | FLOPs (structured) |", "|---:|---:|---:|---:|---|---:|---:|"]
    hists = round_ends(cmp, variant)
    for i in range(min(len(h) for h in hists)):
        rows = [h[i] for h in hists]
        sp, comp = mean_std([r["sparsity"] for r in rows]), mean_std([r["compression"] for r in rows])
        acc = mean_std([100 * r["test_acc"] for r in rows])
        arch = "-".join(str(round(mean_std([r["arch"][k] for r in rows])[0]))
                        for k in rows[0]["arch"])
        f1 = mean_std([r["flops_nonzero_ratio"] for r in rows])[0]
        f2 = mean_std([r["flops_structured_ratio"] for r in rows])[0]
        lines.append(f"| {i} | {100 * sp[0]:.1f} | {comp[0]:.1f}× ± {comp[1]:.1f} | "
                     f"{acc[0]:.2f} ± {acc[1]:.2f} | {arch} | {100 * f1:.1f}% | {100 * f2:.1f}% |")
    return "\n".join(lines)


def summary(relief_cmp, imp_cmp) -> str:
    """Dense vs final accuracy of NNrelief, and NNrelief vs IMP, paired by seed."""
    relief = round_ends(relief_cmp, "NNrelief")
    drop = mean_std([100 * (r[0]["test_acc"] - r[-1]["test_acc"]) for r in relief])
    comp = mean_std([r[-1]["compression"] for r in relief])
    _, diff, spread = paired(relief_cmp + imp_cmp, "test_acc", "IMP", "NNrelief")[-1]
    return (f"Final: compression {comp[0]:.1f}× ± {comp[1]:.1f}, accuracy drop from dense "
            f"{drop[0]:+.2f} ± {drop[1]:.2f} points (positive = lower), NNrelief − IMP at the "
            f"same sparsity {100 * diff:+.2f} ± {100 * spread:.2f} points (paired by seed).")


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=None,
                   help="pruning iterations for every model (default: per model, 14 for "
                        "LeNet-300-100, 7 for LeNet-5)")
    args = p.parse_args()
    out = Path(args.out)
    seeds = [0] if args.quick else [0, 1, 2]
    text = ["# NNrelief vs iterative magnitude pruning on Fashion-MNIST", "",
            f"Machine: {machine()}. Seeds {seeds}. Iteration 0 is the dense pre-trained "
            "network. Regenerate with `python reproduce/nnrelief.py --jobs 2"
            + ("" if args.models == ",".join(MODELS) else f" --models {args.models}") + "`.", ""]
    for model in args.models.split(","):
        rounds, epr, relief = MODELS[model]
        rounds = 1 if args.quick else (args.rounds or rounds)
        epr = 1 if args.quick else epr
        cfg = base(model, rounds, epr)
        folder = out / f"nnrelief_{model}"
        run_compare(CompareSpec(cfg, {"NNrelief": {"method": "nnrelief", "method_args": {
            **rounds_args(rounds, epr), **relief}}}, seeds), args.root, folder,
            show_progress=False, jobs=args.jobs)
        relief_cmp = load_comparison(folder, args.root)
        final_sparsity = by_round(relief_cmp, "test_acc")["NNrelief"][0][-1]
        rate = 1 - (1 - final_sparsity) ** (1 / rounds)
        folder_imp = out / f"nnrelief_{model}_imp"
        run_compare(CompareSpec(cfg, {"IMP": {"method": "imp", "method_args": {
            **rounds_args(rounds, epr), "rate": round(rate, 6)}}}, seeds), args.root,
            folder_imp, show_progress=False, jobs=args.jobs)
        imp_cmp = load_comparison(folder_imp, args.root)
        text += [f"## {model} ({rounds} iterations of {epr} epochs; {relief})", "",
                 summary(relief_cmp, imp_cmp), "",
                 "NNrelief:", "", table(relief_cmp, "NNrelief"), "",
                 f"IMP at {100 * rate:.1f}% per round (same final sparsity):", "",
                 table(imp_cmp, "IMP"), ""]
    (out / "nnrelief.md").write_text("\n".join(text))
    print(f"wrote {out / 'nnrelief.md'}")


if __name__ == "__main__":
    main()
