"""Callbacks: the monitor, checkpoints, metrics logging. Methods are callbacks too."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..jsonl import read_jsonl, write_jsonl
from ..methods.base import Method
from ..monitor import _every_steps
from ..session import Session
from ..sharding import full_state, is_fsdp, load_full_state
from ..sites import Site, _unwrap
from ..surgery import architecture, resize


class Callback:
    """Override what you need. Hooks run in list order; `trainer` gives model, optimizer,
    data, epoch, step and the metrics of the epoch being finished."""

    def on_fit_start(self, trainer) -> None: ...
    def on_epoch_start(self, trainer, epoch: int) -> None: ...
    def on_step_start(self, trainer) -> None: ...
    def extra_loss(self, trainer) -> torch.Tensor | None: return None
    def on_after_backward(self, trainer) -> None: ...
    def on_step_end(self, trainer, loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None: ...
    def on_fit_end(self, trainer) -> None: ...
    def on_model_changed(self, trainer) -> None:
        """Units were removed physically (surgery): sites and sizes changed."""
    def on_data_changed(self, trainer) -> None:
        """`trainer.data` is another task (continual learning)."""
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


class SessionCallback(Callback):
    """The Trainer's adapter of a `dormant.session.Session`: maps the loop's events to the
    session's calls. The session's probe is the Trainer's `probe_split` (validation), the
    method's probe its own ``probe`` option's split, the test split's sparsity is measured
    after the last epoch, and the run's length is the Trainer's. A model the method changed
    after the epoch was measured (best epoch restored, final removal) is measured again on
    validation and test data by the Trainer (`Trainer.measure`), not by the method.

    Adds to the epoch metrics (docs/metrics.md):
      dynamic_dnr, dnr/<site>  -- zero-output rate on training batches (watched steps)
      dead_fraction, dead_units, dead/<site> -- never-active units on the probe split,
                                  exact, eval mode
      sparsity/<site>, sparsity -- exact-zero rate on the probe split (per site, mean)
      test_sparsity            -- the same on the test split, after the last epoch only
                                  (a measurement; nothing is decided on test data)
      erank/<site>, stable_rank/<site>, approx_rank[_sq]/<site>, fau/<site>,
      feature_norm/<site>, dormant_<tau>/<site>, weight_magnitude
                               -- plasticity metrics on the first 1024 probe samples
      grad_norm                -- mean global gradient L2 norm over the watched steps
      distance_from_init       -- ||theta - theta_0||_2 over the parameters that still have
                                  their initial shape (a physical removal changes the others)
    and the method's own metrics.
    """

    def __init__(self, session: Session, probe_split: str = "val"):
        self.session, self.probe_split = session, probe_split
        self._told = False       # the session changed the model and re-found its sites

    @property
    def method(self) -> Method | None:
        return self.session.method

    def _splits(self, data) -> dict:
        m = self.session.method
        return {"probe": data.split(self.probe_split),
                "method_probe": data.split(m.opts.probe) if m is not None else None}

    def on_fit_start(self, trainer) -> None:
        data = trainer.data
        if self.method is not None:      # the Trainer's counters (a resumed run)
            self.method.step, self.method.epoch = trainer.step, trainer.epoch
        per_epoch = -(-len(data.train) // trainer.batch_size)
        self.session.start(trainer.model, trainer.optimizer, **self._splits(data),
                           example=data.train.inputs[:2], test=data.test,
                           total_steps=trainer.epochs * per_epoch, epochs=trainer.epochs,
                           seed=trainer.seed, step=trainer.step)

    def on_after_backward(self, trainer) -> None:
        self.session.after_backward()

    def on_data_changed(self, trainer) -> None:
        self.session.set_probe(**self._splits(trainer.data), test=trainer.data.test)

    def on_step_end(self, trainer, loss) -> None:
        if self.session.after_step():
            self._tell(trainer)

    def _tell(self, trainer) -> None:
        """The session re-found its sites already: tell the other callbacks only."""
        self._told = True
        try:
            trainer.model_changed()
        finally:
            self._told = False

    def on_model_changed(self, trainer) -> None:
        if not self._told:        # another callback changed the model
            self.session.model_changed()

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        before = {k: metrics[k] for k in ("val_acc", "test_acc")}
        result = self.session.end_epoch(
            val_score=metrics["val_acc"], evaluate=trainer.measure,
            final=epoch == trainer.epochs or trainer.stop, diverged=bool(metrics.get("diverged")))
        if result.restored:     # the epoch's own accuracy, before the best one came back
            metrics["last_test_acc"], metrics["last_val_acc"] = before["test_acc"], before["val_acc"]
        metrics.update(result)
        if result.model_changed:
            self._tell(trainer)

    def on_fit_end(self, trainer) -> None:
        self.session.close()

    def state_dict(self) -> dict:
        return self.session.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if set(state) == {"initial"}:    # a MonitorCallback's, before the Session
            state = {"method": None, "monitor": None, **state}
        self.session.load_state_dict(state)


def MonitorCallback(sites: Sequence[Site] | None = None, *, every_steps: int | None = None,
                    eps: float = 0.0, probe_split: str = "val",
                    criterion: str = "never_active", every: int | None = None) -> SessionCallback:
    """Watch and measure, no method: a `SessionCallback` over ``Session(None, ...)``."""
    every_steps = _every_steps("MonitorCallback", every, every_steps, 10)
    return SessionCallback(Session(None, sites=sites, every_steps=every_steps, eps=eps,
                                   criterion=criterion), probe_split)


def MethodCallback(method: Method) -> SessionCallback:
    """Drive a method, measure nothing more (what ``Trainer(callbacks=[method])`` makes): a
    `SessionCallback` over ``Session(method, monitor=False)``."""
    return SessionCallback(Session(method, monitor=False))


class TaskCallback(Callback):
    """Continual learning: a new task every `schedule.epochs_per_task` epochs, made from the
    base dataset (`dormant.data.tasks`); each epoch's metrics carry its ``task``."""

    def __init__(self, schedule, base):
        self.schedule, self.base = schedule, base
        self.task = -1

    def _switch(self, trainer, epoch: int) -> None:
        task = self.schedule.task_of(epoch)
        if task != self.task:
            self.task = task
            trainer.set_data(self.schedule.make(self.base, task))

    def on_fit_start(self, trainer) -> None:
        self._switch(trainer, trainer.epoch + 1)      # a resumed run starts in its task

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self._switch(trainer, epoch)

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        metrics["task"] = self.task


