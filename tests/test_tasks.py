"""Continual learning: a sequence of tasks from one dataset, resumable like any run."""
import json

import pytest
import torch

from dormant.data import load_dataset
from dormant.data.tasks import TaskSchedule
from dormant.experiments import ConfigError, ExperimentConfig, run_experiment

QUIET = dict(show_progress=False, log=lambda *a: None)


def test_permuted_tasks_permute_every_split_the_same_way_and_task_zero_is_the_data():
    base = load_dataset("synthetic")
    sched = TaskSchedule("permuted", epochs_per_task=2, samples=100, seed=3)
    assert [sched.task_of(e) for e in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    t0, t1 = sched.make(base, 0), sched.make(base, 1)
    assert torch.equal(t0.train.inputs, base.train.inputs[:100])
    assert torch.equal(t1.train.targets, base.train.targets[:100])
    perm = [int((t1.train.inputs[0] == v).nonzero()[0]) for v in base.train.inputs[0]]
    assert sorted(perm) == list(range(base.input_shape[0])) and perm != sorted(perm)
    for s in ("val", "test"):       # one permutation for every split of a task
        assert torch.equal(getattr(t1, s).inputs,
                           getattr(base, s).inputs[:, torch.tensor(perm).argsort()])
    assert torch.equal(sched.make(base, 1).train.inputs, t1.train.inputs)   # a pure function


def test_random_label_tasks_relabel_the_training_split_only():
    base = load_dataset("synthetic")
    t = TaskSchedule("random-labels", samples=200).make(base, 1)
    assert not torch.equal(t.train.targets, base.train.targets[:200])
    assert torch.equal(t.test.targets, base.test.targets)


CONTINUAL = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16},
                             epochs=4, batch_size=64, method="synaptic-stripping",
                             tasks={"kind": "permuted", "epochs_per_task": 1, "samples": 256})


def test_a_continual_run_logs_its_task_and_resumes_exactly(tmp_path, interrupt_at_epoch):
    straight = run_experiment(CONTINUAL, tmp_path / "a", **QUIET)
    rows = [json.loads(line) for line in
            (tmp_path / "a" / CONTINUAL.label() / "metrics.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == [0, 1, 2, 3]
    with interrupt_at_epoch("synaptic-stripping", 2), pytest.raises(KeyboardInterrupt):
        run_experiment(CONTINUAL, tmp_path / "b", **QUIET)
    resumed = run_experiment(CONTINUAL, tmp_path / "b", **QUIET)
    for key in ("test_acc", "train_loss", "dead_units", "ss/stripped_total", "task"):
        assert resumed["final"][key] == pytest.approx(straight["final"][key]), key


def test_the_method_probes_the_current_task():
    from dormant.methods import build
    from dormant.models import build_model
    from dormant.train import Trainer
    from dormant.train.callbacks import TaskCallback
    base = load_dataset("synthetic")
    model = build_model("mlp", base.input_shape, base.num_classes, width=8)
    method = build("synaptic-stripping")
    sched = TaskSchedule("permuted", samples=128)
    Trainer(model, base, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3, batch_size=64,
            callbacks=[TaskCallback(sched, base), method], show_progress=False).fit()
    assert torch.equal(method._probe.inputs, sched.make(base, 2).val.inputs)


@pytest.mark.parametrize("tasks, message", [
    ({"kind": "rotated"}, "kind must be one of permuted, random-labels"),
    ({"kind": "permuted", "epochs_per_task": 3}, "epochs (4) must be a multiple of"),
    ({"kind": "permuted", "tasks_n": 3}, "unknown key(s)"),
    ({"kind": "permuted", "samples": 0}, "samples must be an int >= 1"),
])
def test_bad_task_settings_are_refused(tasks, message):
    with pytest.raises(ConfigError, match=f"tasks: .*{message[:20]}".replace("(", r"\(")
                       .replace(")", r"\)")):
        CONTINUAL.override(tasks=tasks).validate()
