"""Synaptic Stripping (Whitaker & Whitley 2023) side by side with ReLU, ReDo and GELU on
Fashion-MNIST: (1) the tiny ViT with a ReLU after both MLP linears, (2) a width/depth
ablation of a ReLU MLP trained where neurons die. Writes docs/results/synaptic_stripping.md
and its plots.

    python reproduce/synaptic_stripping.py --jobs 2          # ~3 h on 2 CPU cores
    python reproduce/synaptic_stripping.py --quick           # 1 seed, 3 epochs: a smoke run

The MLP ablation also runs a second time for longer (--long-epochs, default 30; 0 skips it),
ReLU vs stripping at the paper's cadence (every epoch) only: at 15 epochs the dead count
with per-epoch stripping is still falling when training ends. --long-shapes picks the MLPs
(the w1024 d4 one alone takes ~1 h of it on 2 cores); --long-inputs unit feeds them pixels
in [0, 1] instead of standardised ones (the first layer then reads non-negative inputs;
on w256 d4 at 30 epochs that did not help, see the results); --bias-fallback adds, next
to the paper's rule, SynapticStripping(bias_fallback=True) (a deviation: a dead unit with no
negative weight left loses its negative bias). Each longer budget keeps its own folder
(synaptic_stripping_mlp_<E>ep[_unit][_bias]) and the page shows every one that exists:

    python reproduce/synaptic_stripping.py --jobs 2 --long-epochs 60 --long-shapes 64x4,256x2
    python reproduce/synaptic_stripping.py --jobs 2 --long-epochs 60 --long-shapes 64x4 --bias-fallback

Finished runs are reused (runs/reproduce/...), so an interrupted reproduction resumes.
"""
from __future__ import annotations

from pathlib import Path

from dormant.diagnose import probe
from dormant.experiments import CompareSpec, ExperimentConfig, reproduce_parser, run_compare
from dormant.experiments.compare import columns_for, to_markdown
from dormant.experiments.run import load_run
from dormant.methods.synaptic_stripping import beyond_reach
from dormant.report import (final_values, load_comparison, machine, mean_std, plot_curves,
                            run_dirs)
from dormant.units import fan_in_rows

SCHEDULE = {"schedule": "cosine", "schedule_args": {"warmup": 1, "final": 0.01}}


def stripping(**options) -> dict:
    """The variant fields of synaptic stripping at the paper's factor, plus `options`."""
    return {"method": "synaptic-stripping", "method_args": {"factor": 0.05, **options}}


SS = stripping()
COLUMNS = ["ss/revived", "ss/active_params"]
REACH = ("Units still dead at the end with stripping that the rule can no longer reach: no "
         "negative incoming weight left, so it now strips their smallest positive weights "
         "(nothing once one weight is left), which cannot raise the pre-activation on "
         "non-negative inputs, and the bias it leaves alone keeps them below zero. Counted "
         "from the final weights, dead on the validation split; in layer 1 the inputs are signed "
         "pixels (unless in [0, 1]), where even that argument does not hold:")
FALLBACK = ("**Bias fallback: a deviation from the paper, run next to its rule.** "
            "`SynapticStripping(bias_fallback=True)` treats the bias as the connection from a "
            "constant input 1: a dead unit with no negative incoming weight left and a negative "
            "bias loses its bias (masked to 0 for good) instead of its smallest positive "
            "weights; every other unit gets the paper's rule. The ReLU and paper-rule runs are "
            "the same runs as in the ablation of the same length above (same configs).")


def vit_spec(epochs: int, seeds) -> CompareSpec:
    base = ExperimentConfig(dataset="fashion-mnist", model="vit-tiny", optimizer="adamw",
                            lr=3e-3, weight_decay=5e-5, batch_size=128, epochs=epochs, **SCHEDULE)
    variants = {
        "ReLU": {},
        "ReLU + stripping": SS,
        "ReLU + ReDo (tau=0)": {"method": "redo", "method_args": {"tau": 0.0}},
        "ReLU + ReDo (tau=0.1)": {"method": "redo", "method_args": {"tau": 0.1}},
        "GELU": {"activation": "gelu"},
    }
    return CompareSpec(base, variants, seeds, title="Tiny ViT on Fashion-MNIST",
                       columns=COLUMNS)


SHAPES = [(64, 4), (256, 4), (1024, 4), (256, 2), (256, 8)]   # (width, depth)


