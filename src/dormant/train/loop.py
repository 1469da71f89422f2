"""The training loop: batches -> loss -> step, with callbacks at fixed points."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset, Split, batches
from ..methods.base import Method
from ..registry import Registry
from ..sharding import is_fsdp
from .callbacks import MethodCallback
from .progress import progress

OPTIMIZERS = Registry("optimizer")
PRECISIONS = ("fp32", "bf16")                       # Trainer(precision=...)
MEMORY_FORMATS = ("contiguous", "channels_last")    # Trainer(memory_format=...)
# Trainer(compile=...): off, or a torch.compile mode (reduce-overhead: CUDA graphs on a GPU)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
OPTIMIZERS.register("sgd", help="SGD with momentum")(
    lambda params, lr, momentum=0.9, weight_decay=0.0: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay))
OPTIMIZERS.register("adam", help="Adam (L2 weight decay)")(
    lambda params, lr, momentum=0.9, weight_decay=0.0: torch.optim.Adam(
        params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay))
OPTIMIZERS.register("adamw", help="AdamW (decoupled weight decay)")(
    lambda params, lr, momentum=0.9, weight_decay=0.0: torch.optim.AdamW(
        params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay))


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name)(params, lr, momentum=momentum, weight_decay=weight_decay)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job, (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def synchronize(t: torch.Tensor) -> None:
    """Wait for the work queued on `t`'s device (a no-op on the CPU), so that a host timer
    measures the work itself."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode; the train flag is restored."""
    was = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=split.inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.inputs.device)
    try:
        for x, y in batches(split, batch_size):
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
    finally:
        model.train(was)
    n = max(len(split), 1)
    return loss.item() / n, correct.item() / n


def compiled(module: nn.Module, mode: str) -> nn.Module:
    """`module` through torch.compile in one of COMPILE_MODES other than "off" ("default":
    torch.compile's own default mode)."""
    return torch.compile(module, mode=None if mode == "default" else mode)


def epoch_line(m: dict, epochs: int) -> str:
    """``epoch 3/10  loss 0.412  val 87.30%  test 86.90%  dead 12.3%  2.1 s``"""
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.4f}",
             f"val {100 * m['val_acc']:.2f}%", f"test {100 * m['test_acc']:.2f}%"]
    if "dead_fraction" in m:
        parts.append(f"dead {100 * m['dead_fraction']:.1f}%")
    parts.append(f"{m['train_time']:.1f} s")
    if m.get("diverged"):
        parts.append("diverged: stopping")
    return "  ".join(parts)


