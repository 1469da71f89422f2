"""One self-contained HTML report of a comparison (``dormant report OUT``): the table on top,
then the figures (embedded as PNG data, so the page needs no network), then each run's config,
code version and machine. The PNGs are also written next to it (``OUT/report/*.png``).

Figures, where the runs have the metrics: accuracy and loss curves (mean ± std over seeds),
dead fraction and dynamic DNR, the dead fraction per site over epochs as a heatmap (sites x
epochs, one per variant), activation sparsity per site, the effective rank per site, accuracy
vs sparsity for pruning rounds, and units alive per site for methods that remove units.
Reads results files only.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Callable

from ..rundir import RunFiles
from ..tables import Column, mean_std, rows_table
from . import Comparison, _pyplot, by_round, curves, load_comparison, plain, run_dirs

__all__ = ["write_report", "FIGURES"]

Figure = tuple[str, str, bytes]       # (file stem, caption, PNG bytes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def _keys(cmp: Comparison) -> set[str]:
    return {k for _, hist in cmp.runs for row in hist for k in row}


def _colors(cmp: Comparison) -> dict[str, str]:
    return {v: f"C{i % 10}" for i, v in enumerate(cmp.variants)}


def _curve_panels(cmp: Comparison, keys: list[tuple[str, str, float]]) -> bytes:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    colors = _colors(cmp)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.3 * len(keys), 3.3), squeeze=False)
    for ax, (key, title, scale) in zip(axes[0], keys):
        for variant, (ep, mean, std) in curves(cmp, key).items():
            ax.plot(ep, [scale * m for m in mean], marker="o", ms=2.5, color=colors[variant],
                    label=plain(variant))
            ax.fill_between(ep, [scale * (m - s) for m, s in zip(mean, std)],
                            [scale * (m + s) for m, s in zip(mean, std)], alpha=0.2,
                            color=colors[variant])
        ax.set_title(plain(title), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # whole epochs
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _site_keys(cmp: Comparison, prefix: str) -> list[str]:
    first = cmp.runs[0][1][-1] if cmp.runs and cmp.runs[0][1] else {}
    return [k for k in first if k.startswith(prefix + "/")]


def fig_accuracy(cmp: Comparison) -> Figure | None:
    keys = [(k, t, s) for k, t, s in (("test_acc", "test accuracy %", 100.0),
                                      ("val_acc", "validation accuracy %", 100.0),
                                      ("train_loss", "training loss", 1.0)) if k in _keys(cmp)]
    return ("accuracy", "Accuracy and loss per epoch, mean ± std over seeds",
            _curve_panels(cmp, keys)) if keys else None


def fig_dead(cmp: Comparison) -> Figure | None:
    keys = [(k, t, 100.0) for k, t in (("dead_fraction", "dead units %"),
                                       ("dynamic_dnr", "dynamic DNR %")) if k in _keys(cmp)]
    return ("dead", "Dead units (never active on the validation split) and dynamic DNR "
            "(zero outputs on training batches)", _curve_panels(cmp, keys)) if keys else None


def _site_matrix(hists: list[list[dict]], keys: list[str]) -> tuple[list[int], list[list[float]]]:
    """Epochs every seed has, and per site key the mean over seeds at each of them."""
    epochs = sorted(set.intersection(*[{r["epoch"] for r in h} for h in hists]))
    by = [{r["epoch"]: r for r in h} for h in hists]
    return epochs, [[mean_std([b[e][k] for b in by if k in b[e]])[0] if any(k in b[e] for b in by)
                     else float("nan") for e in epochs] for k in keys]


def fig_heatmap(cmp: Comparison) -> Figure | None:
    keys = _site_keys(cmp, "dead")
    if not keys:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    n = len(cmp.variants)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.0, 0.35 * len(keys) + 1.9),
                             squeeze=False, layout="constrained")
    for ax, variant in zip(axes[0], cmp.variants):
        hists = [h for v, h in cmp.runs if v == variant]
        epochs, m = _site_matrix(hists, keys)
        im = ax.imshow([[100 * x for x in row] for row in m], aspect="auto", cmap="magma_r",
                       vmin=0, vmax=100, extent=(epochs[0] - 0.5, epochs[-1] + 0.5,
                                                 len(keys) - 0.5, -0.5))
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([k.split("/", 1)[1] for k in keys], fontsize=7)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(plain(variant), fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="dead %")
    return ("heatmap", "Dead units per site over training (% of the site's units, mean over "
            "seeds)", _png(fig))


def _final_bars(cmp: Comparison, prefix: str, scale: float, ylabel: str) -> bytes | None:
    keys = _site_keys(cmp, prefix)
    if not keys:
        return None
    plt = _pyplot()
    colors = _colors(cmp)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(keys) * len(cmp.variants) ** 0.5), 3.3))
    width = 0.8 / len(cmp.variants)
    for i, variant in enumerate(cmp.variants):
        finals = [h[-1] for v, h in cmp.runs if v == variant and h]
        vals = [mean_std([f[k] for f in finals if k in f]) if any(k in f for f in finals)
                else (0.0, 0.0) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], [scale * m for m, _ in vals], width,
               yerr=[scale * s for _, s in vals], color=colors[variant], label=plain(variant))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([k.split("/", 1)[1] for k in keys], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def fig_sparsity(cmp: Comparison) -> Figure | None:
    png = _final_bars(cmp, "sparsity", 100.0, "zero outputs %")
    return ("sparsity", "Activation sparsity per site at the end (validation split)", png) \
        if png else None


def fig_erank(cmp: Comparison) -> Figure | None:
    png = _final_bars(cmp, "erank", 1.0, "effective rank")
    return ("erank", "Effective rank of each site's features at the end (plasticity)", png) \
        if png else None


def fig_pruning(cmp: Comparison) -> Figure | None:
    if not any(r.get("round_end") for _, h in cmp.runs for r in h):
        return None
    plt = _pyplot()
    colors = _colors(cmp)
    fig, ax = plt.subplots(figsize=(5.0, 3.3))
    for variant, (x, m, s) in by_round(cmp, "test_acc").items():
        ax.errorbar([100 * t for t in x], [100 * t for t in m], [100 * t for t in s],
                    marker="o", ms=3, color=colors[variant], label=plain(variant))
    ax.set_xlabel("weight sparsity %")
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return ("pruning", "Accuracy vs sparsity at the end of each pruning round", _png(fig))


def fig_units(cmp: Comparison) -> Figure | None:
    first = cmp.runs[0][1][-1] if cmp.runs and cmp.runs[0][1] else {}
    if not isinstance(first.get("width"), dict):
        return None
    plt = _pyplot()
    colors = _colors(cmp)
    sites = list(first["width"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(sites)), 3.3))
    width = 0.8 / len(cmp.variants)
    for i, variant in enumerate(cmp.variants):
        finals = [h[-1]["width"] for v, h in cmp.runs if v == variant and h and "width" in h[-1]]
        if finals:
            ax.bar([j + i * width for j in range(len(sites))],
                   [mean_std([f[s] for f in finals])[0] for s in sites], width,
                   color=colors[variant], label=plain(variant))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sites))])
    ax.set_xticklabels(sites, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("units alive")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return ("units", "Units alive per site at the end (methods that remove units)", _png(fig))


FIGURES: tuple[Callable[[Comparison], Figure | None], ...] = (
    fig_accuracy, fig_dead, fig_heatmap, fig_sparsity, fig_erank, fig_pruning, fig_units)


def _table(cmp: Comparison) -> str:
    """The comparison's table, formatted as `dormant compare` printed it."""
    keys = [k for k in dict.fromkeys(k for r in cmp.rows for k in r) if k not in ("variant",
                                                                              "seeds")]
    return rows_table(cmp.rows, [Column(cmp.titles.get(k, k), key=k,
                                        fmt=cmp.formats.get(k, "{:.4g}")) for k in keys]
                      ).to_html()


