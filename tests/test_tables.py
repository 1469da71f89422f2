"""The one table module (dormant.tables) and the self-contained comparison folder."""
import csv
import gzip
import io
import json
import shutil

import pytest

from dormant.experiments import CompareSpec, ExperimentConfig, run_compare
from dormant.report import curves, load_comparison
from dormant.report.html import write_report
from dormant.tables import Column, Stat, Table, fmt_cell, paired, reduction, stat

QUIET = dict(show_progress=False, log=lambda *a: None)
TINY = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16}, epochs=2,
                        batch_size=64, lr=0.1)


def test_stat_and_paired_by_seed():
    s = stat([0.5, 0.7], scale=100)
    assert (s.mean, s.n) == (60.0, 2) and s.std == pytest.approx(200 ** 0.5)
    m, sd = s                                        # unpacks like mean_std's tuple
    assert (m, sd) == (s.mean, s.std)
    d = paired([0.9, 0.8, 0.7], [1.0, 0.8, 0.9], scale=100)   # differences 10, 0, 20
    assert d.mean == pytest.approx(10.0) and d.std == pytest.approx(10.0)
    with pytest.raises(ValueError, match="one value per seed"):
        paired([1.0], [1.0, 2.0])
    assert reduction(200.0, 50.0) == 0.75
    assert reduction(0.0, 1.0) != reduction(0.0, 1.0)     # NaN


def test_cells_and_the_three_renderings():
    assert fmt_cell(None) == "–" and fmt_cell("w64 d4") == "w64 d4" and fmt_cell(3) == "3"
    assert fmt_cell(Stat(88.387, 0.1712)) == "88.39 ± 0.17"
    assert fmt_cell(Stat(0.25, 0.14), sign=True) == "+0.25 ± 0.14"
    assert fmt_cell(-1.27, "{:.2f}", sign=True) == "-1.27"
    t = Table([Column("variant", align="left"), Column("acc %", key="acc"),
               Column("dead", key="dead", fmt="{:.1f}")])
    t.add("ReLU", Stat(88.39, 0.17, 3), 14.7).add("GELU & co", None, Stat(0.0, 0.0, 3))
    assert t.to_markdown().splitlines() == [
        "| variant | acc % | dead |", "|---|---:|---:|",
        "| ReLU | 88.39 ± 0.17 | 14.7 |", "| GELU & co | – | 0.0 ± 0.0 |"]
    rows = list(csv.reader(io.StringIO(t.to_csv())))
    assert rows[0] == ["variant", "acc_mean", "acc_std", "dead_mean", "dead_std"]
    assert rows[1] == ["ReLU", "88.39", "0.17", "14.7", ""]
    assert rows[2] == ["GELU & co", "", "", "0.0", "0.0"]
    h = t.to_html()
    assert "<td>GELU &amp; co</td>" in h and "<td>88.39 ± 0.17</td>" in h
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        t.add("x", 1.0)


def test_comparison_folder_reads_without_its_run_directories(tmp_path):
    spec = CompareSpec(TINY, {"slow": {"lr": 0.01}, "fast": {"lr": 0.2}}, seeds=[0, 1],
                       title="t", name="tiny")
    out = spec.folder(tmp_path / "results")
    run_compare(spec, tmp_path / "runs", out, command="dormant compare tiny.yaml", **QUIET)
    data = json.loads((out / "compare.json").read_text())
    assert data["command"] == "dormant compare tiny.yaml" and data["spec"]["name"] == "tiny"
    assert [(r["variant"], r["seed"]) for r in data["runs"]] == [
        ("slow", 0), ("slow", 1), ("fast", 0), ("fast", 1)]
    before = load_comparison(out)
    blob = (out / "runs.jsonl.gz").read_bytes()
    # the same runs (reused) give the same bytes: no timestamp in the gzip header
    run_compare(spec, tmp_path / "runs", out, command="dormant compare tiny.yaml", **QUIET)
    assert (out / "runs.jsonl.gz").read_bytes() == blob
    shutil.rmtree(tmp_path / "runs")          # the run directories are gone (another machine)
    after = load_comparison(out)
    assert after.runs == before.runs and after.command == "dormant compare tiny.yaml"
    assert curves(after, "test_acc") == curves(before, "test_acc")
    page = write_report(out).read_text()
    assert "dormant compare tiny.yaml" in page and "Machine: " in page and "CPU cores" in page
    (out / "runs.jsonl.gz").write_bytes(gzip.compress(b"{not json")[:20])
    with pytest.raises(ValueError, match="damaged.*delete it"):
        load_comparison(out)


def test_the_machine_line_is_taken_when_the_runs_start(tmp_path, monkeypatch):
    """A comparison's machine line (with the code version) is the one of when its runs
    started, not of when it was saved (a long reproduction can span commits)."""
    import dormant.experiments.compare as compare
    lines = iter(["at start, code aaaaaaa", "at save, code bbbbbbb"])
    monkeypatch.setattr(compare, "machine", lambda threads=None: next(lines))
    spec = CompareSpec(TINY, {"a": {}}, seeds=[0], title="t", name="tiny")
    run_compare(spec, tmp_path / "runs", spec.folder(tmp_path), **QUIET)
    data = json.loads((spec.folder(tmp_path) / "compare.json").read_text())
    assert data["machine"] == "at start, code aaaaaaa"


def test_a_spec_without_a_name_has_no_folder(tmp_path):
    from dormant.experiments.config import ConfigError
    with pytest.raises(ConfigError, match="no name"):
        CompareSpec(TINY, {"a": {}}).folder(tmp_path)
