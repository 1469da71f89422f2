"""Architectures that site discovery must get right, and a brute-force reference."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from dormant.models import build_model
from dormant.sites import _ACT_FUNCTIONS, _ACT_METHODS, _Tracer, act_module_kind


class ConvBN(nn.Module):
    """Conv -> BN -> ReLU twice, then flatten -> Linear -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 12)
        self.act = nn.ReLU()
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(self.act(self.fc(torch.flatten(self.features(x), 1))))


class Functional(nn.Module):
    """F.relu, torch.relu and Tensor.relu; a functional ReLU on a residual sum."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = (nn.Linear(8, 10), nn.Linear(10, 10),
                                                   nn.Linear(10, 10), nn.Linear(10, 3))
        self.ln = nn.LayerNorm(10)

    def forward(self, x):
        h = F.relu(self.fc1(x))              # observed at fc2's input
        r = torch.relu(self.ln(self.fc2(h)) + h)  # residual, observed at fc3's input
        z = self.fc3(r).relu()               # Tensor.relu, observed at head's input
        return self.head(z)


class ReusedRelu(nn.Module):
    """torchvision BasicBlock pattern: one ReLU module called at two places."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + x)
        return self.head(out.mean((2, 3)))


class TimmMlp(nn.Module):
    def __init__(self, dim=8, hidden=16, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Tokens(nn.Module):
    """timm-style pre-norm residual MLP blocks on (B, T, D) tokens."""

    def __init__(self, act=nn.GELU):
        super().__init__()
        self.norm1, self.mlp1 = nn.LayerNorm(8), TimmMlp(act=act)
        self.norm2, self.mlp2 = nn.LayerNorm(8), TimmMlp(act=nn.ReLU)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x + self.mlp1(self.norm1(x))
        x = x + self.mlp2(self.norm2(x))
        return self.head(x.mean(1))


class Recompute(nn.Module):
    """A functional activation whose output no module reads: observed by recomputing it on
    the output of the module that feeds it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return F.relu(self.fc(x)).sum(1, keepdim=True) * 2


def mlp_seq():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


# name -> (constructor, input shape without batch)
ZOO = {
    "sequential-mlp": (mlp_seq, (3, 4)),
    "conv-bn-relu-flatten": (ConvBN, (1, 8, 8)),
    "functional": (Functional, (8,)),
    "reused-relu-residual": (ReusedRelu, (4, 6, 6)),
    "timm-mlp-tokens": (Tokens, (5, 8)),
    "tanh-sigmoid-silu": (lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 7),
                                                nn.Sigmoid(), nn.Linear(7, 7), nn.SiLU(),
                                                nn.Linear(7, 2)), (6,)),
    "recompute": (Recompute, (6,)),
    "resnet20": (lambda: build_model("resnet20", (1, 12, 12), 3, width=0.25, blocks=1), (1, 12, 12)),
    "vit-tiny": (lambda: build_model("vit-tiny", (1, 8, 8), 3, patch=4, dim=16, depth=1,
                                     heads=2, mlp_ratio=2), (1, 8, 8)),
}


def kill_some(model: nn.Module, every: int = 3) -> None:
    """Give every `every`-th unit a huge negative offset so it is dead (ReLU) on any input."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.bias[::every] = -1e4
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias[::every] = -1e4


def _is_activation(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return ((n.op == "call_module" and act_module_kind(modules[n.target]) is not None)
            or (n.op == "call_function" and n.target in _ACT_FUNCTIONS)
            or (n.op == "call_method" and n.target in _ACT_METHODS))


def activation_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Brute force: every activation node's output, in graph order, from an fx Interpreter
    (no hooks involved)."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    modules = dict(model.named_modules())
    outs: list[torch.Tensor] = []

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if _is_activation(n, modules):
                outs.append(out.detach().clone())
            return out

    with torch.no_grad():
        Capture(gm).run(x)
    return outs


def reduce_dims(y: torch.Tensor, unit_dim: int) -> tuple[int, ...]:
    d = unit_dim % y.ndim
    return tuple(i for i in range(y.ndim) if i != d)
