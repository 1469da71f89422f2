"""Reports from results files only: per-epoch curves (mean ± std over seeds) and plots.

Nothing here trains or imports a model; matplotlib is imported only when a plot is drawn
(``pip install 'dormant[plot]'``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..jsonl import read_jsonl
from ..rundir import HISTORIES, CompareFiles, RunFiles, machine
from ..tables import Column, Stat, Table, mean_std, stat
from ..tables import paired as paired_stat

__all__ = ["Comparison", "load_comparison", "run_dirs", "curves", "plot_curves", "final_values",
           "machine", "mean_std", "round_ends", "by_round", "paired", "plot_series",
           "variant_table", "final", "versus", "window", "regenerate", "write_block",
           "comparisons", "write_section", "read_section", "table_rows", "HISTORIES",
           "results_block"]

Series = dict[str, tuple[list[float], list[float], list[float]]]   # variant -> (x, mean, std)


@dataclass
class Comparison:
    """A finished `dormant compare`: its spec, table rows and each run's history."""
    spec: dict
    rows: list[dict]
    runs: list[tuple[str, list[dict]]]   # (variant, metrics rows of one seed)
    titles: dict[str, str] = field(default_factory=dict)   # column titles of the table
    command: str = ""             # the command line that made (and regenerates) it
    formats: dict[str, str] = field(default_factory=dict)  # number format of each column
    machine: str = ""             # where it ran (machine(), recorded by `dormant compare`)

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(v for v, _ in self.runs))

    def select(self, variants: Sequence[str]) -> "Comparison":
        """The runs of these variants only (rows and spec kept), e.g. to plot a few."""
        keep = set(variants)
        return replace(self, runs=[r for r in self.runs if r[0] in keep])

    def __add__(self, other: "Comparison") -> "Comparison":
        """Both comparisons' rows and runs in one (e.g. a baseline run after the method);
        the spec is this one's."""
        return replace(self, rows=self.rows + other.rows, runs=self.runs + other.runs,
                       titles={**self.titles, **other.titles},
                       formats={**self.formats, **other.formats})


def _history(run_dir: Path) -> list[dict]:
    path = RunFiles(run_dir).metrics
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: was the run deleted?")
    return read_jsonl(path)


def _compare_json(out: Path) -> dict:
    path = CompareFiles(out).compare
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `dormant compare ... --out {out}` first")
    fix = (f"re-run the comparison with `--out {out}` (finished runs are reused, so it only "
           "rewrites the files)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}): {fix}"
                         ) from None
    problem = _compare_problem(data)
    if problem:
        raise ValueError(f"{path} is damaged or not a comparison ({problem}): {fix}")
    return data


def _compare_problem(data) -> str:
    """What is wrong with a compare.json's structure ('' when nothing)."""
    if not isinstance(data, dict):
        return f"expected an object, got {type(data).__name__}"
    for key, kind in (("spec", dict), ("rows", list), ("runs", list)):
        if not isinstance(data.get(key), kind):
            return f"{key!r} should be a{'n object' if kind is dict else ' list'}"
    for r in data["runs"]:
        if not (isinstance(r, dict) and isinstance(r.get("variant"), str)
                and isinstance(r.get("run_dir"), str)):
            return f"a run entry {str(r)[:80]} lacks its variant or run_dir"
    if not all(isinstance(r, dict) for r in data["rows"]):
        return "a row is not an object"
    for key in ("titles", "formats"):
        if not isinstance(data.get(key, {}), dict):
            return f"{key!r} should be an object"
    return ""


def _resolve(run_dir: str, out: Path, root: str | os.PathLike | None) -> Path:
    """A run directory of compare.json: relative to its folder (written so since the paths
    became portable), else as written (older files), else by name under `root`."""
    for rd in (out / run_dir, Path(run_dir)):
        if rd.exists():
            return rd
    return Path(root) / Path(run_dir).name if root is not None else out / run_dir


