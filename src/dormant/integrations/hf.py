"""The Hugging Face Trainer: `DormantTrainerCallback`, a `transformers.TrainerCallback`.

    trainer = transformers.Trainer(model, args, train_dataset=..., eval_dataset=...,
                                   callbacks=[DormantTrainerCallback(method="redo")])

At each epoch's end it logs the metrics of a `dormant.session.Session` -- the same keys as
`dormant run` and the Lightning callback: the dynamic DNR and gradient norm of the watched
steps; from one exact pass over the probe data the dead fraction, activation sparsity and
plasticity metrics per site; the distance from the initial weights; the test data's sparsity
after the last epoch when ``test=`` is given; and the method's metrics -- through the Trainer
(``state.log_history`` and every logging integration). A method
is driven through the Method API: prepared at ``on_train_begin`` with the Trainer's model,
optimizer and ``max_steps``, its gradient work before each optimizer step, its decisions after
it. Batches are dicts: the default forward call is ``model(**batch)`` (labels included, which
Hugging Face models accept). With every Trainer checkpoint it saves the method's and the
monitor's state (``dormant.pt`` in the ``checkpoint-<step>`` folder), and
``trainer.train(resume_from_checkpoint=...)`` restores it, so a resumed run equals a straight
one. Needs ``pip install 'dormant[hf]'``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..batching import Forward
from ..methods import Method
from ..monitor import _every_steps
from ..session import SESSION_FORMAT, Session, numbers

__all__ = ["DormantTrainerCallback"]


class DormantTrainerCallback(TrainerCallback):
    """Monitor dead units and apply a dormant method inside ``transformers.Trainer``.

    method: a `dormant.methods.Method`, a registered name, or None (monitor only); monitor:
    watch every `every_steps`-th training step and measure exactly at each epoch's end;
    probe: data for the measurement and the method's decisions (default: the Trainer's
    training dataloader, the only one it hands callbacks at train start; pass a validation
    loader to decide on validation data); test: data whose activation sparsity is measured
    after the last epoch; plasticity: the plasticity metrics too; forward:
    ``forward(model, batch)`` (default ``model(**batch)``);
    resume_from: the checkpoint folder a resumed ``train()`` starts from, when it is not
    ``<output_dir>/checkpoint-<step>`` (where the Trainer writes them).
    """

    STATE = "dormant.pt"

    def __init__(self, method: Method | str | None = None, *, monitor: bool = True,
                 every_steps: int | None = None, probe: Any = None, test: Any = None,
                 forward: Forward | None = None, criterion: str = "never_active",
                 plasticity: bool = True, resume_from: str | os.PathLike | None = None,
                 every: int | None = None):
        every_steps = _every_steps("DormantTrainerCallback", every, every_steps, 10)
        self.session = Session(method, monitor=monitor, every_steps=every_steps,
                               criterion=criterion, forward=forward, plasticity=plasticity,
                               host="the Hugging Face Trainer")
        self.probe, self.test = probe, test
        self.resume_from = resume_from
        self.history: list[dict] = []      # one row of dormant metrics per epoch
        self._pending: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       train_dataloader=None, eval_dataloader=None, **kwargs):
        # the Trainer hands callbacks no eval loader at train start: without `probe`, the
        # training loader is the probe (pass probe=... to decide on validation data)
        probe = next(p for p in (self.probe, eval_dataloader, train_dataloader) if p is not None)
        example = None
        if state.global_step > 0:           # train(resume_from_checkpoint=...)
            self._restore(args, state)
        epochs = int(args.num_train_epochs) if float(args.num_train_epochs).is_integer() else None
        self.session.start(model, optimizer, probe=probe, example=example, test=self.test,
                           total_steps=state.max_steps, epochs=epochs, seed=args.seed,
                           step=state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.session.after_backward()

    def on_step_end(self, args, state, control, **kwargs):
        self.session.after_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        final = state.max_steps > 0 and state.global_step >= state.max_steps
        metrics = numbers(self.session.end_epoch(final=final), "dormant/")
        self.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
        state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        self._pending = metrics
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            logs.update(self._pending)      # later logging callbacks see them too
            self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        self.session.close()

    def on_save(self, args, state, control, **kwargs):
        """The Trainer has written ``checkpoint-<step>``: the dormant state goes with it
        (gathered on every rank under FSDP2, written by the first)."""
        session = self.session.state_dict()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / (self.STATE + ".tmp")
            torch.save({"format": SESSION_FORMAT, "session": session,
                        "history": self.history}, tmp)
            os.replace(tmp, folder / self.STATE)

    def _restore(self, args, state) -> None:
        folder = Path(self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}")
        path = folder / self.STATE
        if not path.exists():
            raise FileNotFoundError(
                f"dormant: resuming at step {state.global_step}, but {path} does not exist, so "
                "the method's state (masks, counters) would be lost: pass "
                "DormantTrainerCallback(..., resume_from=<the checkpoint folder>), or start the "
                "run afresh")
        fix = "delete the checkpoint folder, or resume from another one"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"dormant: {path} cannot be read ({type(err).__name__}: "
                             f"{str(err)[:200]}): {fix}") from None
        if not isinstance(saved, dict) or saved.get("format") != SESSION_FORMAT:
            raise ValueError(f"dormant: {path} is not a dormant state: {fix}")
        self.session.load_state_dict(saved["session"])
        self.history = list(saved["history"])
