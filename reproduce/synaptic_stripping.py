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

import json
from pathlib import Path

from dormant.diagnose import probe
from dormant.experiments import CompareSpec, ExperimentConfig, reproduce_parser, run_compare
from dormant.experiments.compare import columns_for, to_markdown
from dormant.experiments.run import load_run
from dormant.methods.synaptic_stripping import beyond_reach
from dormant.report import (
    comparisons,
    final_values,
    load_comparison,
    plot_curves,
    read_section,
    regenerate,
    run_dirs,
    table_rows,
    write_block,
    write_section,
)
from dormant.tables import Column, Table, mean_std, reduction, stat
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
                       columns=COLUMNS, name="synaptic_stripping_vit")


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
             unit_inputs: bool = False, bias_fallback: bool = False,
             name: str = "synaptic_stripping_mlp") -> CompareSpec:
    base = ExperimentConfig(dataset="fashion-mnist", model="mlp", optimizer="adam", lr=1e-2,
                            batch_size=128, epochs=epochs, **SCHEDULE,
                            dataset_args={"standardize": False} if unit_inputs else {})
    variants = {}
    for width, depth in shapes:
        arch, shape = {"model_args": {"width": width, "depth": depth}}, shape_name(width, depth)
        variants[f"{shape} ReLU"] = arch
        variants[f"{shape} + stripping"] = {**arch, **SS}
        if bias_fallback:   # a deviation from the paper, next to its rule
            variants[f"{shape} + stripping, bias fallback"] = {**arch,
                                                               **stripping(bias_fallback=True)}
        if per_steps:
            variants[f"{shape} + stripping/100 steps"] = {**arch, **stripping(every_steps=100)}
    return CompareSpec(base, variants, seeds, title="ReLU MLP ablation on Fashion-MNIST",
                       columns=COLUMNS, name=name)


def long_spec(epochs: int, seeds, shapes, unit_inputs: bool, bias_fallback: bool
              ) -> CompareSpec:
    """A longer ablation (ReLU vs stripping every epoch), in its own folder:
    synaptic_stripping_mlp_<E>ep[_unit][_bias]."""
    name = (f"synaptic_stripping_mlp_{epochs}ep" + ("_unit" if unit_inputs else "")
            + ("_bias" if bias_fallback else ""))
    return mlp_spec(epochs, seeds, per_steps=False, shapes=shapes, unit_inputs=unit_inputs,
                    bias_fallback=bias_fallback, name=name)


def reduction_table(cmp, pairs) -> Table:
    """Dead units at the end: baseline vs method, and the reduction, per seed mean ± std."""
    dead = final_values(cmp, "dead_units")
    acc = final_values(cmp, "test_acc")
    t = Table([Column("setting", align="left"), Column("dead, ReLU", fmt="{:.1f}"),
               Column("dead, method", fmt="{:.1f}"), Column("fewer dead"),
               Column("acc ReLU %"), Column("acc method %")])
    for label, base, method in pairs:
        b, m = stat(dead[base]), stat(dead[method])
        t.add(label, b, m, f"{100 * reduction(b.mean, m.mean):.0f}%", stat(acc[base], 100),
              stat(acc[method], 100))
    return t


def layer_table(cmp, shapes, methods) -> Table:
    """Dead units at the end in the first hidden layer (fed by the pixels: signed when they
    are standardised) and in the deeper layers (fed by ReLU outputs), mean over seeds."""
    first_frac, dead = final_values(cmp, "dead/act1"), final_values(cmp, "dead_units")

    def split(variant: str, width: int) -> tuple[float, float]:
        first = [f * width for f in first_frac[variant]]
        return mean_std(first)[0], mean_std([d - a for d, a in zip(dead[variant], first)])[0]

    t = Table([Column("shape", align="left"), Column("variant", align="left"),
               Column("dead in layer 1", fmt="{:.1f}"), Column("dead in layers 2+", fmt="{:.1f}"),
               Column("fewer dead in layers 2+")])
    for width, depth in shapes:
        shape = shape_name(width, depth)
        base = split(f"{shape} ReLU", width)
        t.add(shape, "ReLU", base[0], base[1], "")
        for label, suffix in methods:
            if f"{shape}{suffix}" not in cmp.variants:
                continue
            first, rest = split(f"{shape}{suffix}", width)
            t.add(shape, label, first, rest, f"{100 * reduction(base[1], rest):.0f}%")
    return t


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


