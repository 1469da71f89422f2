"""Every dormant method in a plain PyTorch loop with DataLoaders (no dormant Trainer).

    python examples/own_loop.py                 # all methods, ~10 s on a laptop CPU
    python examples/own_loop.py redo demp       # some of them

An MLP on a synthetic 3-class task, trained with too high a learning rate so that units die;
each method is driven through the five calls of the Method API and prints its metrics.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dormant.methods import METHODS, build

EPOCHS = 3
OPTIONS = {  # small budgets so that every method acts within 3 short epochs
    "synaptic-stripping": {"factor": 0.2},
    "redo": {"tau": 0.1},
    "imp": {"rounds": 2, "epochs_per_round": 1},
    "ap": {"rounds": 2, "epochs_per_round": 1},
    "nnrelief": {"rounds": 2, "epochs_per_round": 1, "probe_samples": 256},
    "demp": {"reg_peak": 0.05, "target": "all", "prune_every": 10},
    "structured": {"sparsity": 0.5, "prune_every": 10},
    "continual-backprop": {"replacement_rate": 0.01, "maturity_threshold": 20},
    "shrink-perturb": {"shrink": 0.8, "perturb": 0.05},
    "l2-init": {"lam": 1e-3},
}


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)
    return TensorDataset(x, y)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train()
    return correct / len(loader.dataset)


def train(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    train_loader = DataLoader(data(2048, 0), batch_size=64, shuffle=True)
    val_loader = DataLoader(data(512, 1), batch_size=256)

    method = build(name, **OPTIONS[name])
    method.prepare(model, opt, probe=val_loader, total_steps=EPOCHS * len(train_loader),
                   epochs=EPOCHS)
    for epoch in range(1, EPOCHS + 1):
        for x, y in train_loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            method.after_backward()
            opt.step()
            if method.after_step():
                pass   # units were removed: a DDP wrapper or an EMA copy would be rebuilt here
        val_acc = accuracy(model, val_loader)
        result = method.end_epoch(val_score=val_acc,
                                  evaluate=lambda m: {"val_acc": accuracy(m, val_loader)})
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
                 if not isinstance(v, dict)}
        flags = [f for f in ("model_changed", "new_round", "restored") if getattr(result, f)]
        print(f"{name} epoch {epoch}: val_acc {val_acc:.3f} {shown} {' '.join(flags)}")
    method.finalize()
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: done, {params} parameters, val_acc {accuracy(model, val_loader):.3f}")


if __name__ == "__main__":
    names = sys.argv[1:] or [n for n in METHODS.names() if n != "none"]
    for n in names:
        if n not in OPTIONS:
            sys.exit(f"unknown method {n!r}; choose from {', '.join(OPTIONS)}")
        train(n)