class Trainer:
    """Train `model` on `data` for `epochs`; callbacks observe and act at fixed points.

    Callback order is the list order; a method (`dormant.methods.Method`) in the list is
    driven through its Method API by a `MethodCallback`. Callbacks may read the epoch, the
    step, the last loss, and the metrics of the epoch being finished.
    """

    def __init__(self, model: nn.Module, data: Dataset, optimizer: torch.optim.Optimizer, *,
                 epochs: int, batch_size: int, seed: int = 0, scheduler=None,
                 callbacks: Sequence = (), show_progress: bool = True, eval_batch_size: int = 1024,
                 epoch_log: Callable[[str], None] | None = None, precision: str = "fp32",
                 memory_format: str = "contiguous", compile: str = "off"):
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{precision!r}")
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got "
                             f"{memory_format!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got "
                             f"{compile!r}")
        # bf16: the training forward (and loss) under autocast; evaluation stays in fp32.
        # channels_last: the model's 4-d weights and every 4-d input batch in NHWC (again after
        # a physical removal), the layout oneDNN and tensor cores run fastest.
        # compile: the training forward through torch.compile in that mode, compiled again
        # for each new architecture (a physical removal); evaluation stays eager.
        self.precision, self.memory_format, self.compile = precision, memory_format, compile
        self._compiled: nn.Module | None = None
        self._removals = 0      # physical removals so far (model_changed calls)
        self.model, self.data, self.optimizer = model, data, optimizer
        self._apply_memory_format()
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.scheduler = scheduler
        self.callbacks = [MethodCallback(cb) if isinstance(cb, Method) else cb for cb in callbacks]
        self.show_progress, self.eval_batch_size = show_progress, eval_batch_size
        self.epoch_log = epoch_log      # one line per finished epoch (terminal or not)
        self.epoch = 0          # epochs completed
        self.step = 0           # optimizer steps taken
        self.metrics: dict = {}
        self.stop = False       # a callback may set this to end training after the epoch
        # under torch.distributed every rank takes its share of each global batch through a
        # DistributedDataParallel wrapper (gradients averaged); callbacks see the plain model.
        # A model sharded with FSDP2 (`dormant.sharding.shard`) averages its own gradients.
        self.rank, self.world = rank_and_world()
        self._ddp: nn.Module | None = None
        self.sharded = is_fsdp(model)

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def model_changed(self) -> None:
        """A callback removed units physically: let every callback refresh its view (and wrap
        the new parameters for DDP again)."""
        self._ddp = None
        self._compiled = None   # wrapped again around the new model (or its new DDP wrapper)
        self._removals += 1
        self._apply_memory_format()
        self._call("on_model_changed")

    def set_data(self, data: Dataset) -> None:
        """Train on `data` from now on (a new task); every callback is told."""
        self.data = data
        self._call("on_data_changed")

    def _net(self) -> nn.Module:
        """What the training step calls: the model, or its DDP wrapper on several ranks,
        compiled when `compile` asks for it."""
        net = self.model
        if self.world > 1 and not self.sharded:
            if self._ddp is None:
                self._ddp = nn.parallel.DistributedDataParallel(self.model)
            net = self._ddp
        if self.compile == "off":
            return net
        if self._compiled is None:
            self._compiled = compiled(net, self.compile)
        return self._compiled

    def _compiling(self):
        """Around the compiled forward: each physical removal gives the model new shapes and
        dynamo a new graph to compile; its recompile limit grows by 4 per removal for this
        call, so that the model is not sent back to eager after 8 widths. Dynamo's global
        settings are left as they are."""
        if self.compile == "off":
            return contextlib.nullcontext()
        limit = torch._dynamo.config.recompile_limit + 4 * self._removals
        return torch._dynamo.config.patch(recompile_limit=limit)

    def fit(self) -> list[dict]:
        """Train from `self.epoch` (0, or where a checkpoint left off) to `epochs`."""
        history = []
        self._apply_memory_format()
        self._call("on_fit_start")
        try:
            while self.epoch < self.epochs and not self.stop:
                history.append(self._run_epoch())
        finally:
            self._call("on_fit_end")
        return history

    def _run_epoch(self) -> dict:
        epoch = self.epoch + 1
        self.model.train()
        self._call("on_epoch_start", epoch)
        # the shuffle depends on (seed, epoch) only, so a resumed run sees the same batches
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n_batches = -(-len(self.data.train) // self.batch_size)
        total = torch.zeros((), dtype=torch.float64, device=self.data.train.inputs.device)
        t0 = time.perf_counter()
        bar = progress(total=n_batches, desc=f"epoch {epoch}/{self.epochs}",
                       enabled=self.show_progress)
        for i, (x, y) in enumerate(batches(self.data.train, self.batch_size, shuffle=True,
                                           generator=gen)):
            if self.world > 1:      # this rank's share of the global batch
                if len(y) < self.world:
                    continue        # a last batch smaller than the world: no rank trains on it
                x, y = x[self.rank::self.world], y[self.rank::self.world]
            loss = self.train_step(x, y)
            total += loss.detach() * len(y)
            if bar is not None and (i % 25 == 0 or i == n_batches - 1):
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.world > 1:
            torch.distributed.all_reduce(total)      # the global sum of the training loss
        synchronize(total)   # a GPU runs ahead of the host: time the work, not its queueing
        train_time = time.perf_counter() - t0
        measured = self.measure(self.model)
        self.epoch = epoch
        train_loss = total.item() / len(self.data.train)
        if not math.isfinite(train_loss):   # a diverged run is a result; more epochs are not
            self.stop = True
        self.metrics = {"epoch": epoch, "step": self.step, "train_loss": train_loss,
                        "diverged": self.stop and not math.isfinite(train_loss),
                        **measured,
                        "lr": self.optimizer.param_groups[0]["lr"], "train_time": train_time}
        self._call("on_epoch_end", epoch, self.metrics)
        if self.epoch_log is not None:
            self.epoch_log(epoch_line(self.metrics, self.epochs))
        return self.metrics

    def measure(self, model: nn.Module) -> dict:
        """Validation and test loss and accuracy of `model` (a report; nothing is decided on
        test data)."""
        val_loss, val_acc = evaluate(model, self.data.val, self.eval_batch_size)
        test_loss, test_acc = evaluate(model, self.data.test, self.eval_batch_size)
        return {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
                "test_acc": test_acc}

    def _apply_memory_format(self) -> None:
        """At fit start and after a physical removal: NHWC weights if asked, and the device
        the autocast context names (looked up here, not in every step)."""
        if self.memory_format == "channels_last":
            self.model.to(memory_format=torch.channels_last)
        p = next(self.model.parameters(), None)
        self._device_type = p.device.type if p is not None else "cpu"

    @torch.no_grad()
    def _broadcast_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank before a training
        forward, as DistributedDataParallel does; FSDP2 leaves buffers alone. One broadcast
        per dtype (the buffers flattened together)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in self.model.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = torch.cat([b.flatten() for b in group])
            torch.distributed.broadcast(flat, 0)
            for b, value in zip(group, flat.split([b.numel() for b in group])):
                b.copy_(value.view_as(b))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._call("on_step_start")
        self.optimizer.zero_grad(set_to_none=True)
        if self.sharded and self.world > 1:
            self._broadcast_buffers()
        if self.memory_format == "channels_last" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self._device_type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"), self._compiling():
            loss = F.cross_entropy(self._net()(x).float(), y)
        extra = [cb.extra_loss(self) for cb in self.callbacks]
        for e in extra:
            if e is not None:
                loss = loss + e
        loss.backward()
        self._call("on_after_backward")
        self.optimizer.step()
        self.step += 1
        self._call("on_step_end", loss)
        return loss
