"""One experiment: a run directory ``runs/<dataset>-<model>[-<method>]-s<seed>-<hash>/``
named by the config hash (its files: `dormant.rundir.RunFiles`); finished runs are skipped
and interrupted ones resume from their last epoch checkpoint."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path

import torch

from .. import methods
from ..activations import make_activation
from ..data import load_dataset
from ..jsonl import write_jsonl
from ..methods.base import not_on_shards
from ..models import build_model, initialize
from ..rundir import CorruptRunError, RunFiles, code_version, run_lock, writable_dir, write_json
from ..schedules import make_scheduler
from ..session import Session
from ..sharding import full_state, shard
from ..surgery import architecture, resize
from ..train import CheckpointCallback, JsonlLogger, SessionCallback, Trainer, make_optimizer
from ..train.callbacks import TaskCallback, load_checkpoint
from ..train.loop import rank_and_world
from .config import ExperimentConfig


def run_dir(cfg: ExperimentConfig, root: str | os.PathLike = "runs") -> Path:
    return Path(root) / cfg.label()


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
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes, activation=act,
                            **cfg.model_args)
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "alloc" not in str(err).lower():
            raise
        raise ValueError(f"model {cfg.model!r} with model_args {dict(cfg.model_args)} does not "
                         f"fit in memory ({''.join(str(err).splitlines()[:1])[:160]}): choose smaller "
                         "widths") from None
    initialize(cfg.init, model, data.train.inputs[:1024], cfg.activation, **cfg.init_args)
    return data, model.to(cfg.device)


def run_experiment(cfg: ExperimentConfig, root: str | os.PathLike = "runs", *,
                   show_progress: bool = True, log=print, epoch_log=None,
                   tensorboard: str | os.PathLike | None = None, fsdp: bool = False) -> dict:
    """Train `cfg` (or return its saved result if it already finished). One process at a
    time trains a run directory: a second one waits for the first, then finds it finished.
    `epoch_log(line)` receives one line per finished epoch; `tensorboard`, a folder, gets the
    run's TensorBoard logs under the run's name. `fsdp`: under torchrun, shard the model with
    FSDP2 (`dormant.sharding.shard`) instead of replicating it with DDP; the run directory is
    the same (how a run is spread over ranks is not part of its config)."""
    cfg.validate()
    writable_dir(root, "root")
    if tensorboard is not None:
        writable_dir(tensorboard, "tensorboard")
    rd = run_dir(cfg, root)
    files = RunFiles(rd)
    if files.result.exists():
        return _finished(rd, cfg, log)
    method = methods.from_options(cfg.method, cfg.method_options())   # parsed by validate
    rank, world = rank_and_world()
    if fsdp:
        _check_fsdp(method, world)
    if rank == 0:
        rd.mkdir(parents=True, exist_ok=True)
    # under torchrun, rank 0 holds the lock and writes; every rank trains its share
    lock = run_lock(rd, log=log) if rank == 0 else contextlib.nullcontext()
    with lock:
        _barrier(world)
        if files.result.exists():      # finished while we waited for the lock
            return _finished(rd, cfg, log)
        session = Session(method, every_steps=cfg.monitor_every, eps=cfg.eps,
                          criterion=cfg.criterion)
        extra = []
        if tensorboard is not None and rank == 0:
            from ..integrations.tensorboard import TensorBoardCallback
            extra.append(TensorBoardCallback(Path(tensorboard) / rd.name, session=session))
        if rank != 0:
            show_progress, epoch_log = False, None
        result = _train(cfg, rd, session, show_progress, log, epoch_log, extra, fsdp)
        _barrier(world)        # rank 0 lets go of the lock once every rank is done
        return result


def _check_fsdp(method, world: int) -> None:
    """--fsdp needs a method that acts on shards and torchrun; refused before anything runs."""
    if method is not None and not method.acts_on_sharded:
        raise ValueError("--fsdp: " + not_on_shards(method.name))
    if world < 2:
        raise ValueError("--fsdp shards the model over the ranks of torchrun: run it as "
                         "torchrun --nproc_per_node N -m dormant run --fsdp ... (N >= 2)")


def _check_ranks_agree(model) -> None:
    """Every rank must end with the very same weights (the same decisions on all-reduced
    statistics); a difference is a bug, reported rather than written."""
    import hashlib
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                     for p in model.state_dict().values())).hexdigest()
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights ({digests}): a decision "
                           "was not identical on every rank")


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _finished(rd: Path, cfg: ExperimentConfig, log) -> dict:
    files = RunFiles(rd)
    try:
        result = json.loads(files.result.read_text())
        saved = ExperimentConfig.from_dict(result["config"]).label()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptRunError(f"{files.result} is damaged ({type(err).__name__}: "
                              f"{str(err)[:200]}); delete it and run the same command again: "
                              "the run resumes from its last checkpoint") from None
    if saved != cfg.label():
        raise CorruptRunError(f"{rd} holds the result of run {saved}, not of {cfg.label()} (a "
                              "copied, moved or linked directory): move it away to train this "
                              "config")
    spread = (f" (trained on {result['world_size']} ranks, sharded with FSDP2)"
              if result.get("sharding") == "fsdp" else "")
    log(f"[skip] {rd} already finished{spread}")
    return {**result, "skipped": True}


def _check_config_file(rd: Path, cfg: ExperimentConfig, log) -> None:
    """A run directory is named by its config's hash: its config.json must hold that config.
    A damaged one is rewritten; another config is refused."""
    path = RunFiles(rd).config
    try:
        saved = ExperimentConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        log(f"[repair] {path} was damaged; rewritten from this run's config")
        write_json(path, cfg.to_dict())
        return
    if saved.label() != cfg.label():
        raise CorruptRunError(f"{path} holds another config ({saved.label()}) than the one this "
                              f"directory is named after ({cfg.label()}): it was edited or "
                              "copied. Move the directory away to train this config afresh")


def _train(cfg: ExperimentConfig, rd: Path, session: Session, show_progress: bool, log,
           epoch_log, extra=(), fsdp: bool = False) -> dict:
    files = RunFiles(rd)
    data, model = build(cfg)
    arch_built = architecture(model)
    if fsdp:
        shard(model)            # before the optimizer: it must hold the sharded parameters
        log(f"[fsdp] the model sharded over {rank_and_world()[1]} ranks (FSDP2)")
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    period = getattr(session.method, "schedule_period", lambda: None)()  # pruning rounds restart it
    scheduler = make_scheduler(cfg.schedule, optimizer, cfg.epochs, period, **cfg.schedule_args)
    ckpt = CheckpointCallback(files.checkpoint, identity=cfg.label())
    history = JsonlLogger(files.metrics)
    tasks = []
    if cfg.tasks:
        from ..data.tasks import TaskSchedule
        tasks = [TaskCallback(TaskSchedule(**cfg.tasks), data)]
    callbacks = [*tasks, SessionCallback(session), history, *extra, ckpt]
    trainer = Trainer(model, data, optimizer, epochs=cfg.epochs, batch_size=cfg.batch_size,
                      seed=cfg.seed, scheduler=scheduler, callbacks=callbacks,
                      show_progress=show_progress, epoch_log=epoch_log,
                      precision=cfg.precision, memory_format=cfg.memory_format,
                      compile=cfg.compile)
    writer = trainer.rank == 0
    resumed = ckpt.restore(trainer)
    if resumed and writer:
        _check_config_file(rd, cfg, log)
        log(f"[resume] {rd} from epoch {trainer.epoch}")
        history.restore(trainer.epoch)
    elif writer:
        write_json(files.config, cfg.to_dict())
        write_jsonl(files.metrics, [])
    t0 = time.perf_counter()
    trainer.fit()
    _barrier(trainer.world)                      # rank 0 has written the last epoch
    if trainer.world > 1 and not fsdp:      # FSDP2: one model, each rank its rows of it
        _check_ranks_agree(model)
    history = history.rows
    arch = architecture(model)
    weights = full_state(model)[0] if fsdp else model.state_dict()    # FSDP2: whole, on rank 0
    if writer:
        tmp = files.model.with_suffix(".pt.tmp")
        torch.save(weights, tmp)
        os.replace(tmp, files.model)
        if arch != arch_built:                   # compacted during training (DemP)
            write_json(files.architecture, arch)
    result = {"config": cfg.to_dict(), "final": history[-1], "run_dir": str(rd),
              "train_time": sum(r["train_time"] for r in history),
              "wall_time": time.perf_counter() - t0,
              "params": sum(p.numel() for p in model.parameters()),
              "version": code_version(), "torch": torch.__version__,
              **({"world_size": trainer.world, "ranks_identical": True}
                 if trainer.world > 1 and not fsdp else {}),
              **({"world_size": trainer.world, "sharding": "fsdp"} if fsdp else {})}
    if writer:
        write_json(files.result, result)
    return result


def load_run(path: str | os.PathLike, datasets: dict | None = None):
    """(config, trained model, dataset) of a run directory: final weights, else the last
    checkpoint. `datasets`, a dict kept by the caller, shares loaded datasets between the
    runs it loads (keyed by the config fields that decide the dataset)."""
    rd = Path(path)
    files = RunFiles(rd)
    if not files.config.exists():
        raise FileNotFoundError(f"{rd} is not a run directory (no config.json)")
    cfg = ExperimentConfig.from_dict(json.loads(files.config.read_text()))
    key = _dataset_key(cfg)
    data, model = build(cfg, None if datasets is None else datasets.get(key))
    if datasets is not None:
        datasets[key] = data
    arch = None
    if files.model.exists():
        state = torch.load(files.model, map_location=cfg.device, weights_only=True)
        if files.architecture.exists():
            arch = json.loads(files.architecture.read_text())
    elif files.checkpoint.exists():
        ckpt = load_checkpoint(files.checkpoint)
        state, arch = ckpt["model"], ckpt.get("arch")
    else:
        raise FileNotFoundError(f"{rd} has no weights yet (no model.pt or checkpoint.pt)")
    if arch is not None and arch != architecture(model):
        resize(model, arch)
    model.load_state_dict(state)
    return cfg, model, data
