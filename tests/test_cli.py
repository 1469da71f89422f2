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
    (["help", "gizmo"], "unknown method 'gizmo'; valid methods: ap, continual-backprop, demp"),
    (["run", "--method", "synaptic-stripping", "--method-args", "factor=abc"],
     "synaptic-stripping: factor: expected a float in (0, 1), got 'abc'"),
    (["run", "--method", "redo", "--method-args", "tua=0.1"], "redo has no option(s) ['tua']"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_then_doctor(tmp_path, capsys):
    argv = ["run", "--dataset", "synthetic", "--model-args", "width=8", "--epochs", "1",
            "--root", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("epoch 1/1  loss ")          # a line per epoch, also without a tty
    assert json.loads(out[out.index("{"):out.index("}") + 1])["epoch"] == 1
    (rd,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert main(["doctor", str(rd), "--split", "val"]) == 0
    report = capsys.readouterr().out
    assert "act1" in report and "total" in report and "dead %" in report
    assert main(["doctor", str(rd), "--split", "val", "--sites"]) == 0
    report = capsys.readouterr().out
    assert "fc1 -> relu" in report and "proof" in report


def test_compare_from_yaml(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("base: {dataset: synthetic, epochs: 1, model_args: {width: 8}}\n"
                    "variants: {a: {lr: 0.01}, b: {lr: 0.1}}\nseeds: [0, 1]\n")
    assert main(["compare", "--config", str(spec), "--root", str(tmp_path / "r"),
                 "--out", str(tmp_path / "o"), "--no-progress", "--seeds", "3"]) == 0
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "| a | 1 |" in md and "| b | 1 |" in md
    recorded = json.loads((tmp_path / "o" / "compare.json").read_text())["command"]
    assert recorded == (f"dormant compare --config {spec} --root {tmp_path / 'r'} --out "
                        f"{tmp_path / 'o'} --no-progress --seeds 3")


@pytest.mark.slow
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


def test_help_lists_every_option_with_type_default_and_help(capsys):
    from dormant.methods import method_options
    assert main(["help", "demp"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[3:] if line.strip()}
    assert set(method_options("demp")) <= set(lines)
    assert "float >= 0" in lines["reg_peak"] and "0.001" in lines["reg_peak"]
    assert "one of lasso, l2, cdg_lasso, cdg_l2" in lines["regulariser"]
    assert main(["list", "methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "factor" in out and "float in (0, 1)" in out and "rounds" in out


def test_run_directory_names_are_unchanged_by_the_method_api():
    """Labels (config hashes) recorded before the typed options: finished runs stay found."""
    from dormant.experiments import ExperimentConfig
    rounds = {"rounds": 2, "epochs_per_round": 1}
    cases = {"synthetic-mlp-ap-s0-ff87242f19": ("ap", {**rounds, "neuron_fraction": 0.5}),
             "synthetic-mlp-demp-s0-902fd220e1": ("demp", {"reg_peak": 0.5, "target": "all",
                                                           "prune_every": 20,
                                                           "noise_peak": 1e-3}),
             "synthetic-mlp-nnrelief-s0-a651e32273": ("nnrelief", {**rounds,
                                                                   "probe_samples": 200}),
             "synthetic-mlp-synaptic-stripping-s0-0a246cd949": ("synaptic-stripping",
                                                                {"factor": 0.2})}
    for label, (method, args) in cases.items():
        cfg = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16},
                               epochs=3, batch_size=64, lr=0.2, method=method,
                               method_args=args).validate()
        assert cfg.label() == label
