"""Named comparisons (`dormant compare --preset NAME`) and single runs (`dormant run --preset`)."""
from __future__ import annotations

from ..registry import Registry
from .compare import CompareSpec
from .config import ExperimentConfig

PRESETS = Registry("preset")


@PRESETS.register("dying-relu")
def dying_relu() -> CompareSpec:
    """MLP on MNIST-1D (offline): too-high learning rates kill units; Synaptic Stripping
    brings them back (the `make demo` comparison, about a minute on 2 cores)."""
    base = ExperimentConfig(dataset="mnist1d", model="mlp", model_args={"depth": 3, "width": 256},
                            optimizer="sgd", epochs=15, batch_size=128)
    adam = {"optimizer": "adam", "lr": 0.01, "schedule": "cosine",
            "schedule_args": {"warmup": 1, "final": 0.01}}
    variants = {"SGD lr=0.02": {"lr": 0.02}, "SGD lr=0.4": {"lr": 0.4},
                "Adam lr=0.01": adam,
                "Adam lr=0.01 + stripping": {**adam, "method": "synaptic-stripping",
                                             "method_args": {"every_steps": 20}}}
    return CompareSpec(base, variants, seeds=(0, 1, 2),
                       title="Dying ReLUs on MNIST-1D, and Synaptic Stripping reviving them",
                       description="Dead = never active (output 0) on every validation sample. "
                                   "Stripping prunes the 5% most negative incoming weights of "
                                   "each dead unit every 20 steps.")


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


# the methods of the loss-of-plasticity comparison (the preset and reproduce/plasticity.py)
PLASTICITY_METHODS = {
    "backprop": {},
    "Synaptic Stripping": {"method": "synaptic-stripping"},
    "ReDo": {"method": "redo", "method_args": {"tau": 0.0}},
    "Continual Backprop": {"method": "continual-backprop"},
    "Shrink & Perturb": {"method": "shrink-perturb",
                         "method_args": {"shrink": 0.9, "perturb": 0.01}},
    "L2 Init": {"method": "l2-init", "method_args": {"lam": 1e-3}}}


@PRESETS.register("plasticity-pfmnist")
def plasticity_pfmnist() -> CompareSpec:
    """Loss of plasticity at a reduced size: an MLP (2 x 100) on permuted Fashion-MNIST, 25
    tasks of 5000 samples, one epoch each; plain SGD vs the revival methods (a few minutes
    with --jobs 2). reproduce/ runs the full-size study."""
    base = ExperimentConfig(dataset="fashion-mnist", model="mlp",
                            model_args={"depth": 2, "width": 100}, optimizer="sgd", lr=0.01,
                            momentum=0.0, batch_size=16, epochs=25,
                            tasks={"kind": "permuted", "epochs_per_task": 1, "samples": 5000})
    return CompareSpec(base, PLASTICITY_METHODS, seeds=(0, 1, 2),
                       title="Loss of plasticity on permuted Fashion-MNIST (reduced size)",
                       description="Test accuracy on the current task after each task; dead = "
                                   "never active on the task's validation split.",
                       columns=("task",))


@PRESETS.register("plasticity-pfmnist-adam")
def plasticity_pfmnist_adam() -> CompareSpec:
    """The same reduced study with Adam (lr 1e-3), where loss of plasticity starts early:
    units die task after task and the effective rank falls (a few minutes with --jobs 2)."""
    spec = plasticity_pfmnist()
    return CompareSpec(spec.base.override(optimizer="adam", lr=1e-3), spec.variants,
                       spec.seeds, title="Loss of plasticity with Adam on permuted "
                       "Fashion-MNIST (reduced size)", description=spec.description,
                       columns=spec.columns)