class JsonlLogger(Callback):
    """Appends each epoch's metrics as one JSON line, and keeps them: the history travels in
    the checkpoint (`state_dict`), so a resumed run rewrites the file from it (`restore`)
    whatever happened to the file (torn, truncated, deleted)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        self.rows.append(json.loads(json.dumps(metrics)))    # as the file holds it
        if trainer.rank != 0:     # one writer: rank 0
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def state_dict(self) -> dict:
        return {"rows": json.dumps(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = json.loads(state["rows"]) if "rows" in state else None

    def restore(self, epoch: int) -> None:
        """After a resume at `epoch`: the file holds exactly epochs 1..epoch, from the
        checkpoint's history (a checkpoint from before histories were kept: from the file,
        refused when an epoch is missing)."""
        rows = self.rows
        if rows is None:
            rows = read_jsonl(self.path, upto_epoch=epoch)
        if [r.get("epoch") for r in rows] != list(range(1, epoch + 1)):
            raise CorruptCheckpointError(
                f"{self.path} lacks epochs of the run (it has {[r.get('epoch') for r in rows]}, "
                f"the checkpoint is at epoch {epoch}) and the checkpoint holds no history to "
                "rebuild it from: delete the run directory to train it again")
        self.rows = [r for r in rows if r["epoch"] <= epoch]
        write_jsonl(self.path, self.rows)


CHECKPOINT_FORMAT = "dormant-checkpoint/1"


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read, fails its checksum, or is not dormant's."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Save `state` with a SHA-256 of its bytes, atomically (write, then rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    wrapped = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(wrapped, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:   # disk full: torch's writer raises RuntimeError
        tmp.unlink(missing_ok=True)
        line = "".join(str(err).splitlines()[:1])[:160]
        raise OSError(f"{path}: could not write the checkpoint ({line}): free some space and "
                      "run the same command again; the run resumes from its last complete "
                      "checkpoint") from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's state, its checksum verified (no code in it runs: weights_only)."""
    fix = (f"delete {path} to train the run again from its start (an older copy can take its "
           "place), or remove the whole run directory")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:      # truncated, not a torch file, unsafe pickle, ...
        raise CorruptCheckpointError(f"{path} cannot be read ({type(err).__name__}: "
                                     f"{''.join(str(err).splitlines()[:1])[:200]}); {fix}") from None
    if isinstance(outer, dict) and outer.get("format") == CHECKPOINT_FORMAT:
        payload = outer["payload"].numpy().tobytes()
        if hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
            raise CorruptCheckpointError(f"{path} fails its checksum (the file was altered or "
                                         f"damaged on disk); {fix}")
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if not isinstance(outer, dict) or not {"model", "epoch", "step"} <= set(outer):
        raise CorruptCheckpointError(f"{path} is not a dormant checkpoint; {fix}")
    return outer     # written before checksums were recorded


