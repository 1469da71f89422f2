"""Side-by-side comparisons: variants x seeds, same data and budget, mean +- std."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..rundir import CompareFiles, RunFiles, machine, writable_dir
from ..tables import Column, Table, mean_std, rows_table
from .config import ConfigError, ExperimentConfig
from .run import run_experiment

# (metric key in the final epoch, column title, scale, format)
COLUMNS = (
    ("test_acc", "test acc %", 100.0, "{:.2f}"),
    ("val_acc", "val acc %", 100.0, "{:.2f}"),
    ("dead_fraction", "dead units %", 100.0, "{:.1f}"),
    ("dead_units", "dead units", 1.0, "{:.1f}"),
    ("dynamic_dnr", "dynamic DNR %", 100.0, "{:.1f}"),
    ("weight_sparsity", "weight sparsity %", 100.0, "{:.1f}"),
    ("train_time", "train time s", 1.0, "{:.1f}"),
)


def columns_for(extra: Sequence[str] = ()) -> tuple:
    """The default columns plus extra metric keys (shown as they are, 4 significant digits)."""
    known = {c[0] for c in COLUMNS}
    return COLUMNS + tuple((k, k, 1.0, "{:.4g}") for k in extra if k not in known)


@dataclass
class CompareSpec:
    """A base config, named variants (overrides of the base) and the seeds to run each with."""
    base: ExperimentConfig
    variants: Mapping[str, Mapping[str, Any]]
    seeds: Sequence[int] = (0, 1, 2)
    title: str = ""
    description: str = ""
    columns: Sequence[str] = ()     # extra metric keys for the table
    name: str = ""                  # its folder's name, e.g. under docs/results/

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "variants": {k: dict(v) for k, v in
                                                          self.variants.items()},
                "seeds": list(self.seeds), "title": self.title,
                "description": self.description, "columns": list(self.columns),
                "name": self.name}

    def folder(self, parent: str | os.PathLike) -> Path:
        """Where this comparison's results go under `parent`: a folder named by the spec."""
        if not self.name:
            raise ConfigError("this comparison has no name to name its folder by")
        return Path(parent) / self.name

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompareSpec":
        valid = ("base", "variants", "seeds", "title", "description", "columns", "name")
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown compare key(s) {unknown}; valid: {', '.join(valid)}")
        if not d.get("variants"):
            raise ConfigError("a comparison needs at least one variant under 'variants'")
        variants = d["variants"]
        if not isinstance(variants, Mapping) or not all(
                isinstance(v, Mapping) for v in variants.values()):
            raise ConfigError("variants: expected a mapping of variant name -> config "
                              "overrides, e.g. {relu: {activation: relu}, ...}; got "
                              f"{type(variants).__name__}")
        bad = [k for k in variants if not isinstance(k, str) or not k.strip()]
        if bad:
            raise ConfigError(f"variants: every variant needs a name (a non-empty string; "
                              f"quote numbers and null in YAML), got {bad}")
        if not isinstance(d.get("base", {}), Mapping):
            raise ConfigError("base: expected a mapping of config keys")
        for key in ("title", "description", "name"):
            if not isinstance(d.get(key, ""), str):
                raise ConfigError(f"{key}: expected a string, got {d[key]!r}")
        columns = d.get("columns", ())
        if not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns):
            raise ConfigError(f"columns: expected a list of metric keys, e.g. [test_acc], got "
                              f"{columns!r}")
        seeds = d.get("seeds", (0, 1, 2))
        if not isinstance(seeds, (list, tuple)) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"seeds: expected a list of integers, got {seeds!r}")
        return cls(ExperimentConfig.from_dict(d.get("base", {})), dict(variants), list(seeds),
                   d.get("title", ""), d.get("description", ""), list(columns),
                   str(d.get("name", "")))

    def configs(self) -> list[tuple[str, ExperimentConfig]]:
        """Every (variant, config) pair, validated before anything runs."""
        if not self.seeds:
            raise ConfigError("a comparison needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: each seed once, got {list(self.seeds)} (a repeated seed "
                              "would count one run twice in the mean ± std)")
        out = []
        for name, over in self.variants.items():
            for seed in self.seeds:
                cfg = self.base.override(**{**dict(over), "seed": seed}).validate()
                out.append((name, cfg))
        return out


