"""The HTML report of a comparison: self-contained, rendered in headless Chromium without
console errors or network requests, with the figures that apply; its data series are the
metrics files'."""
import json
import re
import shutil
import subprocess

import pytest

from dormant.cli import main

pytest.importorskip("matplotlib")

SPEC = """
title: Tiny demo
base: {dataset: synthetic, epochs: 3, model_args: {width: 16}}
variants:
  plain: {}
  stripping: {method: synaptic-stripping, method_args: {factor: 0.2}}
seeds: [0, 1]
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "spec.yaml").write_text(SPEC)
    assert main(["compare", "--config", str(tmp / "spec.yaml"), "--root", str(tmp / "runs"),
                 "--out", str(tmp / "out"), "--no-progress"]) == 0
    return tmp


def test_the_report_is_self_contained_with_every_figure_that_applies(report):
    page = (report / "out" / "report.html").read_text()
    for fig in ("accuracy", "dead", "heatmap", "sparsity", "erank"):
        assert f'id="fig-{fig}"' in page, fig
        assert (report / "out" / "report" / f"{fig}.png").exists()
    assert 'id="fig-pruning"' not in page and 'id="fig-units"' not in page   # do not apply
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"https?://", page)
    assert "<th>dead units %</th>" in page and "Tiny demo" in page


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    url = (report / "out" / "report.html").as_uri()
    quiet = ["--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-default-apps"]   # browser's own
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", *quiet,
                           "--enable-logging=stderr", "--v=1", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count("<figure") == 5 and "<table>" in dom
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "error" in line.lower()], console
    # the page asks for nothing; Chromium's own services (time, sign-in, spelling
    # dictionaries) still call their google hosts, which are not the page's requests
    requests = [m for m in re.findall(r"NotifyBeforeURLRequest: (https?://[^/\s]+)", proc.stderr)
                if not re.search(r"google\.com|gvt1\.com|googleapis\.com", m)]
    assert requests == []
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,1800", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 50_000           # the figures were drawn, not blank


def test_the_figures_data_series_are_the_metrics_files(report):
    from dormant.report import curves, load_comparison
    cmp = load_comparison(report / "out", report / "runs")
    data = json.loads((report / "out" / "compare.json").read_text())
    rows = {}
    for run in data["runs"]:
        rd = report / "out" / run["run_dir"]
        for line in (rd / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows.setdefault(run["variant"], {}).setdefault(r["epoch"], []).append(r["dead_fraction"])
    for variant, (epochs, mean, _) in curves(cmp, "dead_fraction").items():
        assert epochs == [1, 2, 3]
        assert mean == pytest.approx([sum(v) / len(v) for _, v in sorted(rows[variant].items())])


def test_unknown_metrics_are_refused_with_the_list(report, capsys):
    assert main(["report", str(report / "out"), "--metrics", "tset_acc"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric(s) ['tset_acc']; the runs have:" in err and "test_acc" in err