def run_dirs(out: str | os.PathLike, root: str | os.PathLike | None = None
             ) -> list[tuple[str, Path]]:
    """(variant, run directory) of every run ``compare.json`` in `out` lists, in its order
    (looked up as written, then under `root` by name), e.g. to reload the trained models."""
    out = Path(out)
    return [(r["variant"], _resolve(r["run_dir"], out, root)) for r in _compare_json(out)["runs"]]


def _archived(out: Path) -> list[dict] | None:
    """The runs' metrics that `dormant compare` keeps beside compare.json, if any."""
    import gzip
    path = CompareFiles(out).histories
    if not path.exists():
        return None
    import zlib
    fix = ("delete it to read the run directories instead, or re-run the comparison "
           "(finished runs are reused)")
    try:
        with gzip.open(path, "rt") as f:
            runs = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}); {fix}"
                         ) from None
    if not all(isinstance(r, dict) and isinstance(r.get("run_dir"), str)
               and isinstance(r.get("metrics"), list)
               and all(isinstance(m, dict) for m in r["metrics"]) for r in runs):
        raise ValueError(f"{path} is damaged (an entry lacks its run_dir or metrics); {fix}")
    return runs


def load_comparison(out: str | os.PathLike, root: str | os.PathLike | None = None) -> Comparison:
    """Read ``compare.json`` in `out` and the metrics of every run it lists: from the run
    directories (looked up as written, then under `root` by name) where they exist, else
    from the copy in ``runs.jsonl.gz`` beside it."""
    out = Path(out)
    data = _compare_json(out)
    archive: list[dict] | None = None
    runs = []
    for i, r in enumerate(data["runs"]):
        rd = _resolve(r["run_dir"], out, root)
        if not RunFiles(rd).metrics.exists():
            archive = _archived(out) if archive is None else archive
            if archive is not None and i < len(archive) and \
                    archive[i]["run_dir"] == r["run_dir"]:
                runs.append((r["variant"], archive[i]["metrics"]))
                continue
        runs.append((r["variant"], _history(rd)))
    return Comparison(data["spec"], data["rows"], runs, data.get("titles", {}),
                      data.get("command", ""), data.get("formats", {}),
                      data.get("machine", ""))


def curves(cmp: Comparison, key: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per variant: (epochs, mean, std) of metric `key` over seeds, at epochs every seed has."""
    out = {}
    for variant in cmp.variants:
        hists = [h for v, h in cmp.runs if v == variant]
        by_epoch: dict[int, list[float]] = {}
        for h in hists:
            for row in h:
                if row.get(key) is not None:
                    by_epoch.setdefault(row["epoch"], []).append(float(row[key]))
        epochs = sorted(e for e, xs in by_epoch.items() if len(xs) == len(hists))
        if epochs:
            stats = [mean_std(by_epoch[e]) for e in epochs]
            out[variant] = (epochs, [m for m, _ in stats], [s for _, s in stats])
    return out


def final_values(cmp: Comparison, key: str, default: float | None = None
                 ) -> dict[str, list[float]]:
    """Per variant: the last epoch's value of `key` for each seed (`default` where a run
    lacks it; None: that run is left out)."""
    out: dict[str, list[float]] = {}
    for variant, hist in cmp.runs:
        value = hist[-1].get(key, default) if hist else None
        if value is not None:
            out.setdefault(variant, []).append(float(value))
    return out


def round_ends(cmp: Comparison, variant: str) -> list[list[dict]]:
    """Per seed of `variant` (in seed order): its rows at the last epoch of every pruning
    round (``round_end`` rows)."""
    return [[r for r in h if r.get("round_end")] for v, h in cmp.runs if v == variant]


def by_round(cmp: Comparison, key: str, x: str = "sparsity") -> Series:
    """Per variant, at the last epoch of every pruning round (``round_end`` rows): the mean
    of `x` and mean ± std of `key` over seeds, for rounds every seed reached."""
    out: Series = {}
    for variant in cmp.variants:
        hists = round_ends(cmp, variant)
        n = min(len(h) for h in hists)
        xs, ms, ss = [], [], []
        for i in range(n):
            xs.append(mean_std([h[i][x] for h in hists])[0])
            m, s_ = mean_std([h[i][key] for h in hists])
            ms.append(m)
            ss.append(s_)
        out[variant] = (xs, ms, ss)
    return out


def paired(cmp: Comparison, key: str, a: str, b: str) -> list[tuple[float, float, float]]:
    """Per pruning round: (mean sparsity, mean and std over seeds of key[b] - key[a]), seeds
    paired (runs of both variants are listed in the same seed order)."""
    ra, rb = round_ends(cmp, a), round_ends(cmp, b)
    n = min(min(len(h) for h in ra), min(len(h) for h in rb))
    out = []
    for i in range(n):
        d = [hb[i][key] - ha[i][key] for ha, hb in zip(ra, rb)]
        sp = mean_std([h[i]["sparsity"] for h in ra + rb])[0]
        out.append((sp, *mean_std(d)))
    return out


Cell = Callable[[Comparison, str], Any]     # (comparison, variant) -> a table cell


def final(key: str, scale: float = 1.0, default: float | None = None) -> Cell:
    """Mean ± std over seeds of `key` at the last epoch (`default` where a run lacks it)."""
    def cell(cmp: Comparison, variant: str) -> Stat | None:
        vals = final_values(cmp, key, default).get(variant)
        return stat(vals, scale) if vals else None
    return cell


def versus(key: str, baseline: str, scale: float = 1.0) -> Cell:
    """`key` at the last epoch minus the baseline variant's, paired by seed (mean ± std)."""
    def cell(cmp: Comparison, variant: str) -> Stat | None:
        vals = final_values(cmp, key)
        if variant == baseline or baseline not in vals or variant not in vals:
            return None
        return paired_stat(vals[baseline], vals[variant], scale)
    return cell


