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
from dormant.report import (
    by_round,
    comparisons,
    load_comparison,
    paired,
    read_section,
    regenerate,
    results_block,
    round_ends,
    write_section,
)
from dormant.tables import Column, Table, mean_std, stat

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


def table(cmp, variant: str) -> Table:
    """Per iteration (pruning round): sparsity, compression, accuracy, surviving units and
    FLOPs, mean (± std) over seeds."""
    t = Table([Column("iteration"), Column("sparsity %", fmt="{:.1f}"),
               Column("compression", fmt="{:.1f}"), Column("test acc %"),
               Column("surviving units", align="left"), Column("FLOPs (non-zero)"),
               Column("FLOPs (structured)")])
    hists = round_ends(cmp, variant)
    for i in range(min(len(h) for h in hists)):
        rows = [h[i] for h in hists]
        arch = "-".join(str(round(mean_std([r["arch"][k] for r in rows])[0]))
                        for k in rows[0]["arch"])
        comp = stat(r["compression"] for r in rows)
        t.add(i, stat(r["sparsity"] for r in rows).mean * 100,
              f"{comp.mean:.1f}× ± {comp.std:.1f}", stat((r["test_acc"] for r in rows), 100),
              arch, f"{100 * stat(r['flops_nonzero_ratio'] for r in rows).mean:.1f}%",
              f"{100 * stat(r['flops_structured_ratio'] for r in rows).mean:.1f}%")
    return t


def summary(relief_cmp, imp_cmp) -> str:
    """Dense vs final accuracy of NNrelief, and NNrelief vs IMP, paired by seed."""
    relief = round_ends(relief_cmp, "NNrelief")
    drop = stat(100 * (r[0]["test_acc"] - r[-1]["test_acc"]) for r in relief)
    comp = stat(r[-1]["compression"] for r in relief)
    _, diff, spread = paired(relief_cmp + imp_cmp, "test_acc", "IMP", "NNrelief")[-1]
    return (f"Final: compression {comp.mean:.1f}× ± {comp.std:.1f}, accuracy drop from dense "
            f"{drop.mean:+.2f} ± {drop.std:.2f} points (positive = lower), NNrelief − IMP at "
            f"the same sparsity {100 * diff:+.2f} ± {100 * spread:.2f} points (paired by seed).")


def headline(relief_cmp, imp_cmp) -> Table:
    """The results page's table: dense, NNrelief's first iteration past 10x compression and
    its last, and IMP at the same sparsity (mean ± std over seeds)."""
    t = Table([Column("", align="left"), Column("sparsity"), Column("compression"),
               Column("test acc %"), Column("surviving units", align="left"),
               Column("structured FLOPs")])
    relief, imp = round_ends(relief_cmp, "NNrelief"), round_ends(imp_cmp, "IMP")
    n = min(len(h) for h in relief) - 1
    arch = lambda rows: "-".join(str(round(mean_std([r["arch"][k] for r in rows])[0]))
                                 for k in rows[0]["arch"])
    # the first iteration past 10x compression (the paper's claim), where it is not the last
    tenfold = next((i for i in range(1, n) if stat(h[i]["compression"] for h in relief).mean
                    >= 10), None)
    lines = [("dense (iteration 0)", [h[0] for h in relief], False),
             *([(f"NNrelief, iteration {tenfold}", [h[tenfold] for h in relief], False)]
               if tenfold else []),
             (f"NNrelief, iteration {n}", [h[n] for h in relief], True),
             (f"IMP, round {n}", [h[n] for h in imp], False)]
    for label, rows, std in lines:
        sp, comp = stat(r["sparsity"] for r in rows), stat(r["compression"] for r in rows)
        t.add(label, f"{100 * sp.mean:.1f}%" if sp.mean else "0",
              (f"{comp.mean:.1f}× ± {comp.std:.1f}" if std else f"{comp.mean:.1f}×")
              if sp.mean else "1×",
              stat((r["test_acc"] for r in rows), 100), arch(rows),
              f"{100 * stat(r['flops_structured_ratio'] for r in rows).mean:.1f}%"
              if sp.mean else "100%")
    return t


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=None,
                   help="pruning iterations for every model (default: per model, 14 for "
                        "LeNet-300-100, 7 for LeNet-5)")
    args = p.parse_args()
    out = Path(args.out)
    seeds = [0] if args.quick else [0, 1, 2]
    for model in [] if args.pages_only else args.models.split(","):
        rounds, epr, relief = MODELS[model]
        rounds = 1 if args.quick else (args.rounds or rounds)
        epr = 1 if args.quick else epr
        cfg = base(model, rounds, epr)
        relief_spec = CompareSpec(cfg, {"NNrelief": {"method": "nnrelief", "method_args": {
            **rounds_args(rounds, epr), **relief}}}, seeds, name=f"nnrelief_{model}")
        run_compare(relief_spec, args.root, relief_spec.folder(out), show_progress=False,
                    jobs=args.jobs)
        relief_cmp = load_comparison(relief_spec.folder(out), args.root)
        final_sparsity = by_round(relief_cmp, "test_acc")["NNrelief"][0][-1]
        rate = 1 - (1 - final_sparsity) ** (1 / rounds)
        imp_spec = CompareSpec(cfg, {"IMP": {"method": "imp", "method_args": {
            **rounds_args(rounds, epr), "rate": round(rate, 6)}}}, seeds,
            name=f"nnrelief_{model}_imp")
        run_compare(imp_spec, args.root, imp_spec.folder(out), show_progress=False,
                    jobs=args.jobs)
        imp_cmp = load_comparison(imp_spec.folder(out), args.root)
        write_section(relief_spec.folder(out), "\n".join([
            f"## {model} ({rounds} iterations of {epr} epochs; {relief})", "",
            f"Machine: {relief_cmp.machine}. Seeds {seeds}. {regenerate(relief_cmp)}", "",
            summary(relief_cmp, imp_cmp), "",
            "NNrelief:", "", table(relief_cmp, "NNrelief").to_markdown(), "",
            f"IMP at {100 * rate:.1f}% per round (same final sparsity):", "",
            table(imp_cmp, "IMP").to_markdown()]))
    # the page: every model's section that exists, each regenerated on its own
    order = list(MODELS)
    found = sorted(((f, sp) for f, sp in comparisons(out, "nnrelief_")
                    if "NNrelief" in sp.get("variants", {})),
                   key=lambda fs: order.index(fs[1]["base"]["model"]))
    text = ["# NNrelief vs iterative magnitude pruning on Fashion-MNIST", "",
            "Iteration 0 is the dense pre-trained network.", ""]
    for folder, _ in found:
        text += [read_section(folder), ""]
        results_block(out.parent / "results.md", folder, args.root, headline, "_imp")
    (out / "nnrelief.md").write_text("\n".join(text))
    print(f"wrote {out / 'nnrelief.md'}")


if __name__ == "__main__":
    main()
