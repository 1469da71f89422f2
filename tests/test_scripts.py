"""The reproduction and benchmark scripts parse their options: --help works, bad values are
refused before anything runs."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

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
    ("reproduce/activations.py", ["--clipped", "relu6"], "unknown clipped activation"),
])
def test_bad_options_refused(script, args, message, monkeypatch, capsys):
    assert run(ROOT / script, *args, monkeypatch=monkeypatch) == 2
    assert message in capsys.readouterr().err
