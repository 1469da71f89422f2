import json

import pytest

from dormant.cli import _parse_mapping, main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("mnist1d", "fashion-mnist", "lenet300", "vit-tiny", "dying-relu", "never_active"):
        assert word in out


@pytest.mark.parametrize("argv,message", [
    (["run", "--model", "nope"], "valid models"),
    (["run", "--dataset", "imagenet"], "valid datasets"),
    (["run", "--lr", "-1"], "lr must be > 0"),
    (["run", "--preset", "nope"], "valid presets"),
    (["run", "--preset", "dying-relu"], "is a comparison"),
    (["compare"], "exactly one of"),
    (["doctor", "/nonexistent"], "not a run directory"),
    (["list", "gizmos"], "cannot list"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_then_doctor(tmp_path, capsys):
    argv = ["run", "--dataset", "synthetic", "--model-args", "width=8", "--epochs", "1",
            "--root", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out[:out.index("}") + 1])["epoch"] == 1
    (rd,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert main(["doctor", str(rd), "--split", "val"]) == 0
    report = capsys.readouterr().out
    assert "act1" in report and "total" in report and "dead %" in report


def test_compare_from_yaml(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("base: {dataset: synthetic, epochs: 1, model_args: {width: 8}}\n"
                    "variants: {a: {lr: 0.01}, b: {lr: 0.1}}\nseeds: [0, 1]\n")
    assert main(["compare", "--config", str(spec), "--root", str(tmp_path / "r"),
                 "--out", str(tmp_path / "o"), "--no-progress", "--seeds", "3"]) == 0
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "| a | 1 |" in md and "| b | 1 |" in md


def test_compare_in_parallel_matches_serial_and_reports(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("base: {dataset: synthetic, epochs: 2, model_args: {width: 8}}\n"
                    "variants: {a: {lr: 0.05}, b: {lr: 0.2}}\nseeds: [0]\n"
                    "columns: [val_loss]\n")
    common = ["compare", "--config", str(spec), "--no-progress"]
    assert main(common + ["--root", str(tmp_path / "r1"), "--out", str(tmp_path / "o1")]) == 0
    assert main(common + ["--root", str(tmp_path / "r2"), "--out", str(tmp_path / "o2"),
                          "--jobs", "2"]) == 0
    serial = json.loads((tmp_path / "o1" / "compare.json").read_text())["rows"]
    parallel = json.loads((tmp_path / "o2" / "compare.json").read_text())["rows"]
    for r1, r2 in zip(serial, parallel):
        assert r1["test_acc"] == pytest.approx(r2["test_acc"]) and r1["variant"] == r2["variant"]
    assert "val_loss" in (tmp_path / "o1" / "compare.md").read_text()
    pytest.importorskip("matplotlib")
    assert main(["report", str(tmp_path / "o1"), "--metrics", "test_acc,dead_units"]) == 0
    png = tmp_path / "o1" / "curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_without_a_comparison_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "dormant compare" in capsys.readouterr().err


def test_parse_mapping_keeps_lists():
    assert _parse_mapping("widths=[300,100],bias=False,name=x") == {
        "widths": [300, 100], "bias": False, "name": "x"}
    assert _parse_mapping("widths={'act1': 3, 'act2': 4},sparsity=0.5") == {
        "widths": {"act1": 3, "act2": 4}, "sparsity": 0.5}


def test_parse_mapping_reads_yaml_style_booleans():
    assert _parse_mapping("bias_fallback=true,standardize=FALSE,name=truth") == {
        "bias_fallback": True, "standardize": False, "name": "truth"}