def window(key: str, start: int, stop: int | None, scale: float = 1.0) -> Cell:
    """Per seed, the mean of `key` over epochs [start:stop] (Python slice of the rows, e.g.
    the last 10% of tasks); then mean ± std over seeds."""
    def cell(cmp: Comparison, variant: str) -> Stat | None:
        per_seed = []
        for v, h in cmp.runs:
            xs = [r[key] for r in h[start:stop] if r.get(key) is not None] if v == variant else []
            if xs:
                per_seed.append(sum(xs) / len(xs))
        return stat(per_seed, scale) if per_seed else None
    return cell


def variant_table(cmp: Comparison, columns: Sequence[tuple[Column, Cell]],
                  first: Column | None = None, label: Callable[[str], str] = str) -> Table:
    """A row per variant of `cmp` (in its order), a cell per (column, cell function); the
    first column (default "variant") names the variant."""
    t = Table([first or Column("variant", align="left"), *(c for c, _ in columns)])
    for v in cmp.variants:
        t.add(label(v), *(f(cmp, v) for _, f in columns))
    return t


def regenerate(cmp: Comparison) -> str:
    """"Regenerate with `...`." from the command recorded when the comparison ran."""
    return f"Regenerate with `{cmp.command}`." if cmp.command else ""


SECTION = "section.md"


def comparisons(out: str | os.PathLike, prefix: str = "") -> list[tuple[Path, dict]]:
    """(folder, spec) of every comparison under `out` whose spec is named `prefix`..., by
    name: a page finds its sections by what their specs say, not by parsing folder names."""
    found = []
    for path in sorted(Path(out).glob("*/compare.json")):
        spec = json.loads(path.read_text()).get("spec", {})
        if spec.get("name", path.parent.name).startswith(prefix):
            found.append((path.parent, spec))
    return found


def table_rows(out: str | os.PathLike) -> dict[str, dict]:
    """{variant: its row of the comparison table} from ``compare.json`` alone (mean, std per
    metric, as `dormant compare` printed them), for pages built without the runs."""
    return {r["variant"]: r for r in _compare_json(Path(out))["rows"]}


def write_section(folder: str | os.PathLike, text: str) -> str:
    """Keep a comparison's section of its results page beside it (``section.md``), so the
    page can be assembled from every comparison that exists, each regenerated on its own."""
    (Path(folder) / SECTION).write_text(text.rstrip("\n") + "\n")
    return text


