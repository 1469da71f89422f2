"""Named comparisons (`dormant compare --preset NAME`) and single runs (`dormant run --preset`)."""
from __future__ import annotations

from ..registry import Registry
from .compare import CompareSpec
from .config import ExperimentConfig

PRESETS = Registry("preset")


@PRESETS.register("dying-relu")
def dying_relu() -> CompareSpec:
    """MLP on MNIST-1D (offline): a normal vs a too-high learning rate; the latter kills units."""
    base = ExperimentConfig(dataset="mnist1d", model="mlp", model_args={"depth": 3, "width": 256},
                            optimizer="sgd", epochs=15, batch_size=128)
    variants = {"lr=0.02": {"lr": 0.02}, "lr=0.2": {"lr": 0.2}, "lr=0.4": {"lr": 0.4}}
    return CompareSpec(base, variants, seeds=(0, 1, 2),
                       title="Dying ReLUs: an MLP on MNIST-1D, normal vs high learning rates",
                       description="Dead = never active (output 0) on every validation sample.")


@PRESETS.register("dying-relu-fmnist")
def dying_relu_fmnist() -> CompareSpec:
    """LeNet-300-100 on Fashion-MNIST: a normal vs a too-high learning rate."""
    base = ExperimentConfig(dataset="fashion-mnist", model="lenet300", optimizer="sgd",
                            epochs=10, batch_size=128)
    return CompareSpec(base, {"lr=0.02": {"lr": 0.02}, "lr=0.3": {"lr": 0.3}}, seeds=(0, 1, 2),
                       title="Dying ReLUs: LeNet-300-100 on Fashion-MNIST, normal vs high learning rate")


@PRESETS.register("lenet300-fmnist")
def lenet300_fmnist() -> ExperimentConfig:
    """A single run: LeNet-300-100 on Fashion-MNIST, SGD 0.05, 10 epochs."""
    return ExperimentConfig(dataset="fashion-mnist", model="lenet300", lr=0.05, epochs=10)
