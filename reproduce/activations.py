"""Sparsity-inducing activations (Price et al., ICLR 2024) in a deep plain MLP on
Fashion-MNIST (no norm layers, no residuals), every network initialised on the edge of chaos
for its activation and target sparsity (q* = 1):

    ReLU (s = 0.5)  vs  ReLU_tau / ST_tau  vs  CReLU / CST with V'(q*) in {0.5, 0.7, 0.9}
    at s in {0.6, 0.7, 0.8, 0.85, 0.9}

Reports test accuracy and measured train/test activation sparsity per configuration, and the
pre-activation variance through depth at initialisation (theory vs measured).
Writes docs/results/activations.md and its plots.

    python reproduce/activations.py --jobs 2     # ~1.5 h on 2 CPU cores
    python reproduce/activations.py --quick      # 1 seed, 1 epoch, two sparsities
    python reproduce/activations.py --jobs 2 --epochs 20 --sparsities 0.85,0.9 \
        --v-primes 0.7,0.9 --clipped crelu       # the longer budget (~35 min)
    python reproduce/activations.py --jobs 2 --epochs 30 --sparsities 0.85,0.87 \
        --v-primes 0.7 --clipped crelu           # >= 85% measured sparsity (~45 min)

--q-star sets the fixed point q* of every edge-of-chaos init (default 1; Dent & Tanner
2026 propose a larger one at high sparsity).

Each epoch budget has its own folder (activations_mlp for 10 epochs, activations_mlp_<E>ep
otherwise; --name <N> makes it activations_mlp_<N>); the page shows every folder that
exists, so a later run with other options adds a table and keeps the earlier ones.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from dormant import eoc
from dormant.activations import make_activation
from dormant.data import load_dataset
from dormant.experiments import CompareSpec, ExperimentConfig, reproduce_parser, run_compare
from dormant.models import build_model
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
    versus,
    write_section,
)
from dormant.tables import Column, Table

SPARSITIES = (0.6, 0.7, 0.8, 0.85, 0.9)
V_PRIMES = (0.5, 0.7, 0.9)


CLIPPED = {"crelu": "CReLU", "cst": "CST"}
UNCLIPPED = {"shifted_relu": "ReLU_tau", "soft_threshold": "ST_tau"}
# comparisons whose whole table is a table of docs/results.md
RESULTS_BLOCKS = ("activations_mlp", "activations_mlp_20ep", "activations_mlp_unclipped")


def variants(sparsities, v_primes=V_PRIMES, clipped=tuple(CLIPPED),
             q_star: float = 1.0) -> dict[str, dict]:
    """ReLU (whose edge-of-chaos init does not depend on q*) and, at each target sparsity,
    the unclipped and clipped activations at the fixed point q*. q* = 1 is left out of the
    config, so runs made before q* was an option keep their names."""
    out = {"ReLU s=0.5": {"activation": "relu", "init_args": {"sparsity": 0.5}}}
    q = {} if q_star == 1.0 else {"q_star": q_star}
    for s in sparsities:
        for kind, label in UNCLIPPED.items():
            out[f"{label} s={s}"] = {"activation": kind, "init_args": {"sparsity": s, **q}}
        for kind in clipped:
            label = CLIPPED[kind]
            for vp in v_primes:
                out[f"{label} s={s} V'={vp}"] = {
                    "activation": kind, "init_args": {"sparsity": s, "v_prime": vp, **q}}
    return out


def spec(depth: int, width: int, epochs: int, seeds, sparsities, v_primes=V_PRIMES,
         clipped=tuple(CLIPPED), q_star: float = 1.0, name: str = "") -> CompareSpec:
    """The comparison of one budget; its folder is activations_mlp (10 epochs),
    activations_mlp_<E>ep, or activations_mlp_<name> for a named sweep."""
    base = ExperimentConfig(dataset="fashion-mnist", model="mlp",
                            model_args={"depth": depth, "width": width}, init="eoc",
                            optimizer="sgd", lr=0.003, momentum=0.9, batch_size=128,
                            epochs=epochs, schedule="cosine", schedule_args={"final": 0.0})
    name = name or ("" if epochs == 10 else f"{epochs}ep")
    return CompareSpec(base, variants(sparsities, v_primes, clipped, q_star), seeds,
                       title=f"Deep plain MLP ({depth} x {width}) on Fashion-MNIST",
                       columns=["sparsity", "test_sparsity"],
                       name="activations_mlp" + (f"_{name}" if name else ""))


def diverged(cmp, variant: str) -> str:
    """How many of the variant's runs diverged, of how many: "3/3"."""
    div = final_values(cmp, "diverged", 0.0).get(variant, [])
    return f"{int(sum(div))}/{sum(1 for name, _ in cmp.runs if name == variant)}"


