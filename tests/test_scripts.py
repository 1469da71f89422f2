"""The reproduction and benchmark scripts parse their options: --help works, bad values are
refused before anything runs."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from dormant.data import fashion_mnist as fm

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("reproduce/*.py"), *ROOT.glob("benchmarks/*.py")])


def run(script: Path, *args: str, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    return exit_.value.code


def test_scripts_found():
    assert {p.name for p in SCRIPTS} >= {"activations.py", "synaptic_stripping.py",
                                          "demp_speed.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help(script, monkeypatch, capsys):
    assert run(script, "--help", monkeypatch=monkeypatch) == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("script, args, message", [
    ("reproduce/synaptic_stripping.py", ["--long-shapes", "3"], "WIDTHxDEPTH"),
    ("reproduce/synaptic_stripping.py", ["--long-epochs", "-1"], "--long-epochs"),
    ("reproduce/synaptic_stripping.py", ["--long-inputs", "raw"], "invalid choice"),
    ("reproduce/activations.py", ["--clipped", "relu6"], "unknown clipped activation"),
    ("reproduce/activations.py", ["--q-star", "-1"], "--q-star must be > 0"),
    ("reproduce/plasticity.py", ["--tasks", "0"], "--tasks and --samples must be >= 1"),
    ("reproduce/plasticity.py", ["--optimizers", "sgd,lamb"], "unknown optimizer(s) ['lamb']"),
    ("benchmarks/demp_speed.py", ["--pct-start", "0.1,x"], "--pct-start takes numbers"),
    ("benchmarks/demp_speed.py", ["--pct-start", "0.1,1.5"], "--pct-start must be in (0, 1)"),
    ("benchmarks/demp_speed.py", ["--prune-every", "50,0"], "--prune-every must be >= 1"),
    ("benchmarks/demp_speed.py", ["--compile", "fast"], "invalid choice: 'fast'"),
])
def test_bad_options_refused(script, args, message, monkeypatch, capsys):
    assert run(ROOT / script, *args, monkeypatch=monkeypatch) == 2
    assert message in capsys.readouterr().err


def test_new_options_leave_existing_run_names_alone(tmp_path):
    """Options added later (q*, unit inputs) stay out of the configs at their defaults, so
    finished runs are found again; other values name other runs and other folders."""
    act = runpy.run_path(str(ROOT / "reproduce/activations.py"))
    default, q2 = act["variants"]([0.85]), act["variants"]([0.85], q_star=2.0)
    assert all("q_star" not in v["init_args"] for v in default.values())
    assert q2["ReLU s=0.5"] == default["ReLU s=0.5"]          # ReLU's init has no q*
    assert q2["CReLU s=0.85 V'=0.7"]["init_args"]["q_star"] == 2.0
    ss = runpy.run_path(str(ROOT / "reproduce/synaptic_stripping.py"))
    assert dict(ss["mlp_spec"](30, [0]).base.dataset_args) == {}
    assert dict(ss["mlp_spec"](30, [0], unit_inputs=True).base.dataset_args) == {
        "standardize": False}
    specs = [ss["long_spec"](60, [0], [(64, 4)], False, False),
             ss["long_spec"](30, [0], [(64, 4)], True, False),
             ss["long_spec"](30, [0], [(64, 4)], False, True),
             ss["long_spec"](30, [0], [(64, 4)], False, False), ss["mlp_spec"](15, [0])]
    for spec in specs:      # folders named by their spec, found and ordered by what it says
        spec.folder(tmp_path).mkdir()
        (spec.folder(tmp_path) / "compare.json").write_text(json.dumps({"spec": spec.to_dict()}))
    assert [f.name for f in ss["long_folders"](tmp_path)] == [
        "synaptic_stripping_mlp_30ep", "synaptic_stripping_mlp_30ep_bias",
        "synaptic_stripping_mlp_30ep_unit", "synaptic_stripping_mlp_60ep"]


@pytest.mark.skipif(fm._find("train-images-idx3-ubyte", fm.search_dirs()) is None,
                    reason="Fashion-MNIST not installed")
@pytest.mark.slow
def test_demp_speed_output_parses_into_the_summary(tmp_path, monkeypatch, capsys):
    """The summary reads what the benchmark prints (the two formats stay in step)."""
    script = ROOT / "benchmarks/demp_speed.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--epochs", "1", "--train-size", "256",
                                      "--width", "0.25", "--train-batch", "64", "--span", "0.5",
                                      "--round-to", "0"])
    runpy.run_path(str(script), run_name="__main__")
    out = tmp_path / "run.txt"
    out.write_text(capsys.readouterr().out)
    summary = runpy.run_path(str(ROOT / "benchmarks/demp_speed_summary.py"))
    got = summary["parse"](out)
    assert (got["width"], got["batch"], got["epochs"], got["peak"], got["span"]) == (
        0.25, 64, 1, 0.02, 0.5)
    assert 0 <= got["removed"] <= 100 and got["train_x"] > 0 and got["flop_x"] >= 1
    assert "| 0.25 | 64 | 0.02 | 0.5 | 1 |" in summary["table"]([got])
    bad = tmp_path / "bad.txt"
    bad.write_text("not a benchmark output\n")
    with pytest.raises(ValueError, match="not a complete demp_speed.py output"):
        summary["parse"](bad)


@pytest.mark.parametrize("script", sorted(ROOT.glob("reproduce/*.py")), ids=lambda p: p.name)
def test_committed_pages_are_what_the_scripts_write(script, tmp_path, monkeypatch):
    """docs/results/*.md and the tables of docs/results.md are regenerated by the scripts
    (`--pages-only`: from the committed comparisons and sections, nothing trained), and the
    committed pages are exactly what they write."""
    import shutil
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs" / "results", docs / "results")
    shutil.copy(ROOT / "docs" / "results.md", docs / "results.md")
    monkeypatch.setattr(sys, "argv", [str(script), "--pages-only", "--out",
                                      str(docs / "results"), "--root", str(tmp_path / "none")])
    runpy.run_path(str(script), run_name="__main__")
    for page in [docs / "results.md", *sorted((docs / "results").glob("*.md"))]:
        committed = ROOT / page.relative_to(tmp_path)
        assert committed.exists() and page.read_text() == committed.read_text(), page.name
