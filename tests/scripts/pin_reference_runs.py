"""Record the reference runs: for each config, its run-directory name and every epoch's
metrics (timings left out). `tests/test_reference_runs.py` trains them again and compares, so
that a refactor of the training machinery changes no number and no run name.

    python tests/scripts/pin_reference_runs.py      # rewrites tests/data/reference_runs.json

Rewrite only for a change meant to alter the numbers, and say so in the commit.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from dormant.experiments import ExperimentConfig, run_experiment

OUT = Path(__file__).resolve().parents[1] / "data" / "reference_runs.json"
TIMINGS = ("train_time",)
ROUNDS = {"rounds": 2, "epochs_per_round": 1}
BASE = dict(dataset="synthetic", model="mlp", model_args={"width": 16}, epochs=3,
            batch_size=64, lr=0.2)


def configs() -> list[ExperimentConfig]:
    """Every method family, a signed activation, a CNN, continual tasks, and a probe split
    longer than the plasticity metrics' 1024 samples."""
    cases = [
        {},
        {"method": "synaptic-stripping", "method_args": {"factor": 0.2}},
        {"method": "redo", "method_args": {"tau": 0.1}},
        {"method": "ap", "method_args": {**ROUNDS, "neuron_fraction": 0.5}},
        {"method": "nnrelief", "method_args": {**ROUNDS, "probe_samples": 200}},
        {"method": "demp", "method_args": {"reg_peak": 0.5, "target": "all", "prune_every": 20,
                                           "noise_peak": 1e-3}},
        {"method": "continual-backprop", "method_args": {"replacement_rate": 0.01},
         "tasks": {"kind": "permuted", "epochs_per_task": 1}},
        {"activation": "leaky_relu", "lr": 0.05, "dataset_args": {"num_train": 4096}},
        {"activation": "leaky_relu", "dataset_args": {"num_train": 4096}},   # diverges
        {"model": "vgg-small", "model_args": {"width": 0.25, "hidden": 32},
         "dataset_args": {"image": True},
         "epochs": 2, "method": "synaptic-stripping"},
    ]
    return [ExperimentConfig(**{**BASE, **c}).validate() for c in cases]


def record(root: str) -> dict:
    out = {}
    for cfg in configs():
        run_experiment(cfg, root, show_progress=False, log=lambda *_: None)
        rows = [json.loads(line) for line in
                (Path(root) / cfg.label() / "metrics.jsonl").read_text().splitlines()]
        out[cfg.label()] = {"config": cfg.to_dict(),
                            "metrics": [{k: v for k, v in r.items() if k not in TIMINGS}
                                        for r in rows]}
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        runs = record(tmp)
    OUT.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    print(f"{len(runs)} reference runs -> {OUT}", file=sys.stderr)
