"""DemP (Demon Pruning, Dufort-Labbé et al.) on Fashion-MNIST with the small VGG (BN) and
ResNet-20: dense vs DemP (a sweep of the regulariser peak, giving several unit sparsities) vs
gradual structured L1-norm channel pruning to the *same final widths* (per site, the mean of
DemP's seeds), same epochs, optimizer and seeds. Writes docs/results/demp.md and a plot of
accuracy vs fraction of units removed.

    python reproduce/demp.py --jobs 2                 # several hours on 2 CPU cores
    python reproduce/demp.py --quick                  # 1 seed, 1 epoch, 4k samples

Training speed is measured separately, as a ratio in one process: benchmarks/demp_speed.py.
"""
from __future__ import annotations

from pathlib import Path

from dormant.experiments import CompareSpec, ExperimentConfig, reproduce_parser, run_compare
from dormant.report import (
    comparisons,
    final,
    final_values,
    load_comparison,
    plot_series,
    read_section,
    regenerate,
    results_block,
    variant_table,
    write_section,
)
from dormant.tables import Column, Table, mean_std, stat

MODELS = {"vgg-small": {}, "resnet20": {}}
REG_PEAKS = (0.003, 0.01, 0.05)
DEMP = {"noise_peak": 5e-5, "prune_every": 100, "span": 0.9}


def base(model: str, epochs: int, train_size: int | None) -> ExperimentConfig:
    return ExperimentConfig(
        dataset="fashion-mnist", model=model, model_args=MODELS[model], optimizer="adamw",
        lr=5e-3, weight_decay=5e-4, batch_size=128, epochs=epochs, schedule="cosine",
        dataset_args={"train_size": train_size} if train_size else {})


def demp_variants(peaks) -> dict:
    return {f"DemP λ={p:g}": {"method": "demp", "method_args": {**DEMP, "reg_peak": p}}
            for p in peaks}


def matched_baselines(cmp, peaks) -> dict:
    """A structured variant per DemP variant, pruned to DemP's mean final width per site."""
    out = {}
    for p in peaks:
        finals = [h[-1]["width"] for v, h in cmp.runs if v == f"DemP λ={p:g}"]
        widths = {k: max(1, round(mean_std([f[k] for f in finals])[0])) for k in finals[0]}
        out[f"structured (as λ={p:g})"] = {"method": "structured", "method_args": {
            "widths": widths, "prune_every": DEMP["prune_every"], "start": 0.1, "end": 0.7}}
    return out


def table(cmp):
    """Per variant: accuracy, units removed, MACs and parameters of dense (mean ± std)."""
    return variant_table(cmp, [
        (Column("test acc %"), final("test_acc", 100)),
        (Column("units removed %"), final("units_removed", 100, default=0.0)),
        (Column("MACs % of dense"), final("macs_ratio", 100, default=1.0)),
        (Column("params % of dense"), final("params_ratio", 100, default=1.0))])


def headline(both) -> Table:
    """The results page's table: dense, then each DemP peak above the structured baseline
    pruned to its widths; accuracy mean ± std over seeds, the rest means."""
    t = Table([Column("variant", align="left"), Column("test acc %"), Column("units removed"),
               Column("MACs of dense"), Column("params of dense")])
    mean = lambda key, v, default: stat(final_values(both, key, default)[v]).mean
    rows = [("dense", "dense")]
    for v in both.variants:
        if v.startswith("DemP λ="):
            peak = v.removeprefix("DemP λ=")
            rows += [(f"DemP λ = {peak}", v), ("structured, same widths",
                                               f"structured (as λ={peak})")]
    for label, v in rows:
        removed = mean("units_removed", v, 0.0)
        macs, params = mean("macs_ratio", v, 1.0), mean("params_ratio", v, 1.0)
        t.add(label, final("test_acc", 100)(both, v),
              f"{100 * removed:.1f}%" if removed else "0",
              f"{100 * macs:.1f}%" if macs < 1 else "100%",
              f"{100 * params:.1f}%" if params < 1 else "100%")
    return t


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--peaks", default=",".join(str(x) for x in REG_PEAKS))
    p.add_argument("--train-size", type=int, default=None,
                   help="train on this many training samples (default: all 55k)")
    args = p.parse_args()
    out = Path(args.out)
    peaks = [float(x) for x in args.peaks.split(",")]
    epochs, seeds, size = (1, [0], 4000) if args.quick else (args.epochs, [0, 1, 2],
                                                               args.train_size)
    for model in [] if args.pages_only else args.models.split(","):
        cfg = base(model, epochs, size)
        first_spec = CompareSpec(cfg, {"dense": {}, **demp_variants(peaks)}, seeds,
                                 name=f"demp_{model}")
        run_compare(first_spec, args.root, first_spec.folder(out), show_progress=False,
                    jobs=args.jobs)
        first = load_comparison(first_spec.folder(out), args.root)
        second_spec = CompareSpec(cfg, matched_baselines(first, peaks), seeds,
                                  name=f"demp_{model}_structured")
        run_compare(second_spec, args.root, second_spec.folder(out), show_progress=False,
                    jobs=args.jobs)
        second = load_comparison(second_spec.folder(out), args.root)
        both = first + second
        removed, acc = final_values(both, "units_removed"), final_values(both, "test_acc")
        series = {}
        for label, prefix in (("DemP", "DemP"), ("structured L1", "structured")):
            pts = sorted((mean_std(removed[v])[0], *mean_std(acc[v]))
                         for v in both.variants if v.startswith(prefix))
            series[label] = ([x for x, _, _ in pts], [m for _, m, _ in pts], [s for _, _, s in pts])
        dense = mean_std(acc["dense"])
        series["dense"] = ([0.0], [dense[0]], [dense[1]])
        plot_series([(f"{model}: test accuracy %", series)], out / f"{first_spec.name}.png",
                    xlabel="fraction of units removed", scale=100)
        write_section(first_spec.folder(out), "\n".join([
            f"## {model}", "",
            f"Machine: {first.machine}. Training samples: {size or 'all'}. "
            f"AdamW lr 5e-3 (wd 5e-4), cosine, {epochs} epochs, seeds {seeds}. "
            + regenerate(first), "",
            table(both).to_markdown(), "", f"![{model}]({first_spec.name}.png)"]))
    order = list(MODELS)
    found = sorted(((f, sp) for f, sp in comparisons(out, "demp_")
                    if "dense" in sp.get("variants", {})),
                   key=lambda fs: order.index(fs[1]["base"]["model"]))
    text = ["# DemP vs structured pruning on Fashion-MNIST", "",
            "DemP: L1 on BN scales, one-cycle over 90% of the steps, noise peak 5e-5, death "
            "check every 100 steps on 2048 training samples. Structured: L1-norm of filters, "
            "cubic schedule from 10% to 70% of the steps, to DemP's final widths.", ""]
    for folder, _ in found:
        text += [read_section(folder), ""]
        results_block(out.parent / "results.md", folder, args.root,
                      lambda demp, structured: headline(demp + structured), "_structured")
    (out / "demp.md").write_text("\n".join(text))
    print(f"wrote {out / 'demp.md'}")


if __name__ == "__main__":
    main()
