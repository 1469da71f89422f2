"""Small real models behind a registry. Every builder takes
``(input_shape, num_classes, activation="relu", **options)``."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from ..activations import make_activation
from ..registry import Registry

__all__ = ["MODELS", "INITS", "build_model", "initialize", "MLP", "LeNet5", "SmallVGG",
           "ResNet20", "TinyViT"]

MODELS = Registry("model")
INITS = Registry("initialisation")


@INITS.register("default")
def init_default(model: nn.Module, example: torch.Tensor, activation: str) -> None:
    """PyTorch's default initialisation (what the model was built with)."""


@INITS.register("eoc")
def init_eoc(model: nn.Module, example: torch.Tensor, activation: str, sparsity: float = 0.85,
             q_star: float = 1.0, v_prime: float | None = None, head: str = "default") -> None:
    """Edge of chaos for a sparsity-inducing activation (Price et al. 2024): sets tau, m,
    sigma_w^2, sigma_b^2 (dormant.eoc.eoc_init). ReLU is shifted_relu at sparsity 0.5."""
    from .. import eoc
    kind = "shifted_relu" if activation == "relu" else activation
    if activation == "relu" and sparsity != 0.5:
        raise ValueError("eoc init with activation relu means sparsity 0.5; for other "
                         "sparsities use activation shifted_relu, soft_threshold, crelu or cst")
    eoc.eoc_init(model, kind, sparsity, q_star, v_prime, example=example, head=head) \
        if activation != "relu" else _relu_eoc(model, example, q_star)


def _relu_eoc(model: nn.Module, example: torch.Tensor, q_star: float) -> None:
    """He initialisation (sigma_w^2 = 2, sigma_b^2 = 0): ReLU's edge of chaos."""
    import math
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))][:-1]
    ms = float(example.pow(2).mean())
    with torch.no_grad():
        for i, layer in enumerate(layers):
            var = 2.0 if i else q_star / max(ms, 1e-12)
            layer.weight.normal_(0.0, math.sqrt(var / layer.weight[0].numel()))
            if layer.bias is not None:
                layer.bias.zero_()


def initialize(name: str, model: nn.Module, example: torch.Tensor, activation: str,
               **args) -> None:
    """Apply a registered initialisation (`dormant list inits`)."""
    INITS.get(name)(model, example, activation, **args)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options) -> nn.Module:
    """Build a registered model; unknown options are refused with the valid ones listed."""
    builder = MODELS.get(name)
    try:
        return builder(tuple(input_shape), num_classes, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            import inspect
            valid = [p for p in inspect.signature(builder).parameters][2:]
            raise ValueError(f"model {name!r}: {err}; valid options: {valid}") from err
        raise


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (C, H, W); this dataset gives "
                         f"{input_shape}. Use model 'mlp' or an image dataset such as fashion-mnist")
    return input_shape  # type: ignore[return-value]


class MLP(nn.Sequential):
    """flatten -> (fc_i -> act_i) x depth -> head. Sites are named act1, act2, ..."""

    def __init__(self, in_features: int, num_classes: int, widths: Sequence[int],
                 activation: str = "relu", bias: bool = True):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        prev = in_features
        for i, w in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(prev, w, bias=bias)
            layers[f"act{i}"] = make_activation(activation)
            prev = w
        layers["head"] = nn.Linear(prev, num_classes, bias=bias)
        super().__init__(layers)


@MODELS.register("mlp")
def mlp(input_shape, num_classes, activation="relu", depth: int = 2, width: int = 256,
        widths: Sequence[int] | None = None, bias: bool = True) -> MLP:
    """Fully connected ReLU-style network: `depth` hidden layers of `width` (or `widths`)."""
    widths = list(widths) if widths is not None else [width] * depth
    if not widths or min(widths) < 1:
        raise ValueError(f"mlp needs at least one hidden layer of width >= 1, got {widths}")
    return MLP(int(torch.tensor(input_shape).prod()), num_classes, widths, activation, bias)


