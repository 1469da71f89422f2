"""A model called with dict batches (Hugging Face style), its own loss, and ReDo reviving
the units a bad initialisation killed -- in a plain loop, with an explicit forward call.

    python examples/dict_batches.py             # ~3 s

The batches hold the model's keyword inputs *and* the labels, so the probe needs
``forward=``: the default would pass the labels to the model as well.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import dormant
from dormant.methods import build


class TokenClassifier(nn.Module):
    """Embeds token ids, masks padding, a ReLU MLP block, mean-pools, classifies."""

    def __init__(self, vocab: int = 50, dim: int = 32, hidden: int = 64, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        h = h + self.fc2(self.act(self.fc1(h)))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


class Tokens(Dataset):
    """Sequences of 12 token ids; the label says whether token 7 occurs."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (n, 12), generator=g)
        self.mask = torch.ones(n, 12, dtype=torch.long)
        self.labels = (self.ids == 7).any(1).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def main() -> None:
    torch.manual_seed(0)
    model = TokenClassifier()
    with torch.no_grad():                 # a bad start: half the hidden units never fire
        model.fc1.bias[:32] = -20.0
    train = DataLoader(Tokens(2048, 0), batch_size=64, shuffle=True)
    val = DataLoader(Tokens(512, 1), batch_size=256)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    before = dormant.diagnose(model, val, forward=forward)
    print(f"before: {before.dead_units} of {before.units} hidden units dead")
    method = build("redo", tau=0.0).prepare(model, opt, probe=val, forward=forward)
    print("sites:", [f"{s.producer} -> {s.activation} -> {list(s.consumers)}" for s in method.sites])
    for epoch in range(1, 4):
        for batch in train:
            opt.zero_grad()
            F.cross_entropy(forward(model, batch), batch["labels"]).backward()
            method.after_backward()
            opt.step()
            method.after_step()
        print(f"epoch {epoch}: {dict(method.end_epoch())}")
    method.finalize()
    after = dormant.diagnose(model, val, forward=forward)
    print(f"after: {after.dead_units} of {after.units} hidden units dead")


if __name__ == "__main__":
    main()
