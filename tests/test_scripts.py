"""The reproduction and benchmark scripts parse their options: --help works, bad values are
refused before anything runs."""
from __future__ import annotations

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
    for name in ("synaptic_stripping_mlp_60ep", "synaptic_stripping_mlp_30ep_unit",
                 "synaptic_stripping_mlp_30ep", "synaptic_stripping_mlp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "compare.json").write_text("{}")
    assert [f.name for f in ss["long_folders"](tmp_path)] == [
        "synaptic_stripping_mlp_30ep", "synaptic_stripping_mlp_30ep_unit",
        "synaptic_stripping_mlp_60ep"]
    assert ss["long_folder"](tmp_path, 30, True).name == "synaptic_stripping_mlp_30ep_unit"


@pytest.mark.skipif(fm._find("train-images-idx3-ubyte", fm.search_dirs()) is None,
                    reason="Fashion-MNIST not installed")
def test_demp_speed_output_parses_into_the_summary(tmp_path, monkeypatch, capsys):
    """The summary reads what the benchmark prints (the two formats stay in step)."""
    script = ROOT / "benchmarks/demp_speed.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--epochs", "1", "--train-size", "256",
                                      "--width", "0.25", "--train-batch", "64", "--span", "0.5"])
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