def summarize(results: list[tuple[str, dict]], columns: Sequence = COLUMNS) -> list[dict]:
    """Per variant: n seeds and mean/std of each column."""
    by: dict[str, list[dict]] = {}
    for name, res in results:
        by.setdefault(name, []).append({**res["final"], "train_time": res["train_time"]})
    rows = []
    for name, finals in by.items():
        row: dict[str, Any] = {"variant": name, "seeds": len(finals)}
        for key, _, scale, _ in columns:
            vals = [f[key] * scale for f in finals if f.get(key) is not None]
            if vals:
                row[key] = mean_std(vals)
        rows.append(row)
    return rows


def table(rows: list[dict], columns: Sequence = COLUMNS) -> Table:
    """The comparison table of `summarize`'s rows: a column per metric any row has."""
    return rows_table(rows, [Column(title, key=key, fmt=fmt) for key, title, _, fmt in columns])


def to_markdown(rows: list[dict], columns: Sequence = COLUMNS) -> str:
    return table(rows, columns).to_markdown()


def to_csv(rows: list[dict], columns: Sequence = COLUMNS) -> str:
    return table(rows, columns).to_csv()


def reproduce_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every script in reproduce/ shares: --quick, --jobs, --root, --out."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, tiny budget: a smoke run")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (processes)")
    p.add_argument("--root", default="runs/reproduce", help="where run directories go")
    p.add_argument("--out", default="docs/results", help="where tables and plots go")
    p.add_argument("--pages-only", action="store_true",
                   help="run nothing: rebuild the pages (and their tables in the results.md "
                        "beside --out) from the comparisons already there")
    return p


def _die_with(parent: int) -> None:
    """In a worker: exit as soon as the process that started it is gone (killed compare)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="dormant-parent-watch").start()


def _run_quiet(cfg: ExperimentConfig, root: str, threads: int, tensorboard=None) -> dict:
    import torch
    torch.set_num_threads(threads)
    return run_experiment(cfg, root, show_progress=False, log=lambda *a: None,
                          tensorboard=tensorboard)


def run_threads(jobs: int) -> int:
    """Threads each run gets: this process's own with one job, else the cores shared out."""
    if jobs <= 1:
        import torch
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // jobs)


def _run_all(configs, root, jobs: int, show_progress: bool, log, tensorboard=None) -> list[dict]:
    """Run configs in order (jobs=1) or in a pool of `jobs` processes, one thread each."""
    def done(i: int, name: str, cfg, res: dict) -> None:
        f = res["final"]
        dead = ("diverged" if f.get("diverged") else
                f"dead units {100 * f['dead_fraction']:.1f}%" if "dead_fraction" in f else "")
        log(f"[{i}/{len(configs)}] {name} seed={cfg.seed}: test acc {100 * f['test_acc']:.2f}%"
            f"  {dead}  ({res['train_time']:.1f}s{', reused' if res.get('skipped') else ''})")

    if jobs <= 1:
        out = []
        for i, (name, cfg) in enumerate(configs, start=1):
            out.append(run_experiment(cfg, root, show_progress=show_progress,
                                      log=lambda *a: None, tensorboard=tensorboard))
            done(i, name, cfg, out[-1])
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    threads = run_threads(jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_die_with,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_run_quiet, cfg, str(root), threads, tensorboard)
                   for _, cfg in configs]
        out = []
        for i, ((name, cfg), fut) in enumerate(zip(configs, futures), start=1):
            try:
                out.append(fut.result())
            except BrokenProcessPool:
                raise WorkerDiedError(
                    f"a worker process of the comparison died (killed, or out of memory) while "
                    f"{len(configs) - len(out)} run(s) were unfinished: run the same command "
                    "again to resume (finished runs are reused, interrupted ones resume from "
                    "their last checkpoint)") from None
            done(i, name, cfg, out[-1])
    return out


class WorkerDiedError(RuntimeError):
    """A process of a comparison's pool died; what is finished is kept."""


