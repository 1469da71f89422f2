"""The one table module: summary statistics over seeds and tables rendered as markdown, CSV
or HTML. Used by `dormant compare`, `dormant report`, the benchmarks and every `reproduce/`
script, so a number is computed and printed the same way wherever it appears.

It imports nothing from the rest of `dormant` (the reports read results without importing the
methods or the training loop).

    t = Table([Column("variant", align="left"), Column("test acc %", key="test_acc")])
    t.add("ReLU", stat([0.8812, 0.8820], scale=100))     # -> "88.16 ± 0.06"
    print(t.to_markdown())
"""
from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["mean_std", "Stat", "stat", "paired", "reduction", "Column", "Table", "fmt_cell",
           "rows_table"]


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


@dataclass(frozen=True)
class Stat:
    """Mean ± sample std over `n` seeds."""
    mean: float
    std: float
    n: int = 1

    def __iter__(self):          # m, s = stat(...)
        return iter((self.mean, self.std))

    def __getitem__(self, i: int) -> float:
        return (self.mean, self.std)[i]


def stat(values: Iterable[float], scale: float = 1.0) -> Stat:
    """Mean ± std of `values` (times `scale`, e.g. 100 for a percentage)."""
    xs = [scale * float(v) for v in values]
    if not xs:
        raise ValueError("stat() of no values")
    return Stat(*mean_std(xs), len(xs))


def paired(a: Sequence[float], b: Sequence[float], scale: float = 1.0) -> Stat:
    """Mean ± std over seeds of b - a, the i-th value of each from the same seed."""
    if len(a) != len(b):
        raise ValueError(f"paired() needs one value per seed on both sides, got {len(a)} and "
                         f"{len(b)}")
    return stat([y - x for x, y in zip(a, b)], scale)


def reduction(base: float, new: float) -> float:
    """1 - new / base (NaN where base is 0): the fraction of `base` that `new` removed."""
    return 1 - new / base if base else float("nan")


@dataclass(frozen=True)
class Column:
    """A column: its title, the key its values have in CSV, a format for numbers (a Stat is
    shown as "mean ± std" in it) and the markdown alignment ("right" or "left")."""
    title: str
    key: str = ""
    fmt: str = "{:.2f}"
    align: str = "right"
    sign: bool = False        # "+0.25 ± 0.14": the mean of a difference

    @property
    def csv_key(self) -> str:
        return self.key or self.title


def fmt_cell(value: Any, fmt: str = "{:.2f}", sign: bool = False) -> str:
    """A cell as text: None -> "–", a Stat -> "m ± s" in `fmt`, a number -> `fmt`, text as is."""
    if value is None:
        return "–"
    mean = fmt.replace("{:", "{:+") if sign else fmt
    if isinstance(value, Stat):
        return mean.format(value.mean) + " ± " + fmt.format(value.std)
    if isinstance(value, float):
        return mean.format(value)
    return str(value)


class Table:
    """Rows of cells (a Stat, a number, text or None) under `columns`, rendered the same way
    as markdown, HTML or CSV (CSV keeps numbers unformatted: a Stat is two columns,
    KEY_mean and KEY_std)."""

    def __init__(self, columns: Sequence[Column | str]):
        self.columns = [c if isinstance(c, Column) else Column(c) for c in columns]
        self.rows: list[list[Any]] = []

    def add(self, *cells: Any) -> "Table":
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))
        return self

    def _text(self) -> list[list[str]]:
        return [[fmt_cell(v, c.fmt, c.sign) for v, c in zip(row, self.columns)]
                for row in self.rows]

    def to_markdown(self) -> str:
        line = lambda cells: "|" + "|".join(f" {_md(c)} " if c else " " for c in cells) + "|"
        rule = "|" + "".join("---|" if c.align == "left" else "---:|" for c in self.columns)
        return "\n".join([line(c.title for c in self.columns), rule] +
                         [line(r) for r in self._text()])

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c.title)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(t)}</td>" for t in r) + "</tr>"
                       for r in self._text())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_csv(self) -> str:
        stats = [any(isinstance(r[i], Stat) for r in self.rows)
                 for i in range(len(self.columns))]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([h for c, s in zip(self.columns, stats)
                    for h in ((f"{c.csv_key}_mean", f"{c.csv_key}_std") if s else (c.csv_key,))])
        for r in self.rows:
            w.writerow([x for v, s in zip(r, stats) for x in _csv_cells(v, s)])
        return buf.getvalue()


def _csv_cells(value: Any, two: bool) -> tuple:
    if isinstance(value, Stat):
        return value.mean, value.std
    if value is None:
        return ("", "") if two else ("",)
    return (value, "") if two else (value,)


def rows_table(rows: Sequence[dict], columns: Sequence[Column]) -> Table:
    """The comparison table: a row per variant (``{"variant", "seeds", key: (mean, std)}``,
    as `dormant compare` summarises and compare.json keeps them), a column per metric in
    `columns` that any row has."""
    cols = [c for c in columns if any(c.key in r for r in rows)]
    t = Table([Column("variant", align="left"), Column("seeds"), *cols])
    for r in rows:
        t.add(r["variant"], r["seeds"], *(Stat(*r[c.key], r["seeds"]) if c.key in r else None
                                          for c in cols))
    return t


def _md(cell: str) -> str:
    """A cell as Markdown table text: a `|` would end the cell, a line break the row, and
    ``<...>`` would be HTML to a renderer; emphasis the table writes itself is kept."""
    return (str(cell).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
            .replace("<", "&lt;").replace(">", "&gt;"))

