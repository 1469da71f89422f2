"""One experiment: a run directory named by the config hash; finished runs are skipped and
interrupted ones resume from their last epoch checkpoint.

    runs/<dataset>-<model>[-<method>]-s<seed>-<hash>/
        config.json     the full config
        metrics.jsonl   one line of metrics per epoch
        checkpoint.pt   the last epoch's state (model, optimizer, callbacks, RNG)
        model.pt        final weights (state_dict)
        result.json     written last: the run is finished
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from .. import __version__
from ..data import load_dataset
from .. import methods
from ..activations import make_activation
from ..models import build_model, initialize
from ..schedules import make_scheduler
from ..surgery import architecture, resize
from ..train import CheckpointCallback, JsonlLogger, MonitorCallback, Trainer, make_optimizer
from ..train.callbacks import read_jsonl
from .config import ExperimentConfig


def run_dir(cfg: ExperimentConfig, root: str | os.PathLike = "runs") -> Path:
    return Path(root) / cfg.label()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return f"{__version__}+{out.stdout.strip()}" if out.returncode == 0 else __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def _dataset_key(cfg: ExperimentConfig) -> str:
    """The config fields that decide its dataset."""
    return json.dumps([cfg.dataset, cfg.val_size, cfg.dataset_args, cfg.device], sort_keys=True)


def build(cfg: ExperimentConfig, data=None):
    """(data, model) for a config, on its device, seeded; `data` is the config's dataset when
    the caller already has it loaded."""
    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_dataset(cfg.dataset, val_size=None if cfg.val_size < 0 else cfg.val_size,
                            **cfg.dataset_args).to(cfg.device)
    act = functools.partial(make_activation, cfg.activation, **cfg.activation_args)
    model = build_model(cfg.model, data.input_shape, data.num_classes, activation=act,
                        **cfg.model_args)
    initialize(cfg.init, model, data.train.inputs[:1024], cfg.activation, **cfg.init_args)
    return data, model.to(cfg.device)


def run_experiment(cfg: ExperimentConfig, root: str | os.PathLike = "runs", *,
                   show_progress: bool = True, log=print) -> dict:
    """Train `cfg` (or return its saved result if it already finished)."""
    cfg.validate()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
    rd = run_dir(cfg, root)
    if (rd / "result.json").exists():
        log(f"[skip] {rd} already finished")
        return {**json.loads((rd / "result.json").read_text()), "skipped": True}
    method = methods.build(cfg.method, **cfg.method_args)  # refuse bad options early
    data, model = build(cfg)
    arch_built = architecture(model)
    rd.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    period = getattr(method, "schedule_period", lambda: None)()  # pruning rounds restart it
    scheduler = make_scheduler(cfg.schedule, optimizer, cfg.epochs, period, **cfg.schedule_args)
    ckpt = CheckpointCallback(rd / "checkpoint.pt")
    callbacks = [MonitorCallback(every=cfg.monitor_every, eps=cfg.eps, criterion=cfg.criterion),
                 *([method] if method is not None else []), JsonlLogger(rd / "metrics.jsonl"),
                 ckpt]
    trainer = Trainer(model, data, optimizer, epochs=cfg.epochs, batch_size=cfg.batch_size,
                      seed=cfg.seed, scheduler=scheduler, callbacks=callbacks,
                      show_progress=show_progress)
    if ckpt.restore(trainer):
        log(f"[resume] {rd} from epoch {trainer.epoch}")
        rows = read_jsonl(rd / "metrics.jsonl", upto_epoch=trainer.epoch)
        (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        _write_json(rd / "config.json", cfg.to_dict())
        (rd / "metrics.jsonl").write_text("")
    t0 = time.perf_counter()
    trainer.fit()
    history = read_jsonl(rd / "metrics.jsonl")
    torch.save(model.state_dict(), rd / "model.pt")
    arch = architecture(model)
    if arch != arch_built:                       # compacted during training (DemP)
        _write_json(rd / "architecture.json", arch)
    result = {"config": cfg.to_dict(), "final": history[-1], "run_dir": str(rd),
              "train_time": sum(r["train_time"] for r in history),
              "wall_time": time.perf_counter() - t0,
              "params": sum(p.numel() for p in model.parameters()),
              "version": _code_version(), "torch": torch.__version__}
    _write_json(rd / "result.json", result)
    return result


def load_run(path: str | os.PathLike, datasets: dict | None = None):
    """(config, trained model, dataset) of a run directory: final weights, else the last
    checkpoint. `datasets`, a dict kept by the caller, shares loaded datasets between the
    runs it loads (keyed by the config fields that decide the dataset)."""
    rd = Path(path)
    if not (rd / "config.json").exists():
        raise FileNotFoundError(f"{rd} is not a run directory (no config.json)")
    cfg = ExperimentConfig.from_dict(json.loads((rd / "config.json").read_text()))
    key = _dataset_key(cfg)
    data, model = build(cfg, None if datasets is None else datasets.get(key))
    if datasets is not None:
        datasets[key] = data
    arch = None
    if (rd / "model.pt").exists():
        state = torch.load(rd / "model.pt", map_location=cfg.device, weights_only=True)
        if (rd / "architecture.json").exists():
            arch = json.loads((rd / "architecture.json").read_text())
    elif (rd / "checkpoint.pt").exists():
        ckpt = torch.load(rd / "checkpoint.pt", map_location=cfg.device, weights_only=True)
        state, arch = ckpt["model"], ckpt.get("arch")
    else:
        raise FileNotFoundError(f"{rd} has no weights yet (no model.pt or checkpoint.pt)")
    if arch is not None and arch != architecture(model):
        resize(model, arch)
    model.load_state_dict(state)
    return cfg, model, data