def read_section(folder: str | os.PathLike) -> str:
    path = Path(folder) / SECTION
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: regenerate it with the command in "
                                f"{Path(folder) / 'compare.json'}")
    return path.read_text().rstrip("\n")


def write_block(path: str | os.PathLike, name: str, text: str) -> bool:
    """Replace the lines between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` in the
    page at `path` (e.g. docs/results.md) with `text`; the prose around them is kept. Returns
    False, changing nothing, where the page has no such block."""
    path = Path(path)
    if not path.exists():
        return False
    page = path.read_text()
    begin, end = f"<!-- begin {name} -->\n", f"<!-- end {name} -->"
    i = page.find(begin)
    j = page.find(end, i + len(begin)) if i >= 0 else -1
    if i < 0 or j < 0:
        return False
    path.write_text(page[:i + len(begin)] + text.rstrip("\n") + "\n" + page[j:])
    return True


def results_block(page: str | os.PathLike, folder: str | os.PathLike,
                  root: str | os.PathLike | None, make: Callable[..., Any],
                  *companions: str | os.PathLike, block: str = "") -> bool:
    """Write `make(comparison, *companion comparisons)` (a Table) into the block of `page`
    (e.g. docs/results.md) named `block` (default: after `folder`), where the runs (or their
    copy) of `folder` and of each companion are at hand: a text companion is a suffix of
    `folder`'s name (``"_imp"``), a path another comparison's folder. False, changing nothing,
    where they are not (a comparison made before its metrics were archived)."""
    folder = Path(folder)
    where = lambda c: folder.with_name(folder.name + c) if isinstance(c, str) else Path(c)
    try:
        cmps = [load_comparison(where(c), root) for c in ("", *companions)]
    except FileNotFoundError:
        return False
    return write_block(page, block or folder.name, make(*cmps).to_markdown())


def plain(text) -> str:
    """`text` shown as it is in a figure: matplotlib would read ``$...$`` as mathtext (and
    fail on a variant name like ``a$b``)."""
    return str(text).replace("$", r"\$")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'dormant[plot]'") from None
    return plt


def plot_series(panels: Sequence[tuple[str, Series]], path: str | os.PathLike, *,
                xlabel: str = "", xscale: str = "linear", scale: float = 1.0,
                x_transform=None) -> Path:
    """Panels of (title, {variant: (x, mean, std)}) with ±1 std bands; saved as PNG."""
    plt = _pyplot()
    variants = list(dict.fromkeys(v for _, series in panels for v in series))
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.3), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for v, (x, m, s) in series.items():
            x = [x_transform(t) for t in x] if x_transform else x
            ax.plot(x, [scale * t for t in m], marker="o", ms=2.5, color=colors[v], label=plain(v))
            ax.fill_between(x, [scale * (a - b) for a, b in zip(m, s)],
                            [scale * (a + b) for a, b in zip(m, s)], alpha=0.2, color=colors[v])
        ax.set_title(plain(title), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_xscale(xscale)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(cmp: Comparison, keys: Sequence[str], path: str | os.PathLike, *,
                titles: Mapping[str, str] | None = None, scale: Mapping[str, float] | None = None
                ) -> Path:
    """One panel per metric: mean over seeds per variant, with a ±1 std band; saved as PNG."""
    plt = _pyplot()
    titles, scale = dict(titles or {}), dict(scale or {})
    colors = {v: f"C{i % 10}" for i, v in enumerate(cmp.variants)}   # same color in every panel
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        k = scale.get(key, 1.0)
        for variant, (ep, mean, std) in curves(cmp, key).items():
            m = [k * x for x in mean]
            lo = [k * (x - s) for x, s in zip(mean, std)]
            hi = [k * (x + s) for x, s in zip(mean, std)]
            ax.plot(ep, m, label=plain(variant), marker="o", ms=2.5, color=colors[variant])
            ax.fill_between(ep, lo, hi, alpha=0.2, color=colors[variant])
        ax.set_title(plain(titles.get(key, key)), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[v], marker="o", ms=3) for v in cmp.variants]
    fig.legend(handles, [plain(v) for v in cmp.variants], loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(handles) - 1) // 5), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