def _runs_section(out: Path, root) -> str:
    items = []
    for variant, rd in run_dirs(out, root):
        cfg = RunFiles(rd).config
        res = RunFiles(rd).result
        config = json.loads(cfg.read_text()) if cfg.exists() else {}
        result = json.loads(res.read_text()) if res.exists() else {}
        changed = {k: v for k, v in config.items() if v not in ({}, None)}
        items.append(f"<details><summary>{html.escape(variant)} — {html.escape(rd.name)} "
                     f"(code {html.escape(str(result.get('version', '?')))}, torch "
                     f"{html.escape(str(result.get('torch', '?')))})</summary><pre>"
                     f"{html.escape(json.dumps(changed, indent=1, sort_keys=True))}</pre>"
                     "</details>")
    return "\n".join(items)


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%}figcaption{font-size:13px;color:#555}pre{font-size:11px}"""


def write_report(out: str | Path, root: str | Path | None = None) -> Path:
    """Write ``OUT/report.html`` (self-contained) and ``OUT/report/*.png`` for the comparison
    in `out`; returns the HTML's path."""
    out = Path(out)
    cmp = load_comparison(out, root)
    figs = [f for f in (make(cmp) for make in FIGURES) if f is not None]
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for stem, caption, png in figs:
        (folder / f"{stem}.png").write_bytes(png)
        data = base64.b64encode(png).decode()
        parts.append(f'<figure id="fig-{stem}"><img alt="{html.escape(caption)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
                     "</figcaption></figure>")
    title = cmp.spec.get("title") or "dormant comparison"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(cmp.spec.get('description', ''))}</p>"
            + (f"<p>Made (and regenerated) with <code>{html.escape(cmp.command)}</code></p>"
               if cmp.command else "")
            + (f"<p>Machine: {html.escape(cmp.machine)}</p>" if cmp.machine else "") +
            f"{_table(cmp)}"
            f"{''.join(parts)}<h2>Runs</h2>{_runs_section(out, root)}</body></html>")
    path = out / "report.html"
    path.write_text(page)
    return path
