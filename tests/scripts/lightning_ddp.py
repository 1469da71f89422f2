"""Run by tests/test_integrations.py: a LightningModule trained with DormantCallback under
strategy="ddp" on CPU (or on one process); each rank writes what it saw to OUT.<rank>.json.

    python tests/scripts/lightning_ddp.py OUT DEVICES
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


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
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

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)   # only the method moves weights


def main(out: str, devices: int) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    cb = DormantCallback(method="synaptic-stripping", every_steps=1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = Net()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32),
                DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32))
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    with torch.no_grad():
        brute = (~(torch.relu(model.fc1(x[:128])) > 0).any(0)).float().mean().item()
    json.dump({"history": cb.history, "hash": hashlib.sha256(weights).hexdigest(),
               "brute": brute, "zeros": [int((model.fc1.weight[r] == 0).sum()) for r in range(32)],
               "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}},
              open(f"{out}.{trainer.global_rank}.json", "w"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
