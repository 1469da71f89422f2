import json

import pytest
import torch

from dormant.experiments import (
    CompareSpec,
    ConfigError,
    ExperimentConfig,
    load_run,
    run_compare,
    run_experiment,
)
from dormant.methods import METHODS, Method
from dormant.train.callbacks import load_checkpoint

QUIET = dict(show_progress=False, log=lambda *a: None)
TINY = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16}, epochs=3,
                        batch_size=64, lr=0.1, monitor_every=2)


def test_run_writes_metrics_and_is_skipped_when_finished(tmp_path):
    res = run_experiment(TINY, tmp_path, **QUIET)
    rd = tmp_path / TINY.label()
    rows = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train_loss", "val_acc", "test_acc", "dead_fraction", "dynamic_dnr", "dnr/act1",
                "dead/act1", "sparsity/act1"):
        assert key in rows[-1]
    assert 0 <= rows[-1]["dynamic_dnr"] <= 1 and res["final"] == rows[-1]
    assert res["final"]["test_acc"] > 0.5
    again = run_experiment(TINY, tmp_path, **QUIET)
    assert again["skipped"] and again["final"] == res["final"]


class _Idle(Method):
    name = "_interrupt"

    def _end_epoch(self, result, val_score, evaluate):
        pass


class _Interrupt(_Idle):
    def _end_epoch(self, result, val_score, evaluate):
        if self.epoch == 2:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    straight = run_experiment(TINY, tmp_path / "a", **QUIET)
    METHODS._items["_interrupt"] = _Interrupt
    try:
        cfg = TINY.override(method="_interrupt")
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, tmp_path / "b", **QUIET)
        rd = tmp_path / "b" / cfg.label()
        assert load_checkpoint(rd / "checkpoint.pt")["epoch"] == 1
        assert not (rd / "result.json").exists()
        METHODS._items["_interrupt"] = _Idle      # the "fixed" run continues
        resumed = run_experiment(cfg, tmp_path / "b", **QUIET)
    finally:
        METHODS._items.pop("_interrupt")
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
    for key in ("train_loss", "test_acc", "dead_fraction", "dynamic_dnr",
                "distance_from_init", "grad_norm"):    # theta_0 comes back with the checkpoint
        assert resumed["final"][key] == pytest.approx(straight["final"][key], rel=1e-6), key
    assert straight["final"]["distance_from_init"] > 0 and straight["final"]["grad_norm"] > 0


def test_config_validation_is_up_front():
    with pytest.raises(ConfigError, match="valid models"):
        ExperimentConfig(model="resnet1000").validate()
    with pytest.raises(ConfigError, match="lr must be > 0"):
        ExperimentConfig(lr=0).validate()
    with pytest.raises(ConfigError, match="unknown config key"):
        ExperimentConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="epochs: expected int"):
        ExperimentConfig.from_dict({"epochs": 2.5})
    with pytest.raises(ValueError, match="no option"):
        run_experiment(TINY.override(method_args={"strength": 1}), "unused", **QUIET)


def test_hash_names_the_run_and_ignores_device():
    assert TINY.digest() == TINY.override(device="cuda").digest()
    assert TINY.digest() != TINY.override(seed=1).digest()
    assert TINY.override(model_args={"depth": 3}).model_args == {"width": 16, "depth": 3}


def test_compare_table_is_mean_and_std_over_seeds(tmp_path):
    spec = CompareSpec(TINY.override(epochs=1), {"slow": {"lr": 0.01}, "fast": {"lr": 0.2}},
                       seeds=[0, 1])
    rows = run_compare(spec, tmp_path / "runs", tmp_path / "out", **QUIET)
    runs = json.loads((tmp_path / "out" / "compare.json").read_text())["runs"]
    accs = [json.loads((tmp_path / "runs" / r["run_dir"].split("/")[-1] / "result.json")
                       .read_text())["final"]["test_acc"] * 100
            for r in runs if r["variant"] == "fast"]
    fast = next(r for r in rows if r["variant"] == "fast")
    assert fast["seeds"] == 2
    assert fast["test_acc"][0] == pytest.approx(sum(accs) / 2)
    assert fast["test_acc"][1] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| fast | 2 |" in md and "±" in md
    assert (tmp_path / "out" / "compare.csv").read_text().startswith("variant,seeds,test_acc_mean")


def test_load_run_restores_weights(tmp_path):
    run_experiment(TINY, tmp_path, **QUIET)
    cfg, model, data = load_run(tmp_path / TINY.label())
    assert cfg == TINY
    saved = torch.load(tmp_path / TINY.label() / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_load_run_shares_a_dataset_between_runs(tmp_path):
    other = TINY.override(seed=TINY.seed + 1)
    for cfg in (TINY, other):
        run_experiment(cfg, tmp_path, **QUIET)
    datasets = {}
    _, _, a = load_run(tmp_path / TINY.label(), datasets)
    _, model, b = load_run(tmp_path / other.label(), datasets)
    assert b is a and len(datasets) == 1
    saved = torch.load(tmp_path / other.label() / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_diverged_run_stops_and_logs_no_activity_statistics(tmp_path):
    cfg = TINY.override(lr=1e6, epochs=4)
    res = run_experiment(cfg, tmp_path, **QUIET)
    final = res["final"]
    assert final["diverged"] and final["epoch"] < 4
    assert "dead_fraction" not in final and "dynamic_dnr" not in final
    lines = []
    rows = run_compare(CompareSpec(TINY.override(epochs=4), {"ok": {}, "bad": {"lr": 1e6}},
                                   seeds=[0]), tmp_path, show_progress=False, log=lines.append)
    assert any("diverged" in l for l in lines)
    assert "dead_fraction" not in next(r for r in rows if r["variant"] == "bad")


def test_every_preset_is_a_valid_run_or_comparison():
    from dormant.experiments import PRESETS
    for name in PRESETS.names():
        spec = PRESETS.get(name)()
        if isinstance(spec, CompareSpec):
            assert len(spec.configs()) == len(spec.variants) * len(spec.seeds), name
        else:
            spec.validate()
    adam = PRESETS.get("plasticity-pfmnist-adam")()
    assert adam.base.optimizer == "adam" and adam.base.tasks["kind"] == "permuted"
