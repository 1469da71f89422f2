"""A short training loop closed to edits; everything else is a callback."""
from .callbacks import (
                        Callback,
                        CheckpointCallback,
                        JsonlLogger,
                        MethodCallback,
                        MonitorCallback,
                        SessionCallback,
)
from .loop import OPTIMIZERS, Trainer, evaluate, make_optimizer

__all__ = ["Callback", "CheckpointCallback", "JsonlLogger", "MethodCallback", "MonitorCallback",
           "OPTIMIZERS", "SessionCallback", "Trainer", "evaluate", "make_optimizer"]