def reach_table(folder: Path, root: str, variants) -> Table:
    """Of the units still dead at the end with stripping, how many the rule can no longer
    reach, mean over seeds (read from each run's final weights)."""
    runs, datasets = run_dirs(folder, root), {}    # one dataset load for the whole table
    t = Table([Column("variant", align="left"),
               *(Column(c, fmt="{:.1f}") for c in ("dead at the end", "no negative weight left",
                                                    "of them, <= 1 weight left"))])
    for v in variants:
        dirs = [d for name, d in runs if name == v]
        if not dirs:
            continue
        counts = list(zip(*(reach_counts(d, datasets) for d in dirs)))
        t.add(v, *(stat(c).mean for c in counts))
    return t


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
            f"Machine: {cmp.machine}. The ablation trained for {epochs} epochs (the cosine "
            "schedule stretched to the new length), ReLU vs stripping at the paper's cadence; "
            f"inputs: {inputs}. {regenerate(cmp)}", "",
            to_markdown(cmp.rows, cols), "",
            reduction_table(cmp, pairs).to_markdown(), "",
            layer_table(cmp, shapes, methods).to_markdown(), "",
            REACH, "",
            reach_table(folder, root, [f"{n}{x}" for n in names for _, x in methods])
            .to_markdown(), "",
            f"![MLP curves, {epochs} epochs]({plot.name})"]


def long_folders(out: Path) -> list[Path]:
    """Every longer ablation that has been run, by epochs, standardised inputs first, the
    paper's rule alone before the one with the bias fallback (read from their specs)."""
    def key(spec: dict) -> tuple:
        unit = spec["base"].get("dataset_args", {}).get("standardize", True) is False
        bias = any(v.get("method_args", {}).get("bias_fallback")
                   for v in spec["variants"].values())
        return spec["base"]["epochs"], unit, bias
    found = comparisons(out, "synaptic_stripping_mlp_")
    return [f for f, _ in sorted(found, key=lambda fs: key(fs[1]))]


# --- the tables of docs/results.md, from the comparison tables alone (compare.json rows) ---

def _dead(row: dict, base: dict | None = None, std: bool = True) -> str:
    """Dead units at the end: "14.7 ± 2.5", "0" when none, "(−98%)" against `base`."""
    m, sd = row["dead_units"]
    if m == 0:
        return "0"
    text = f"{m:.1f} ± {sd:.1f}" if std else f"{m:.1f}"
    return text + (f" (−{100 * reduction(base['dead_units'][0], m):.0f}%)" if base else "")


def _acc(row: dict) -> str:
    return "{:.2f} ± {:.2f}".format(*row["test_acc"])


def _by_size(rows: dict) -> list[str]:
    """The MLP shapes of a comparison, by width then depth ("w64 d4", "w256 d2", ...)."""
    names = {v.split(" + ")[0].removesuffix(" ReLU") for v in rows}
    return sorted(names, key=lambda n: tuple(int(x[1:]) for x in n.split()))


