import pytest
import torch

from dormant import find_sites
from dormant.activations import ACTIVATIONS
from dormant.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_runs_and_has_sites(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10)
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    sites = find_sites(model, x[:2])
    assert sites and all(s.activation == "relu" for s in sites)


@pytest.mark.parametrize("act", ["gelu", "tanh", "silu"])
def test_activation_option_reaches_sites(act):
    model = build_model("vgg-small", (1, 28, 28), 10, activation=act, width=0.25)
    assert {s.activation for s in find_sites(model, torch.randn(2, 1, 28, 28))} == {act}


def test_mlp_on_sequences_and_presets():
    assert [s.num_units for s in find_sites(build_model("lenet300", (1, 28, 28), 10),
                                            torch.randn(2, 1, 28, 28))] == [300, 100]
    m = build_model("mlp", (40,), 10, depth=3, width=32)
    assert [s.name for s in find_sites(m, torch.randn(2, 40))] == ["act1", "act2", "act3"]


def test_vit_has_relu_after_both_mlp_linears():
    sites = find_sites(build_model("vit-tiny", (1, 28, 28), 10, depth=2), torch.randn(2, 1, 28, 28))
    assert [s.producer for s in sites] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                                           "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert all(s.unit_dim == -1 for s in sites)


def test_resnet20_has_19_sites_with_reused_relus():
    sites = find_sites(build_model("resnet20", (1, 28, 28), 10), torch.randn(2, 1, 28, 28))
    assert len(sites) == 19 and sum(s.residual for s in sites) == 9


def test_bad_model_options_are_refused():
    with pytest.raises(ValueError, match="valid options"):
        build_model("mlp", (40,), 10, widht=3)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("lenet5", (40,), 10)
    with pytest.raises(KeyError, match="valid activations"):
        build_model("mlp", (40,), 10, activation="swishy")
    assert "relu" in ACTIVATIONS


@pytest.mark.slow
def test_importing_dormant_pulls_no_optional_dependency():
    import subprocess
    import sys
    code = ("import sys, dormant, dormant.methods, dormant.experiments, dormant.eoc, dormant.cli; "
            "print(sorted(m for m in ('matplotlib', 'torch_pruning', 'yaml', 'transformers', "
            "'tensorboard', 'lightning', 'accelerate') if m in sys.modules))")
    # (tqdm is left out: torch itself imports it when it is installed)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
