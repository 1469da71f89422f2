"""The Hugging Face Trainer: `DormantTrainerCallback`, a `transformers.TrainerCallback`.

    trainer = transformers.Trainer(model, args, train_dataset=..., eval_dataset=...,
                                   callbacks=[DormantTrainerCallback(method="redo")])

At each epoch's end it probes the probe data exactly (dead fraction per site, activation
sparsity), adds the dynamic DNR of the watched training steps and the method's metrics, and
logs them through the Trainer (``state.log_history`` and every logging integration). A method
is driven through the Method API: prepared at ``on_train_begin`` with the Trainer's model,
optimizer and ``max_steps``, its gradient work before each optimizer step, its decisions after
it. Batches are dicts: the default forward call is ``model(**batch)`` (labels included, which
Hugging Face models accept). Needs ``pip install 'dormant[hf]'``.
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..batching import Forward
from ..methods import Method
from .session import Session

__all__ = ["DormantTrainerCallback"]


class DormantTrainerCallback(TrainerCallback):
    """Monitor dead units and apply a dormant method inside ``transformers.Trainer``.

    method: a `dormant.methods.Method`, a registered name, or None (monitor only); monitor:
    watch every `every`-th training step and probe exactly at each epoch's end; probe: data
    for the probe and the method's decisions (default: the Trainer's training dataloader, the
    only one it hands callbacks at train start; pass a validation loader to decide on
    validation data); forward: ``forward(model, batch)`` (default ``model(**batch)``).
    """

    def __init__(self, method: Method | str | None = None, *, monitor: bool = True,
                 every: int = 10, probe: Any = None, forward: Forward | None = None,
                 criterion: str = "never_active"):
        self.session = Session(method, monitor=monitor, every=every, criterion=criterion,
                               forward=forward, host="the Hugging Face Trainer")
        self.probe = probe
        self.history: list[dict] = []      # one row of dormant metrics per epoch
        self._pending: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       train_dataloader=None, eval_dataloader=None, **kwargs):
        # the Trainer hands callbacks no eval loader at train start: without `probe`, the
        # training loader is the probe (pass probe=... to decide on validation data)
        probe = next(p for p in (self.probe, eval_dataloader, train_dataloader) if p is not None)
        example = None
        epochs = int(args.num_train_epochs) if float(args.num_train_epochs).is_integer() else None
        self.session.start(model, optimizer, probe=probe, example=example,
                           total_steps=state.max_steps, epochs=epochs, seed=args.seed)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.session.after_backward()

    def on_step_end(self, args, state, control, **kwargs):
        self.session.after_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        metrics = {f"dormant/{k}": v for k, v in self.session.end_epoch().items()}
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
