"""Lightning: `DormantCallback`, a `lightning.pytorch.Callback`.

    trainer = lightning.Trainer(max_epochs=10, callbacks=[DormantCallback(method="synaptic-stripping")])

At each training epoch's end it logs, through the LightningModule's logger, the metrics of a
`dormant.session.Session` -- the same keys as `dormant run` and the HF callback: the dynamic
DNR and gradient norm of the watched steps; from one exact pass over the probe data (the first
validation dataloader by default) the dead fraction, activation sparsity and plasticity
metrics per site; the distance from the initial weights; the test data's sparsity after the
last epoch when ``test=`` is given; and the method's metrics. A method is driven through
the Method API (prepared at train start with the first optimizer and the estimated number of
steps). Under ``strategy="ddp"`` every statistic is all-reduced before a decision, so every
rank takes the same one; a method that draws random numbers (ReDo) needs the same seed on
every rank (``lightning.seed_everything``). Under FSDP2 (``ModelParallelStrategy`` with
``fully_shard`` in ``configure_model``) the methods that act on shards (every one but DemP and
structured) edit each rank's rows. Physical removal (DemP, structured) is refused:
Lightning holds the parameters in its strategy's wrappers. The method's and the monitor's
state travel in Lightning's own checkpoints (the callback's ``state_dict``), so
``trainer.fit(..., ckpt_path=...)`` resumes a run that equals a straight one. Needs
``pip install lightning``.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..batching import Forward
from ..methods import Method
from ..monitor import _every_steps
from ..session import Session, numbers

__all__ = ["DormantCallback"]


class DormantCallback(pl.Callback):
    """Monitor dead units and apply a dormant method inside ``lightning.Trainer``.

    method: a `dormant.methods.Method`, a registered name, or None (monitor only); monitor:
    watch every `every_steps`-th training step and measure exactly at each epoch's end;
    probe: data for the measurement and the method's decisions (default: the first
    validation dataloader, else the training one); test: data whose activation sparsity is
    measured after the last epoch; plasticity: the plasticity metrics too; forward:
    ``forward(module, batch)`` (default ``module(batch[0])`` for a tuple, ``module(**batch)``
    for a dict).
    """

    def __init__(self, method: Method | str | None = None, *, monitor: bool = True,
                 every_steps: int | None = None, probe: Any = None, test: Any = None,
                 forward: Forward | None = None, criterion: str = "never_active",
                 plasticity: bool = True, every: int | None = None):
        every_steps = _every_steps("DormantCallback", every, every_steps, 10)
        self.session = Session(method, monitor=monitor, every_steps=every_steps,
                               criterion=criterion, forward=forward, plasticity=plasticity,
                               host="Lightning")
        self.probe, self.test = probe, test
        self.history: list[dict] = []
        self._steps = 0

    def _probe(self, trainer) -> Any:
        if self.probe is not None:
            return self.probe
        val = trainer.val_dataloaders
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        return val if val is not None else trainer.train_dataloader

    def on_train_start(self, trainer, pl_module) -> None:
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self._steps = trainer.global_step
        self.session.start(pl_module, trainer.optimizers[0], probe=self._probe(trainer),
                           test=self.test, total_steps=int(trainer.estimated_stepping_batches),
                           epochs=epochs, seed=0, step=trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # once per optimizer step (not per accumulated batch), on unscaled gradients
        self.session.after_backward()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._steps:      # an optimizer step was taken
            self._steps = trainer.global_step
            self.session.after_step()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = numbers(self.session.end_epoch(final=_last_epoch(trainer)), "dormant/")
        self.history.append({"epoch": trainer.current_epoch, **metrics})
        pl_module.log_dict(metrics, on_epoch=True, on_step=False, sync_dist=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self.session.close()

    def state_dict(self) -> dict:
        return {"session": self.session.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning when a fit resumes from a checkpoint, before training starts
        (`on_train_start` applies it)."""
        self.session.load_state_dict(state["session"])
        self.history = list(state["history"])


def _last_epoch(trainer) -> bool:
    """This epoch ends the fit: its epoch or step budget is spent, or it was told to stop."""
    epochs, steps = trainer.max_epochs or -1, trainer.max_steps or -1
    return bool((epochs > 0 and trainer.current_epoch + 1 >= epochs)
                or (steps > 0 and trainer.global_step >= steps) or trainer.should_stop)
