"""Side-by-side comparisons: variants x seeds, same data and budget, mean +- std."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError, ExperimentConfig
from .run import run_experiment

# (metric key in the final epoch, column title, scale, format)
COLUMNS = (
    ("test_acc", "test acc %", 100.0, "{:.2f}"),
    ("val_acc", "val acc %", 100.0, "{:.2f}"),
    ("dead_fraction", "dead units %", 100.0, "{:.1f}"),
    ("dynamic_dnr", "dynamic DNR %", 100.0, "{:.1f}"),
    ("train_time", "train time s", 1.0, "{:.1f}"),
)


@dataclass
class CompareSpec:
    """A base config, named variants (overrides of the base) and the seeds to run each with."""
    base: ExperimentConfig
    variants: Mapping[str, Mapping[str, Any]]
    seeds: Sequence[int] = (0, 1, 2)
    title: str = ""
    description: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompareSpec":
        unknown = sorted(set(d) - {"base", "variants", "seeds", "title", "description"})
        if unknown:
            raise ConfigError(f"unknown compare key(s) {unknown}; valid: base, variants, "
                              "seeds, title, description")
        if not d.get("variants"):
            raise ConfigError("a comparison needs at least one variant under 'variants'")
        return cls(ExperimentConfig.from_dict(d.get("base", {})), dict(d["variants"]),
                   list(d.get("seeds", (0, 1, 2))), d.get("title", ""), d.get("description", ""))

    def configs(self) -> list[tuple[str, ExperimentConfig]]:
        """Every (variant, config) pair, validated before anything runs."""
        if not self.seeds:
            raise ConfigError("a comparison needs at least one seed")
        out = []
        for name, over in self.variants.items():
            for seed in self.seeds:
                cfg = self.base.override(**{**dict(over), "seed": seed}).validate()
                out.append((name, cfg))
        return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def summarize(results: list[tuple[str, dict]]) -> list[dict]:
    """Per variant: n seeds and mean/std of each column."""
    by: dict[str, list[dict]] = {}
    for name, res in results:
        by.setdefault(name, []).append({**res["final"], "train_time": res["train_time"]})
    rows = []
    for name, finals in by.items():
        row: dict[str, Any] = {"variant": name, "seeds": len(finals)}
        for key, _, scale, _ in COLUMNS:
            vals = [f[key] * scale for f in finals if f.get(key) is not None]
            if vals:
                row[key] = _mean_std(vals)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    head = "| variant | seeds | " + " | ".join(c[1] for c in cols) + " |"
    rule = "|---|---:|" + "---:|" * len(cols)
    lines = [head, rule]
    for r in rows:
        cells = [(c[3] + " ± " + c[3]).format(*r[c[0]]) if c[0] in r else "–" for c in cols]
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows: list[dict]) -> str:
    cols = [c[0] for c in COLUMNS if any(c[0] in r for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "seeds"] + [f"{c}_{s}" for c in cols for s in ("mean", "std")])
    for r in rows:
        w.writerow([r["variant"], r["seeds"]] + [x for c in cols for x in r.get(c, ("", ""))])
    return buf.getvalue()


def run_compare(spec: CompareSpec, root: str | os.PathLike = "runs",
                out: str | os.PathLike | None = None, *, show_progress: bool = True,
                log=print) -> list[dict]:
    """Run every variant x seed (finished runs are reused), print and save the table."""
    configs = spec.configs()
    results = []
    for i, (name, cfg) in enumerate(configs, start=1):
        log(f"[{i}/{len(configs)}] {name} seed={cfg.seed}")
        res = run_experiment(cfg, root, show_progress=show_progress, log=log)
        f = res["final"]
        log(f"    test acc {100 * f['test_acc']:.2f}%  dead units {100 * f['dead_fraction']:.1f}%"
            f"  ({res['train_time']:.1f}s)")
        results.append((name, res))
    rows = summarize(results)
    table = to_markdown(rows)
    log("")
    if spec.title:
        log(spec.title)
    log(table)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        header = f"# {spec.title or 'comparison'}\n\n{spec.description}\n\n" if spec.title else ""
        (out / "compare.md").write_text(header + table + "\n")
        (out / "compare.csv").write_text(to_csv(rows))
        (out / "compare.json").write_text(json.dumps(
            {"spec": {"base": spec.base.to_dict(), "variants": {k: dict(v) for k, v in spec.variants.items()},
                      "seeds": list(spec.seeds)},
             "rows": rows, "runs": [{"variant": n, "run_dir": r.get("run_dir")} for n, r in results]},
            indent=2))
        log(f"\nsaved {out / 'compare.md'}, compare.csv, compare.json")
    return rows
