"""DemP in a plain loop: units are driven to death on purpose and removed physically while
the model trains. When `after_step()` says the model changed, whatever holds the old
parameters is rebuilt -- here an exponential moving average of the weights.

    python examples/physical_removal.py         # ~10 s

Needs Torch-Pruning for the removal: pip install 'dormant[prune]'.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from dormant.methods import build

EPOCHS = 4


def images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    y = (x[:, 0, :6].mean((1, 2)) > x[:, 0, 6:].mean((1, 2))).long()
    return TensorDataset(x, y)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 3 * 3, 2))


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train()
    return correct / len(loader.dataset)


def main() -> None:
    torch.manual_seed(0)
    model = cnn()
    train = DataLoader(images(2048, 0), batch_size=64, shuffle=True)
    probe = DataLoader(images(512, 2), batch_size=256)     # training-like data for the death check
    val = DataLoader(images(512, 1), batch_size=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)

    demp = build("demp", reg_peak=0.02, noise_peak=1e-4, prune_every=50)
    demp.prepare(model, opt, probe=probe, total_steps=EPOCHS * len(train))
    print("widths before:", {s.name: s.num_units for s in demp.sites})
    for epoch in range(1, EPOCHS + 1):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            demp.after_backward()
            opt.step()
            if demp.after_step():          # units removed: the EMA holds the old shapes
                ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
            ema.update_parameters(model)
        result = demp.end_epoch(evaluate=lambda m: {"val_acc": accuracy(m, val)})
        if result.model_changed:           # the final removal, after the last epoch
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
        print(f"epoch {epoch}: val_acc {accuracy(model, val):.3f}, units {result['units']}, "
              f"params {result['params']} ({result['params_ratio']:.2f} of dense), "
              f"MACs {result['macs_ratio']:.2f} of dense")
    demp.finalize()
    print("widths after:", result["width"])
    print(f"EMA model: {sum(p.numel() for p in ema.module.parameters())} parameters, "
          f"val_acc {accuracy(ema.module, val):.3f}")


if __name__ == "__main__":
    main()
