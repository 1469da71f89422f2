"""Contracts every registered method keeps: it trains through the experiment runner, leaves a
plain model (no hooks, no buffers of ours, no optimizer hooks), and resumes exactly."""
import json

import pytest
import torch

from dormant.data import load_dataset
from dormant.experiments import ExperimentConfig, run_experiment
from dormant.methods import METHODS, build
from dormant.models import build_model
from dormant.train import Trainer

QUIET = dict(show_progress=False, log=lambda *a: None)
ROUNDS = {"rounds": 2, "epochs_per_round": 1}          # 3 epochs
METHOD_ARGS = {"synaptic-stripping": {"factor": 0.2}, "redo": {"tau": 0.1}, "imp": ROUNDS,
               "ap": {**ROUNDS, "neuron_fraction": 0.5}, "nnrelief": {**ROUNDS, "probe_samples": 200},
               "demp": {"reg_peak": 0.5, "target": "all", "prune_every": 20, "noise_peak": 1e-3},
               "structured": {"sparsity": 0.5, "prune_every": 10}}
NAMES = [n for n in METHODS.names() if n != "none"]


def _hooks(obj):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in obj.modules())


@pytest.mark.parametrize("name", NAMES)
def test_finalize_leaves_a_plain_model(name):
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = build_model("mlp", data.input_shape, data.num_classes, width=16, depth=2)
    keys = set(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    Trainer(model, data, opt, epochs=3, batch_size=64, show_progress=False,
            callbacks=[build(name, **METHOD_ARGS.get(name, {}))]).fit()
    assert _hooks(model) == 0
    assert set(model.state_dict()) == keys
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_resume_gives_the_same_run(name, tmp_path, interrupt_at_epoch):
    cfg = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16},
                           epochs=3, batch_size=64, lr=0.2, method=name,
                           method_args=METHOD_ARGS.get(name, {}))
    straight = run_experiment(cfg, tmp_path / "a", **QUIET)
    with interrupt_at_epoch(name, 2), pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "b", **QUIET)
    resumed = run_experiment(cfg, tmp_path / "b", **QUIET)
    for key, value in straight["final"].items():
        if key != "train_time":
            assert resumed["final"][key] == pytest.approx(value, rel=1e-6), key
    rd = tmp_path / "b" / cfg.label()
    assert [json.loads(l)["epoch"] for l in (rd / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