def results_table(cmp) -> Table:
    """Accuracy over all seeds and its gap to ReLU paired by seed; sparsities over the seeds
    that did not diverge (a diverged run records no activity statistics)."""
    return variant_table(cmp, [
        (Column("test acc %"), final("test_acc", 100)),
        (Column("vs ReLU (paired)", sign=True), versus("test_acc", "ReLU s=0.5", 100)),
        (Column("train sparsity %", fmt="{:.1f}"), final("dynamic_dnr", 100)),
        (Column("test sparsity %", fmt="{:.1f}"), final("test_sparsity", 100)),
        (Column("diverged"), diverged)], first=Column("activation", align="left"))


def criterion_table(*cmps) -> Table:
    """The results page's table of the clipped activations near and above s = 0.85: for each
    comparison (a budget and q*), its ReLU baseline (once per budget) and every clipped
    variant, with its gap to that ReLU paired by seed and whether the unclipped ones at the
    same target diverged."""
    t = Table([Column("budget", align="left"), Column("activation", align="left"),
               Column("q*", fmt="{:g}"), Column("test acc %"),
               Column("vs ReLU (paired)", sign=True), Column("test sparsity %", fmt="{:.1f}"),
               Column("ReLU_tau / ST_tau diverged", align="left")])
    acc, vs = final("test_acc", 100), versus("test_acc", "ReLU s=0.5", 100)
    sparsity, seen = final("test_sparsity", 100), set()
    for cmp in cmps:
        budget, variants = f"{cmp.spec['base']['epochs']} epochs", cmp.spec["variants"]
        for v in cmp.variants:
            if v == "ReLU s=0.5" and budget not in seen:
                seen.add(budget)
                t.add(budget, v, None, acc(cmp, v), None, sparsity(cmp, v), None)
            elif variants[v]["activation"] in CLIPPED:
                init = variants[v]["init_args"]
                same = [u for u in cmp.variants if variants[u]["activation"] in UNCLIPPED
                        and variants[u]["init_args"]["sparsity"] == init["sparsity"]]
                t.add(budget, v, init.get("q_star", 1.0), acc(cmp, v), vs(cmp, v),
                      sparsity(cmp, v),
                      " / ".join(diverged(cmp, u) for u in same))
    return t