class CheckpointCallback(Callback):
    """Saves model, optimizer, scheduler, counters, the stop flag, callback states and the CPU
    and CUDA random states after every epoch (atomically, with a checksum), so an interrupted run resumes where it
    stopped; a damaged or foreign checkpoint is refused with what to do."""

    def __init__(self, path: str | os.PathLike, identity: str | None = None):
        self.path = Path(path)
        self.identity = identity     # the run it belongs to (a config's label): checked on load

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        sharded = is_fsdp(trainer.model)
        if sharded:               # every rank gathers its shards; rank 0 writes whole tensors
            model, optimizer = full_state(trainer.model, trainer.optimizer)
        callbacks = ({key: cb.state_dict() for key, cb in _keyed(trainer.callbacks)}
                     if sharded or trainer.rank == 0 else None)
        if trainer.rank != 0:     # one writer: rank 0
            return
        if not sharded:
            model, optimizer = trainer.model.state_dict(), trainer.optimizer.state_dict()
        state = {
            "identity": self.identity,
            "epoch": trainer.epoch, "step": trainer.step, "stop": trainer.stop,
            "arch": architecture(trainer.model), "sharded": sharded,
            "model": model, "optimizer": optimizer,
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
            "callbacks": callbacks,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }
        save_checkpoint(state, self.path)

    def restore(self, trainer) -> bool:
        """Load the checkpoint into `trainer` if there is one; True when resumed."""
        if not self.path.exists():
            return False
        state = load_checkpoint(self.path)
        saved = state.get("identity")
        if self.identity is not None and saved is not None and saved != self.identity:
            raise CorruptCheckpointError(
                f"{self.path} belongs to run {saved}, not to {self.identity} (copied or moved "
                "here?): move it back to its own run directory, or delete it to train this run "
                "from its start")
        if state.get("arch") and state["arch"] != architecture(trainer.model):
            _resize_with_optimizer(trainer.model, state["arch"], trainer.optimizer)
        if bool(state.get("sharded")) != is_fsdp(trainer.model):
            raise CorruptCheckpointError(
                f"{self.path} was written by a run {'with' if state.get('sharded') else 'without'}"
                f" --fsdp (its optimizer state is laid out for it): resume it "
                f"{'with' if state.get('sharded') else 'without'} --fsdp, or delete it to train "
                "the run again from its start")
        try:
            if state.get("sharded"):
                load_full_state(trainer.model, trainer.optimizer, state["model"],
                                state["optimizer"])
            else:
                trainer.model.load_state_dict(state["model"])
                trainer.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CorruptCheckpointError(
                f"{self.path} belongs to another model or optimizer ({str(err)[:200]}); delete "
                "it to train the run again from its start") from None
        if trainer.scheduler is not None and state["scheduler"] is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        saved = state["callbacks"]
        if isinstance(saved, list):          # positional, before states were keyed
            saved = _keyed_from_list(trainer.callbacks, saved)
        for key, cb in _keyed(trainer.callbacks):
            if key in saved:    # a callback without one (TensorBoard added) keeps its own
                cb.load_state_dict(saved[key])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])    # DemP's noise, dropout on a GPU
        trainer.epoch, trainer.step = int(state["epoch"]), int(state["step"])
        trainer.stop = bool(state.get("stop", False))   # a diverged run stays stopped
        return True


def _keyed(callbacks) -> list[tuple[str, Callback]]:
    """Each callback with a stable key: its class name and its rank among callbacks of that
    class (``SessionCallback#0``), so that a callback present on one rank only (TensorBoard
    on rank 0) or added on resume shifts no other's state."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        name = type(cb).__name__
        out.append((f"{name}#{seen.get(name, 0)}", cb))
        seen[name] = seen.get(name, 0) + 1
    return out


def _keyed_from_list(callbacks, states: list) -> dict:
    """A checkpoint of an older dormant (states by position; the monitor and the method were
    two callbacks, `{"initial": ...}` then the method's state) as keyed states."""
    states, out = list(states), {}
    for key, cb in _keyed(callbacks):
        if not states:
            break
        state = states.pop(0)
        if isinstance(cb, SessionCallback) and isinstance(state, dict) and \
                set(state) == {"initial"} and cb.method is not None and states:
            state = {"method": states.pop(0), "monitor": None, **state}
        elif isinstance(cb, SessionCallback) and cb.method is not None and \
                isinstance(state, dict) and "method" not in state:
            state = {"method": state, "monitor": None, "initial": {}}   # Trainer([method])
        out[key] = state
    return out


def _resize_with_optimizer(model, arch, optimizer) -> None:
    """Give a freshly built model a compacted architecture and point the optimizer at its new
    parameters (their state comes from the checkpoint right after)."""
    model = _unwrap(model)
    names = {id(p): n for n, p in model.named_parameters()}
    resize(model, arch)
    new = dict(model.named_parameters())
    for g in optimizer.param_groups:
        g["params"] = [new[names[id(p)]] for p in g["params"]]
    optimizer.state.clear()
