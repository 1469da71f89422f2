"""TensorBoard: dead fraction per site, dynamic DNR and activation sparsity as scalars, and
per-unit activity (the fraction of probe outputs each unit is active on) as histograms.

    logger = TensorBoardLogger("tb/run1")
    logger.log_metrics(metrics, step=epoch)       # any dict of numbers (a Session's, a run's)
    logger.log_activity(model, probe_data, step=epoch)
    logger.close()

`TensorBoardCallback` does this for the built-in Trainer (``dormant run/compare
--tensorboard DIR``). Needs the ``tensorboard`` package (``pip install 'dormant[tb]'``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch.nn as nn

from ..diagnose import probe as probe_pass
from ..monitor import ActivityMonitor
from ..session import Session
from ..train.callbacks import Callback

__all__ = ["TensorBoardCallback", "TensorBoardLogger"]


class TensorBoardLogger:
    """Writes dormant's metrics and per-unit activity to a TensorBoard log directory."""

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Every number of `metrics` as a scalar (``dead/<site>`` stays grouped by prefix)."""
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_activity(self, model: nn.Module, data: Any, step: int, *, sites=None,
                     eps: float = 0.0, forward=None) -> None:
        """Histogram per site of the units' active rates on `data` (0 = never active)."""
        self.log_pass(probe_pass(model, data, sites=sites, eps=eps, forward=forward), step)

    def log_pass(self, mon: ActivityMonitor, step: int) -> None:
        """Histogram per site of the units' active rates in a probe pass already made (a
        `Session`'s epoch-end pass, `Session.last`)."""
        for name, stats in mon.stats().items():
            self.writer.add_histogram(f"activity/{name}", stats.active_rate.float().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TensorBoardCallback(Callback):
    """For the built-in Trainer: each epoch's metrics as scalars, and the activity histogram
    of every site on the validation split: from `session`'s epoch-end pass when given (no
    pass of its own; put it after the session's callback), else from a pass of its own."""

    def __init__(self, log_dir: str | os.PathLike, session: Session | None = None):
        self.log_dir, self.session = log_dir, session
        self.logger: TensorBoardLogger | None = None

    def on_fit_start(self, trainer) -> None:
        self.logger = TensorBoardLogger(self.log_dir)

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        self.logger.log_metrics(metrics, epoch)
        if metrics.get("diverged"):
            return
        if self.session is not None and self.session.last is not None:
            self.logger.log_pass(self.session.last, epoch)
        else:
            self.logger.log_activity(trainer.model, trainer.data.val, epoch)

    def on_fit_end(self, trainer) -> None:
        if self.logger is not None:
            self.logger.close()