def shape_name(width: int, depth: int) -> str:
    return f"w{width} d{depth}"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"64x4,256x8" -> [(64, 4), (256, 8)]; ValueError unless every item is WIDTHxDEPTH with
    positive ints."""
    shapes = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            raise ValueError(item)
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def mlp_spec(epochs: int, seeds, per_steps: bool = True, shapes=SHAPES,
             unit_inputs: bool = False, bias_fallback: bool = False) -> CompareSpec:
    base = ExperimentConfig(dataset="fashion-mnist", model="mlp", optimizer="adam", lr=1e-2,
                            batch_size=128, epochs=epochs, **SCHEDULE,
                            dataset_args={"standardize": False} if unit_inputs else {})
    variants = {}
    for width, depth in shapes:
        arch, name = {"model_args": {"width": width, "depth": depth}}, shape_name(width, depth)
        variants[f"{name} ReLU"] = arch
        variants[f"{name} + stripping"] = {**arch, **SS}
        if bias_fallback:   # a deviation from the paper, next to its rule
            variants[f"{name} + stripping, bias fallback"] = {**arch,
                                                               **stripping(bias_fallback=True)}
        if per_steps:
            variants[f"{name} + stripping/100 steps"] = {**arch, **stripping(every_steps=100)}
    return CompareSpec(base, variants, seeds, title="ReLU MLP ablation on Fashion-MNIST",
                       columns=COLUMNS)


def reduction_table(cmp, pairs) -> str:
    """Dead units at the end: baseline vs method, and the reduction, per seed mean ± std."""
    dead = final_values(cmp, "dead_units")
    acc = final_values(cmp, "test_acc")
    lines = ["| setting | dead, ReLU | dead, method | fewer dead | acc ReLU % | acc method % |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, base, method in pairs:
        b, m = mean_std(dead[base]), mean_std(dead[method])
        red = 100 * (1 - m[0] / b[0]) if b[0] > 0 else float("nan")
        ab, am = mean_std([100 * a for a in acc[base]]), mean_std([100 * a for a in acc[method]])
        lines.append(f"| {label} | {b[0]:.1f} ± {b[1]:.1f} | {m[0]:.1f} ± {m[1]:.1f} | "
                     f"{red:.0f}% | {ab[0]:.2f} ± {ab[1]:.2f} | {am[0]:.2f} ± {am[1]:.2f} |")
    return "\n".join(lines)


def layer_table(cmp, shapes, methods) -> str:
    """Dead units at the end in the first hidden layer (fed by the pixels: signed when they
    are standardised) and in the deeper layers (fed by ReLU outputs), mean over seeds."""
    first_frac, dead = final_values(cmp, "dead/act1"), final_values(cmp, "dead_units")

    def split(variant: str, width: int) -> tuple[float, float]:
        first = [f * width for f in first_frac[variant]]
        return mean_std(first)[0], mean_std([d - a for d, a in zip(dead[variant], first)])[0]

    lines = ["| shape | variant | dead in layer 1 | dead in layers 2+ | fewer dead in layers 2+ |",
             "|---|---|---:|---:|---:|"]
    for width, depth in shapes:
        shape = shape_name(width, depth)
        base = split(f"{shape} ReLU", width)
        lines.append(f"| {shape} | ReLU | {base[0]:.1f} | {base[1]:.1f} | |")
        for label, suffix in methods:
            if f"{shape}{suffix}" not in cmp.variants:
                continue
            first, rest = split(f"{shape}{suffix}", width)
            red = 100 * (1 - rest / base[1]) if base[1] > 0 else float("nan")
            lines.append(f"| {shape} | {label} | {first:.1f} | {rest:.1f} | {red:.0f}% |")
    return "\n".join(lines)


def reach_counts(run_dir: Path, datasets: dict | None = None) -> tuple[int, int, int]:
    """(dead, beyond reach, of those with <= 1 incoming weight left) at the end of a run, from
    its final weights: dead on the validation split (the rule's probe), beyond reach = no
    negative incoming weight left (see SynapticStripping). `datasets`: see load_run."""
    cfg, model, data = load_run(run_dir, datasets)
    mon = probe(model, data.val.inputs)
    dead = mon.dead_units("never_active")
    counts = [0, 0, 0]
    for site in mon.sites.values():
        rows = fan_in_rows(model, site).detach()
        out = beyond_reach(rows, dead[site.name])
        counts[0] += int(dead[site.name].sum())
        counts[1] += int(out.sum())
        counts[2] += int((out & ((rows != 0).sum(1) <= 1)).sum())
    return counts[0], counts[1], counts[2]


def reach_table(folder: Path, root: str, variants) -> str:
    """Of the units still dead at the end with stripping, how many the rule can no longer
    reach, mean over seeds (read from each run's final weights)."""
    runs, datasets = run_dirs(folder, root), {}    # one dataset load for the whole table
    lines = ["| variant | dead at the end | no negative weight left | of them, <= 1 weight left |",
             "|---|---:|---:|---:|"]
    for v in variants:
        dirs = [d for name, d in runs if name == v]
        if not dirs:
            continue
        counts = list(zip(*(reach_counts(d, datasets) for d in dirs)))
        cells = " | ".join(f"{mean_std(c)[0]:.1f}" for c in counts)
        lines.append(f"| {v} | {cells} |")
    return "\n".join(lines)


def long_folder(out: Path, epochs: int, unit_inputs: bool, bias_fallback: bool = False) -> Path:
    return out / (f"synaptic_stripping_mlp_{epochs}ep" + ("_unit" if unit_inputs else "")
                  + ("_bias" if bias_fallback else ""))


def spec_shapes(cmp) -> list[tuple[int, int]]:
    """The (width, depth) of every MLP in a comparison, by depth then width."""
    shapes = {(v["model_args"]["width"], v["model_args"]["depth"])
              for v in cmp.spec["variants"].values()}
    return sorted(shapes, key=lambda s: (s[1], s[0]))


def long_section(cmp, folder: Path, root: str, cols, out: Path) -> list[str]:
    """One longer MLP ablation (ReLU vs stripping every epoch), read from its folder: the
    options that made it come from its spec."""
    epochs = cmp.spec["base"]["epochs"]
    unit = cmp.spec["base"]["dataset_args"].get("standardize", True) is False
    shapes = spec_shapes(cmp)
    names = [shape_name(*s) for s in shapes]
    shown = [n for n in ("w256 d8", "w1024 d4") if n in names] or names[-1:]
    plot = out / f"{folder.name}.png"
    plot_curves(cmp.select([v for v in cmp.variants if v.startswith(tuple(shown))]),
                ["dead_units", "test_acc"], plot,
                titles={"dead_units": f"dead units, {' and '.join(shown)}, {epochs} epochs",
                        "test_acc": "test accuracy %"},
                scale={"test_acc": 100})
    fallback = any(v.endswith(", bias fallback") for v in cmp.variants)
    opts = (f"--long-epochs {epochs} --long-shapes {','.join(f'{w}x{d}' for w, d in shapes)}"
            + (" --bias-fallback" if fallback else ""))
    pairs = [(f"{n}, every epoch, {epochs} epochs", f"{n} ReLU", f"{n} + stripping")
             for n in names]
    methods = [("stripping every epoch", " + stripping")]
    if fallback:
        pairs += [(f"{n}, bias fallback, {epochs} epochs", f"{n} ReLU",
                   f"{n} + stripping, bias fallback") for n in names]
        methods += [("stripping, bias fallback", " + stripping, bias fallback")]
    inputs = ("pixels in [0, 1] (non-negative, not standardised), so stripping can revive "
              "first-layer units too" if unit else "standardised pixels, as above")
    return [f"## ReLU MLP, {epochs} epochs, stripping every epoch"
            + (", inputs in [0, 1]" if unit else "")
            + (", with the bias fallback (a deviation)" if fallback else ""), "",
            *([FALLBACK, ""] if fallback else []),
            f"The ablation trained for {epochs} epochs (the cosine schedule stretched to the "
            f"new length), ReLU vs stripping at the paper's cadence; inputs: {inputs}. "
            f"Regenerate with `python reproduce/synaptic_stripping.py --jobs 2 {opts}"
            + (" --long-inputs unit" if unit else "") + "`.", "",
            to_markdown(cmp.rows, cols), "",
            reduction_table(cmp, pairs), "",
            layer_table(cmp, shapes, methods), "",
            REACH, "",
            reach_table(folder, root, [f"{n}{x}" for n in names for _, x in methods]), "",
            f"![MLP curves, {epochs} epochs]({plot.name})", ""]


def long_folders(out: Path) -> list[Path]:
    """Every longer ablation that has been run, by epochs, standardised inputs first."""
    found = [f for f in out.glob("synaptic_stripping_mlp_*ep*") if (f / "compare.json").exists()]
    key = lambda f: (int(f.name.split("_")[3].removesuffix("ep")), "_unit" in f.name,
                     f.name.endswith("_bias"))
    return sorted(found, key=key)


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--long-epochs", type=int, default=30,
                   help="epochs of the longer MLP ablation (ReLU vs per-epoch stripping); "
                        "0 skips it")
    p.add_argument("--long-shapes", default=",".join(f"{w}x{d}" for w, d in SHAPES),
                   help="WIDTHxDEPTH of the MLPs in the longer ablation, comma-separated")
    p.add_argument("--long-inputs", choices=("standardised", "unit"), default="standardised",
                   help="pixels of the longer ablation: standardised (as the 15-epoch one) "
                        "or unit (in [0, 1], non-negative)")
    p.add_argument("--bias-fallback", action="store_true",
                   help="add, next to the paper's rule, stripping with bias_fallback=True (a "
                        "deviation: a dead unit with no negative weight left loses its "
                        "negative bias); the ablation gets its own folder (suffix _bias)")
    args = p.parse_args()
    if args.long_epochs < 0:
        p.error("--long-epochs must be >= 0")
    try:
        long_shapes = parse_shapes(args.long_shapes)
    except ValueError:
        p.error(f"--long-shapes: expected WIDTHxDEPTH,... with positive ints, "
                f"got {args.long_shapes!r}")
    epochs, seeds = (3, [0]) if args.quick else (15, [0, 1, 2])
    long_epochs = 0 if args.quick else args.long_epochs
    out = Path(args.out)
    unit = args.long_inputs == "unit"
    specs = [(out / "synaptic_stripping_vit", vit_spec(epochs, seeds)),
             (out / "synaptic_stripping_mlp", mlp_spec(epochs, seeds))]
    if long_epochs:
        specs.append((long_folder(out, long_epochs, unit, args.bias_fallback),
                      mlp_spec(long_epochs, seeds, per_steps=False, shapes=long_shapes,
                               unit_inputs=unit, bias_fallback=args.bias_fallback)))
    for folder, spec in specs:
        run_compare(spec, args.root, folder, show_progress=False, jobs=args.jobs)
    vit = load_comparison(out / "synaptic_stripping_vit", args.root)
    mlp = load_comparison(out / "synaptic_stripping_mlp", args.root)
    plot_curves(vit, ["dead_units", "test_acc", "weight_sparsity"],
                out / "synaptic_stripping_vit.png",
                titles={"dead_units": "dead units (never active on val)",
                        "test_acc": "test accuracy %", "weight_sparsity": "weight sparsity %"},
                scale={"test_acc": 100, "weight_sparsity": 100})
    order = spec_shapes(mlp)
    shapes = [shape_name(*s) for s in order]
    plot_curves(mlp.select([v for v in mlp.variants if v.startswith("w256 d4")]),
                ["dead_units", "test_acc"], out / "synaptic_stripping_mlp.png",
                titles={"dead_units": "dead units, MLP w256 d4", "test_acc": "test accuracy %"},
                scale={"test_acc": 100})
    cols = columns_for(COLUMNS)
    command = "python reproduce/synaptic_stripping.py --jobs 2" + (
        " --quick" if args.quick else "")
    text = [
        "# Synaptic Stripping on Fashion-MNIST",
        "",
        f"Machine: {machine()}. Epochs: {epochs}, seeds: {seeds}. Regenerate with "
        f"`{command}` (each longer ablation below names its own options).",
        "",
        "## Tiny ViT (ReLU after both MLP linears)",
        "",
        to_markdown(vit.rows, cols),
        "",
        reduction_table(vit, [("tiny ViT, stripping", "ReLU", "ReLU + stripping"),
                              ("tiny ViT, ReDo tau=0", "ReLU", "ReLU + ReDo (tau=0)")]),
        "",
        "![ViT curves](synaptic_stripping_vit.png)",
        "",
        "## ReLU MLP: width and depth",
        "",
        to_markdown(mlp.rows, cols),
        "",
        reduction_table(mlp, [(f"{s}, every epoch", f"{s} ReLU", f"{s} + stripping")
                              for s in shapes]
                        + [(f"{s}, every 100 steps", f"{s} ReLU", f"{s} + stripping/100 steps")
                           for s in shapes]),
        "",
        "![MLP curves](synaptic_stripping_mlp.png)",
        "",
        "Where the dead units are at the end. Stripping a negative weight raises a unit's "
        "pre-activation only where that input is >= 0; the first hidden layer reads "
        "standardised pixels, 60% of them negative, so stripping cannot be relied on there:",
        "",
        layer_table(mlp, order, [("stripping every epoch", " + stripping"),
                                  ("stripping every 100 steps", " + stripping/100 steps")]),
        "",
        REACH,
        "",
        reach_table(out / "synaptic_stripping_mlp", args.root,
                    [f"{n}{x}" for n in shapes for x in (" + stripping", " + stripping/100 steps")]),
        "",
    ]
    for folder in long_folders(out):
        text += long_section(load_comparison(folder, args.root), folder, args.root, cols, out)
    (out / "synaptic_stripping.md").write_text("\n".join(text))
    print(f"wrote {out / 'synaptic_stripping.md'}")


if __name__ == "__main__":
    main()