def summary_tables(out: Path) -> dict[str, str]:
    """docs/results.md's Synaptic Stripping tables, by block name, for the comparisons there."""
    tables = {}
    if (out / "synaptic_stripping_vit" / "compare.json").exists():
        rows = table_rows(out / "synaptic_stripping_vit")
        t = Table([Column("variant", align="left"), Column("test acc %"),
                   Column("dead units at the end"), Column("weight sparsity")])
        for v, r in rows.items():
            sp = r.get("weight_sparsity")
            t.add(v.replace("(tau=", "τ=").rstrip(")") if "ReDo" in v else v, _acc(r),
                  _dead(r, None if v == "ReLU" else rows["ReLU"]),
                  f"{sp[0]:.1f}%" if sp and sp[0] else "–")
        tables["synaptic_stripping_vit"] = t.to_markdown()
    if (out / "synaptic_stripping_mlp" / "compare.json").exists():
        rows = table_rows(out / "synaptic_stripping_mlp")
        t = Table([Column("MLP", align="left"), Column("dead, ReLU"),
                   Column("dead, stripping every epoch"), Column("dead, every 100 steps"),
                   Column("acc ReLU %"), Column("acc every epoch %"),
                   Column("acc every 100 steps %")])
        for n in _by_size(rows):
            base, ep, st = (rows[f"{n} ReLU"], rows[f"{n} + stripping"],
                            rows[f"{n} + stripping/100 steps"])
            t.add(n, _dead(base, std=False), _dead(ep, base, std=False),
                  _dead(st, base, std=False), _acc(base), _acc(ep), _acc(st))
        tables["synaptic_stripping_mlp"] = t.to_markdown()
    long = Table([Column("MLP", align="left"), Column("dead, ReLU"),
                  Column("dead, stripping every epoch"), Column("acc ReLU %"),
                  Column("acc stripping %")])
    bias = Table([Column("MLP", align="left"), Column("dead, ReLU"), Column("paper's rule"),
                  Column("with bias fallback"), Column("acc ReLU %"),
                  Column("acc paper's rule %"), Column("acc bias fallback %")])
    plain, fallback = [], []            # longer ablations, standardised inputs only
    for folder in long_folders(out):
        spec = json.loads((folder / "compare.json").read_text())["spec"]
        if spec["base"].get("dataset_args", {}).get("standardize", True) is False:
            continue
        rows = table_rows(folder)
        on = fallback if any(v.endswith("bias fallback") for v in rows) else plain
        on.append((spec["base"]["epochs"], rows))
    for epochs, rows in plain:
        for n in _by_size(rows):
            b, m = rows[f"{n} ReLU"], rows[f"{n} + stripping"]
            long.add(n if epochs == plain[0][0] else f"{n}, {epochs} epochs", _dead(b),
                     _dead(m, b), _acc(b), _acc(m))
    for epochs, rows in sorted(fallback, key=lambda er: -er[0]):
        for n in _by_size(rows):
            b, m, f = (rows[f"{n} ReLU"], rows[f"{n} + stripping"],
                       rows[f"{n} + stripping, bias fallback"])
            bias.add(f"{n}, {epochs} epochs", _dead(b), _dead(m, b), _dead(f, b), _acc(b),
                     _acc(m), _acc(f))
    if long.rows:
        tables["synaptic_stripping_long"] = long.to_markdown()
    if bias.rows:
        tables["synaptic_stripping_bias"] = bias.to_markdown()
    return tables


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
    vit_s, mlp_s = vit_spec(epochs, seeds), mlp_spec(epochs, seeds)
    if args.pages_only:
        return write_pages(out, vit_s, mlp_s)
    specs = [vit_s, mlp_s]
    if long_epochs:
        specs.append(long_spec(long_epochs, seeds, long_shapes, unit, args.bias_fallback))
    for spec in specs:
        run_compare(spec, args.root, spec.folder(out), show_progress=False, jobs=args.jobs)
    vit = load_comparison(vit_s.folder(out), args.root)
    mlp = load_comparison(mlp_s.folder(out), args.root)
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
    write_section(vit_s.folder(out), "\n".join([
        "## Tiny ViT (ReLU after both MLP linears)",
        "",
        f"Machine: {vit.machine}. Epochs: {epochs}, seeds: {seeds}. {regenerate(vit)}",
        "",
        to_markdown(vit.rows, cols),
        "",
        reduction_table(vit, [("tiny ViT, stripping", "ReLU", "ReLU + stripping"),
                              ("tiny ViT, ReDo tau=0", "ReLU", "ReLU + ReDo (tau=0)")])
        .to_markdown(),
        "",
        "![ViT curves](synaptic_stripping_vit.png)"]))
    write_section(mlp_s.folder(out), "\n".join([
        "## ReLU MLP: width and depth",
        "",
        f"Machine: {mlp.machine}. Epochs: {epochs}, seeds: {seeds}. {regenerate(mlp)}",
        "",
        to_markdown(mlp.rows, cols),
        "",
        reduction_table(mlp, [(f"{s}, every epoch", f"{s} ReLU", f"{s} + stripping")
                              for s in shapes]
                        + [(f"{s}, every 100 steps", f"{s} ReLU", f"{s} + stripping/100 steps")
                           for s in shapes]).to_markdown(),
        "",
        "![MLP curves](synaptic_stripping_mlp.png)",
        "",
        "Where the dead units are at the end. Stripping a negative weight raises a unit's "
        "pre-activation only where that input is >= 0; the first hidden layer reads "
        "standardised pixels, 60% of them negative, so stripping cannot be relied on there:",
        "",
        layer_table(mlp, order, [("stripping every epoch", " + stripping"),
                                  ("stripping every 100 steps", " + stripping/100 steps")])
        .to_markdown(),
        "",
        REACH,
        "",
        reach_table(mlp_s.folder(out), args.root,
                    [f"{n}{x}" for n in shapes
                     for x in (" + stripping", " + stripping/100 steps")]).to_markdown()]))
    if long_epochs:
        spec = specs[-1]
        write_section(spec.folder(out), "\n".join(long_section(
            load_comparison(spec.folder(out), args.root), spec.folder(out), args.root, cols,
            out)))
    write_pages(out, vit_s, mlp_s)


def write_pages(out: Path, vit_s: CompareSpec, mlp_s: CompareSpec) -> None:
    """synaptic_stripping.md from every section there, and the tables of results.md."""
    text = ["# Synaptic Stripping on Fashion-MNIST", "",
            read_section(vit_s.folder(out)), "", read_section(mlp_s.folder(out)), ""]
    for folder in long_folders(out):
        text += [read_section(folder), ""]
    (out / "synaptic_stripping.md").write_text("\n".join(text))
    for name, table in summary_tables(out).items():
        write_block(out.parent / "results.md", name, table)
    print(f"wrote {out / 'synaptic_stripping.md'}")


if __name__ == "__main__":
    main()