@MODELS.register("lenet300")
def lenet300(input_shape, num_classes, activation="relu") -> MLP:
    """LeNet-300-100: 784-300-100-10 MLP (LeCun et al. 1998)."""
    return mlp(input_shape, num_classes, activation, widths=[300, 100])


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv(20,5) -> pool -> conv(50,5) -> pool -> fc(500) -> fc(classes)."""

    def __init__(self, input_shape, num_classes, activation="relu"):
        super().__init__()
        c, h, w = input_shape
        self.conv1, self.act1 = nn.Conv2d(c, 20, 5), make_activation(activation)
        self.conv2, self.act2 = nn.Conv2d(20, 50, 5), make_activation(activation)
        self.pool = nn.MaxPool2d(2)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ValueError(f"lenet5 needs inputs of at least 16x16, got {h}x{w}")
        self.fc1, self.act3 = nn.Linear(50 * fh * fw, 500), make_activation(activation)
        self.head = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool(self.act1(self.conv1(x)))
        x = self.pool(self.act2(self.conv2(x)))
        x = self.act3(self.fc1(torch.flatten(x, 1)))
        return self.head(x)


@MODELS.register("lenet5")
def lenet5(input_shape, num_classes, activation="relu") -> LeNet5:
    """Caffe LeNet-5 (20-50 conv, 500 fc), as used by NNrelief."""
    return LeNet5(_image_shape("lenet5", input_shape), num_classes, activation)


class SmallVGG(nn.Module):
    """VGG-style: [conv-BN-act] x2 -> pool, three stages, then fc -> act -> head."""

    def __init__(self, input_shape, num_classes, activation="relu", width: float = 1.0,
                 hidden: int = 256):
        super().__init__()
        c, h, w = input_shape
        chans = [max(1, int(round(k * width))) for k in (32, 64, 128)]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev = c
        for s, ch in enumerate(chans, start=1):
            for j in (1, 2):
                layers[f"conv{s}_{j}"] = nn.Conv2d(prev, ch, 3, padding=1, bias=False)
                layers[f"bn{s}_{j}"] = nn.BatchNorm2d(ch)
                layers[f"act{s}_{j}"] = make_activation(activation)
                prev = ch
            layers[f"pool{s}"] = nn.MaxPool2d(2)
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError("vgg-small needs inputs of at least 8x8")
        self.features = nn.Sequential(layers)
        self.fc = nn.Linear(prev * h * w, hidden)
        self.act_fc = make_activation(activation)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.act_fc(self.fc(torch.flatten(self.features(x), 1))))


@MODELS.register("vgg-small")
def vgg_small(input_shape, num_classes, activation="relu", width: float = 1.0,
              hidden: int = 256) -> SmallVGG:
    """Small VGG with BatchNorm: 32-32-64-64-128-128 channels (x width), fc `hidden`."""
    return SmallVGG(_image_shape("vgg-small", input_shape), num_classes, activation, width, hidden)


class BasicBlock(nn.Module):
    """torchvision-style block: one activation module used twice (after bn1 and after the sum)."""

    def __init__(self, cin, cout, stride, activation):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = make_activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 blocks, 16/32/64 channels x width."""

    def __init__(self, input_shape, num_classes, activation="relu", width: float = 1.0,
                 blocks: int = 3):
        super().__init__()
        c = input_shape[0]
        chans = [max(1, int(round(k * width))) for k in (16, 32, 64)]
        self.conv1 = nn.Conv2d(c, chans[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = make_activation(activation)
        stages, prev = [], chans[0]
        for i, ch in enumerate(chans):
            blks = [BasicBlock(prev if j == 0 else ch, ch, 2 if (i > 0 and j == 0) else 1, activation)
                    for j in range(blocks)]
            stages.append(nn.Sequential(*blks))
            prev = ch
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet20")
def resnet20(input_shape, num_classes, activation="relu", width: float = 1.0,
             blocks: int = 3) -> ResNet20:
    """CIFAR-style ResNet-20 with BasicBlocks (width multiplier, blocks per stage)."""
    return ResNet20(_image_shape("resnet20", input_shape), num_classes, activation, width, blocks)


class TransformerMlp(nn.Module):
    """timm-style MLP block; with post_act=True an activation also follows fc2 (as in the
    Synaptic Stripping code, where both linears of the block feed a ReLU)."""

    def __init__(self, dim, hidden, activation, post_act: bool, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim)
        self.act2 = make_activation(activation) if post_act else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x):                       # x: (B, T, D)
        x = self.drop(self.act(self.fc1(x)))    # (B, T, hidden)
        return self.drop(self.act2(self.fc2(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, activation, post_act, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = TransformerMlp(dim, dim * mlp_ratio, activation, post_act, dropout)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """Pre-LN vision transformer with a CLS token; MLP blocks use `activation` (ReLU by default,
    after both linears as in the Synaptic Stripping code)."""

    def __init__(self, input_shape, num_classes, activation="relu", patch: int = 7,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4,
                 post_act: bool = True, dropout: float = 0.0):
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"vit-tiny: patch {patch} must divide the image size {h}x{w}")
        tokens = (h // patch) * (w // patch)
        self.embed = nn.Conv2d(c, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio, activation, post_act,
                                                   dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)                  # (B, T, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@MODELS.register("vit-tiny")
def vit_tiny(input_shape, num_classes, activation="relu", patch: int = 7, dim: int = 64,
             depth: int = 2, heads: int = 4, mlp_ratio: int = 4, post_act: bool = True,
             dropout: float = 0.0) -> TinyViT:
    """Tiny pre-LN ViT (CLS token); ReLU after both MLP linears by default."""
    return TinyViT(_image_shape("vit-tiny", input_shape), num_classes, activation, patch, dim,
                   depth, heads, mlp_ratio, post_act, dropout)