def depth_profile(depth: int, width: int, out: Path) -> str:
    """Pre-activation variance per layer at init: measured (one wide net, real inputs) and
    the GP recursion, for ReLU and the four activations at s = 0.85."""
    x = load_dataset("fashion-mnist").train.inputs[:512].flatten(1)
    configs = [("relu", 0.5, None), ("shifted_relu", 0.85, None), ("soft_threshold", 0.85, None),
               ("crelu", 0.85, 0.7), ("cst", 0.85, 0.7)]
    measured, theory = {}, {}
    for kind, s, vp in configs:
        torch.manual_seed(0)
        act = "shifted_relu" if kind == "relu" else kind
        model = build_model("mlp", (784,), 10, activation=functools.partial(make_activation, act),
                            depth=depth, width=width)
        p = eoc.eoc_init(model, act, s, v_prime=vp, example=x)
        label = f"{kind} s={s}" + (f" V'={vp}" if vp else "")
        q = eoc.preactivation_variance(model, x)[:-1]
        measured[label] = (list(range(1, depth + 1)), q, [0.0] * depth)
        theory[label] = (list(range(1, depth + 1)), eoc.iterate_variance(q[0], depth, p),
                         [0.0] * depth)
    plot_series([("measured q (mean square pre-activation)", measured),
                 ("theory: q^(l+1) = V(q^l) from the measured q^1", theory)],
                out / "activations_depth.png", xlabel="layer", xscale="linear")
    rows = ["| activation | q at layer 1 | layer depth/2 | layer depth | theory at depth |",
            "|---|---:|---:|---:|---:|"]
    for k in measured:
        q, t = measured[k][1], theory[k][1]
        rows.append(f"| {k} | {q[0]:.3f} | {q[depth // 2 - 1]:.3f} | {q[-1]:.3f} | {t[-1]:.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = reproduce_parser(__doc__)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)),
                   help="target sparsities s, comma-separated")
    p.add_argument("--v-primes", default=",".join(map(str, V_PRIMES)),
                   help="targets V'(q*) of the clipped activations, comma-separated")
    p.add_argument("--clipped", default=",".join(CLIPPED),
                   help=f"clipped activations to run, comma-separated (of {', '.join(CLIPPED)})")
    p.add_argument("--q-star", type=float, default=1.0,
                   help="fixed point q* of the pre-activation variance (Dent & Tanner 2026 "
                        "report that a larger q* helps at high sparsity)")
    p.add_argument("--depth-profile", action="store_true",
                   help="measure the depth profile at initialisation again (kept otherwise: "
                        "it depends on no training, only its last digits vary by CPU)")
    p.add_argument("--name", default="",
                   help="folder suffix for this sweep (default: the epoch budget)")
    args = p.parse_args()
    out = Path(args.out)
    clipped = tuple(k for k in args.clipped.split(",") if k)
    if unknown := [k for k in clipped if k not in CLIPPED]:
        p.error(f"unknown clipped activation {unknown}; choose from {', '.join(CLIPPED)}")
    if not args.q_star > 0:
        p.error(f"--q-star must be > 0, got {args.q_star}")
    if args.quick:
        epochs, seeds, sparsities, v_primes = 1, [0], (0.6, 0.85), V_PRIMES
    else:
        epochs, seeds = args.epochs, [0, 1, 2]
        sparsities = tuple(float(x) for x in args.sparsities.split(","))
        v_primes = tuple(float(x) for x in args.v_primes.split(","))
    sp = spec(args.depth, args.width, epochs, seeds, sparsities, v_primes, clipped,
              args.q_star, args.name)
    if not args.pages_only:
        run_compare(sp, args.root, sp.folder(out), show_progress=False, jobs=args.jobs)
        cmp = load_comparison(sp.folder(out), args.root)
        write_section(sp.folder(out), "\n".join([
            f"## {epochs} epochs{', ' + args.name if args.name else ''}", "",
            f"Machine: {cmp.machine}. Seeds {seeds}, q* = {args.q_star:g}, target sparsities "
            f"{', '.join(map(str, sparsities))}. {regenerate(cmp)}", "",
            results_table(cmp).to_markdown()]))
    profile = out / "activations_depth.md"   # kept: float32 sums differ in the last digits
    if args.depth_profile or not profile.exists():                 # across CPUs and runs
        profile.write_text(
            f"## Pre-activation variance through depth at initialisation (width 1024, "
            f"{args.depth} layers)\n\n{depth_profile(args.depth, 1024, out)}\n\n"
            "![depth](activations_depth.png)\n")
    text = ["# Sparsity-inducing activations on Fashion-MNIST", "",
            f"Deep plain MLP {args.depth} x {args.width}, SGD momentum 0.9, lr 0.003 (the best "
            "of 0.003, 0.01, 0.03 for ReLU and CReLU in a 3-epoch pilot) with cosine decay, "
            "every network initialised on the edge of chaos for its activation and target "
            "sparsity (q* = 1 unless a section says otherwise). Train sparsity: exact zeros on training batches during the "
            "last epoch (sampled every 10th step); test sparsity: exact zeros on the whole "
            "test split after training. 'vs ReLU': test accuracy minus the ReLU baseline's, "
            "same seed, mean ± std over seeds.", ""]
    page = out.parent / "results.md"
    for folder, _ in comparisons(out, "activations_mlp"):
        text += [read_section(folder), ""]
        if folder.name in RESULTS_BLOCKS:
            results_block(page, folder, args.root, results_table)
    results_block(page, out / "activations_mlp_20ep_fine", args.root, criterion_table,
                  out / "activations_mlp_20ep_q2", out / "activations_mlp_30ep",
                  block="activations_mlp_criterion")
    text += [profile.read_text()]
    (out / "activations.md").write_text("\n".join(text))
    print(f"wrote {out / 'activations.md'}")


if __name__ == "__main__":
    main()
