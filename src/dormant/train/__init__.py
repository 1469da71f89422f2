"""A short training loop closed to edits; everything else is a callback."""
from .callbacks import Callback, CheckpointCallback, JsonlLogger, MethodCallback, MonitorCallback
from .loop import Trainer, evaluate, make_optimizer, OPTIMIZERS

__all__ = ["Callback", "CheckpointCallback", "JsonlLogger", "MethodCallback", "MonitorCallback", "Trainer",
           "evaluate", "make_optimizer", "OPTIMIZERS"]
