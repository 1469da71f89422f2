"""Run by tests/test_integrations.py: a LightningModule sharded with FSDP2 (Lightning's
ModelParallelStrategy, `fully_shard` in `configure_model`) trained with DormantCallback on 2
CPU ranks, keeping a checkpoint of every epoch; rank 0 prints a digest of the whole weights and the
last epoch's distance from the initial weights.

    python tests/scripts/lightning_fsdp_resume.py CKPT_DIR EPOCHS METHOD [RESUME_FROM]
"""
import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from dormant.integrations.lightning import DormantCallback
from dormant.sharding import close_group

sys.path.insert(0, str(Path(__file__).parent))
from lightning_ddp import Net  # noqa: E402  (the same module, sharded, trained with Adam)


def main(ckpt_dir: str, epochs: int, method: str, resume: str | None) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    cb = DormantCallback(method=method, every_steps=1)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1)   # every epoch
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=2, logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=2,
                                                       tensor_parallel_size=1),
                        callbacks=[cb, ckpt], enable_progress_bar=False,
                        enable_model_summary=False)
    model = Net(shard=True, lr=0.01)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32),
                DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32), ckpt_path=resume)
    for m in model.modules():             # the parameters back in their shards
        if hasattr(m, "reshard"):
            m.reshard()
    whole = b"".join(p.detach().full_tensor().numpy().tobytes() for p in model.parameters())
    if trainer.global_rank == 0:
        print("RESULT", json.dumps({"hash": hashlib.sha256(whole).hexdigest(),
                                    "last": cb.history[-1]}))
    close_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
