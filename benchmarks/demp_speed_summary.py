"""Summarise outputs of benchmarks/demp_speed.py as a markdown table: one row per setting
(model width, training batch, DemP peak and span), seeds pooled as mean ± std.

    python benchmarks/demp_speed_summary.py docs/results/demp_gpu/*.txt

Each input is the stdout of one demp_speed.py run. Runs whose file name contains
"oldnoise" were made before DemP's noise used multi-tensor ops and are marked as such.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from dormant.report import mean_std

HEADER = re.compile(r"torch (?P<torch>\S+), (?P<where>[^;]+); (?P<model>\S+)(?: width (?P<width>[\d.]+))? "
                    r"on \S+(?: \((?P<n>\d+) training samples, batch (?P<batch>\d+)\))?,? (?P<epochs>\d+) "
                    r"epochs, DemP reg_peak=(?P<peak>[\d.e-]+)(?: span=(?P<span>[\d.e-]+))?")
ACC = re.compile(r"test acc: dense (?P<dense>[\d.]+)%, DemP (?P<demp>[\d.]+)%")
TRAIN = re.compile(r"training speed-up \(dense time / DemP time\): (?P<x>[\d.]+)x")
INFER = re.compile(r"inference \(batch \d+\): .* speed-up (?P<x>[\d.]+)x; FLOP reduction "
                   r"(?P<flop>[\d.]+)x")
STEP = re.compile(r"training step \(batch \d+\), final widths: dense (?P<dense>[\d.]+) ms, "
                  r"compacted (?P<demp>[\d.]+) ms, speed-up (?P<x>[\d.]+)x")
EPOCH = re.compile(r"^\s*\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(?P<removed>[\d.]+)%(?:\s+\|.*)?$", re.M)


def parse(path: Path) -> dict:
    """The numbers of one demp_speed.py output; ValueError if it is not one."""
    text = path.read_text()
    found = {name: rx.search(text) for name, rx in
             (("header", HEADER), ("acc", ACC), ("train", TRAIN), ("infer", INFER), ("step", STEP))}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise ValueError(f"{path}: not a complete demp_speed.py output (no {', '.join(missing)})")
    h = found["header"]
    removed = EPOCH.findall(text)
    return {"where": h["where"], "width": float(h["width"] or 1), "batch": int(h["batch"] or 128),
            "epochs": int(h["epochs"]), "peak": float(h["peak"]),
            "span": float(h["span"] or 0.9), "old": "oldnoise" in path.name,
            "dense_acc": float(found["acc"]["dense"]), "demp_acc": float(found["acc"]["demp"]),
            "train_x": float(found["train"]["x"]), "infer_x": float(found["infer"]["x"]),
            "flop_x": float(found["infer"]["flop"]), "step_x": float(found["step"]["x"]),
            "removed": float(removed[-1]) if removed else float("nan")}


def pm(values: list[float], digits: int) -> str:
    """One value as is; several as mean ± sample std."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return "{0:.{2}f} ± {1:.{2}f}".format(*mean_std(values), digits)


def setting(run: dict) -> tuple:
    """What makes runs the same setting (their seeds are pooled)."""
    return run["width"], run["batch"], run["peak"], run["span"], run["old"]


def table(runs: list[dict]) -> str:
    keys = sorted({setting(r) for r in runs})
    lines = ["| width | batch | λ peak | span | seeds | units removed | dense acc | DemP − dense "
             "| training, whole run | one step, final widths | inference | FLOP reduction |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in keys:
        rs = [r for r in runs if setting(r) == key]
        w, b, peak, span, old = key
        diff = [r["demp_acc"] - r["dense_acc"] for r in rs]
        lines.append(
            f"| {w:g}{' (old noise code)' if old else ''} | {b} | {peak:g} | {span:g} | {len(rs)} "
            f"| {pm([r['removed'] for r in rs], 1)}% | {pm([r['dense_acc'] for r in rs], 2)} "
            f"| {pm(diff, 2)} | {pm([r['train_x'] for r in rs], 2)}× "
            f"| {pm([r['step_x'] for r in rs], 2)}× | {pm([r['infer_x'] for r in rs], 2)}× "
            f"| {pm([r['flop_x'] for r in rs], 1)}× |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    try:
        runs = [parse(f) for f in args.files]
    except (OSError, ValueError) as err:
        p.error(str(err))
    places = sorted({r["where"] for r in runs})
    print(f"<!-- {len(runs)} runs on {', '.join(places)} -->")
    print(table(runs))


if __name__ == "__main__":
    main()