def invocation() -> str:
    """This process's command line as a user would type it: `dormant compare ...`,
    `python -m dormant ...` or `python reproduce/x.py ...`."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = os.path.basename(argv0)
    if name == "__main__.py":
        prog = ["python", "-m", os.path.basename(os.path.dirname(argv0))]
    elif name.endswith(".py"):
        rel = os.path.relpath(argv0) if os.path.isabs(argv0) else argv0
        prog = ["python", rel if not rel.startswith("..") else argv0]
    else:
        prog = [name or "python"]
    return shlex.join(prog + sys.argv[1:])


def _write_histories(path: Path, runs: list[dict]) -> None:
    """Every run's metrics rows, one JSON line per run, gzip with no timestamp (the same runs
    give the same bytes), written atomically."""
    import gzip
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for r in runs:
            f.write((json.dumps(r, separators=(",", ":")) + "\n").encode())
    os.replace(tmp, path)


def save_comparison(spec: CompareSpec, configs: list, results: list[tuple[str, dict]],
                    rows: list[dict], cols: Sequence, out: Path, command: str,
                    threads: int | None = None, where: str | None = None) -> None:
    """compare.md/.csv/.json and runs.jsonl.gz in `out`; `threads`: what each run had;
    `where`: the machine line taken when the runs started (default: now)."""
    from ..jsonl import read_jsonl
    files = CompareFiles(out)
    out.mkdir(parents=True, exist_ok=True)
    t = table(rows, cols)
    header = f"# {spec.title or 'comparison'}\n\n{spec.description}\n\n" if spec.title else ""
    files.markdown.write_text(header + t.to_markdown() + "\n")
    files.csv.write_text(t.to_csv())
    runs = []
    for (name, res), (_, cfg) in zip(results, configs):
        rel = os.path.relpath(os.path.abspath(res["run_dir"]), os.path.abspath(out))
        runs.append({"variant": name, "seed": cfg.seed, "run_dir": rel,
                     "metrics": read_jsonl(RunFiles(res["run_dir"]).metrics)})
    _write_histories(files.histories, runs)
    files.compare.write_text(json.dumps(
        {"spec": spec.to_dict(), "command": command, "machine": where or machine(threads),
         "rows": rows, "titles": {c[0]: c[1] for c in cols},
         "formats": {c[0]: c[3] for c in cols},
         # relative to this folder, so the comparison reads from any working directory
         "runs": [{k: r[k] for k in ("variant", "seed", "run_dir")} for r in runs]},
        indent=2))


def run_compare(spec: CompareSpec, root: str | os.PathLike = "runs",
                out: str | os.PathLike | None = None, *, show_progress: bool = True,
                log=print, jobs: int = 1, tensorboard: str | os.PathLike | None = None,
                command: str | None = None) -> list[dict]:
    """Run every variant x seed (finished runs are reused), print and save the table.
    `jobs` > 1 runs that many experiments at once in separate processes; `tensorboard`, a
    folder, gets each run's TensorBoard logs. `out` gets compare.md/.csv/.json and every
    run's metrics (runs.jsonl.gz: the folder reads without the run directories); `command`,
    the command line that regenerates it (default: this process's own), is recorded there."""
    configs = spec.configs()
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    for option, folder in (("root", root), ("out", out), ("tensorboard", tensorboard)):
        if folder is not None:           # before the first run trains, not after the last
            writable_dir(folder, option)
    where = machine(run_threads(jobs))   # the code the runs start with, not what HEAD is later
    results = list(zip([n for n, _ in configs],
                       _run_all(configs, root, jobs, show_progress, log, tensorboard)))
    cols = columns_for(spec.columns)
    rows = summarize(results, cols)
    log("")
    if spec.title:
        log(spec.title)
    log(to_markdown(rows, cols))
    if out is not None:
        save_comparison(spec, configs, results, rows, cols, Path(out),
                        command if command is not None else invocation(), run_threads(jobs),
                        where)
        files = CompareFiles(out)
        log(f"\nsaved {files.markdown}, {files.csv.name}, {files.compare.name}, "
            f"{files.histories.name}")
    return rows
