"""Run by tests/test_integrations.py: a LightningModule trained with DormantCallback under
strategy="ddp" on CPU (or on one process), or with FSDP2 (Lightning's ModelParallelStrategy,
`fully_shard` in `configure_model`); each rank writes what it saw to OUT.<rank>.json.

    python tests/scripts/lightning_ddp.py OUT DEVICES [ddp|fsdp]
"""
import hashlib
import json
import sys

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dormant.integrations.lightning import DormantCallback
from dormant.sharding import close_group


class Net(L.LightningModule):
    def __init__(self, shard: bool = False, lr: float = 0.0):
        super().__init__()
        self.shard, self.lr = shard, lr
        self.fc1, self.act, self.fc2 = nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)
        with torch.no_grad():
            self.fc1.bias[:6] = -1e3      # six units dead from the start

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, i):
        pass

    def configure_model(self):            # ModelParallelStrategy: FSDP2 over the ranks
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.fc1, mesh=mesh)
        fully_shard(self.fc2, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self):         # lr 0 (the default): only the method moves weights
        if self.lr == 0:
            return torch.optim.SGD(self.parameters(), lr=0.0)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out: str, devices: int, strategy: str) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    cb = DormantCallback(method="synaptic-stripping", every_steps=1)
    model = Net(shard=strategy == "fsdp")
    if strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    elif devices == 1:
        strategy = "auto"
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=devices,
                        strategy=strategy, logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32),
                DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32))
    for m in model.modules():             # FSDP2: the parameters back in their shards
        if hasattr(m, "reshard"):
            m.reshard()
    params = {n: whole(p.detach()) for n, p in model.named_parameters()}
    weights = b"".join(p.numpy().tobytes() for p in params.values())
    w1, b1 = params["fc1.weight"], params["fc1.bias"]
    with torch.no_grad():
        brute = (~(torch.relu(x[:128] @ w1.t() + b1) > 0).any(0)).float().mean().item()
    json.dump({"history": cb.history, "hash": hashlib.sha256(weights).hexdigest(),
               "brute": brute, "zeros": [int((w1[r] == 0).sum()) for r in range(32)],
               "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}},
              open(f"{out}.{trainer.global_rank}.json", "w"))
    close_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ddp")
