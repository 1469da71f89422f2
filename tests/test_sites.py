import pytest
import torch
import torch.nn as nn
from zoo import ZOO, activation_outputs

import dormant
from dormant import NoSitesError, find_sites, make_site


@pytest.mark.parametrize("name", list(ZOO))
def test_sites_match_brute_force_shapes(name):
    ctor, shape = ZOO[name]
    torch.manual_seed(0)
    model = ctor().eval()
    x = torch.randn(4, *shape)
    sites = find_sites(model, x[:2])
    outs = activation_outputs(model, x)
    assert len(sites) == len(outs)
    assert len({s.name for s in sites}) == len(sites), "names must be unique"
    for s, y in zip(sites, outs):
        assert y.shape[s.unit_dim] == s.num_units


def _wiring(s):
    return (s.name, s.activation, s.num_units, s.unit_dim, s.producer, s.norm, s.act_module,
            s.consumers, s.flatten_consumers, s.residual, s.consumers_complete,
            (s.tap.kind, s.tap.module, s.tap.call_index, s.tap.calls))


@pytest.mark.parametrize("name", list(ZOO))
def test_recorded_data_flow_finds_what_the_fx_graph_finds(name):
    """The discovery used when fx cannot trace gives the very sites fx gives, wiring, taps
    and all, on every architecture of the zoo."""
    ctor, shape = ZOO[name]
    torch.manual_seed(0)
    model = ctor()
    x = torch.randn(2, *shape)
    fx_sites = find_sites(model, x, trace="fx")
    flow_sites = find_sites(model, x, trace="dataflow")
    assert [_wiring(s) for s in flow_sites] == [_wiring(s) for s in fx_sites]
    assert {s.proof for s in fx_sites} == {"fx"} and {s.proof for s in flow_sites} == {"dataflow"}


def test_sequential_mlp_sites():
    sites = find_sites(ZOO["sequential-mlp"][0](), torch.randn(2, 3, 4))
    assert [(s.name, s.producer, s.consumers, s.num_units) for s in sites] == [
        ("2", "1", ("3",), 16), ("4", "3", ("5",), 16)]


def test_conv_bn_flatten_linear():
    sites = find_sites(ZOO["conv-bn-relu-flatten"][0](), torch.randn(2, 1, 8, 8))
    first, second, fc = sites
    assert (first.producer, first.norm, first.unit_dim, first.consumers) == (
        "features.0", "features.1", 1, ("features.4",))
    assert second.flatten_consumers == ("fc",) and second.consumers == ()
    assert (fc.producer, fc.unit_dim, fc.consumers) == ("fc", -1, ("out",))


def test_reused_relu_gives_two_sites():
    sites = find_sites(ZOO["reused-relu-residual"][0](), torch.randn(2, 4, 6, 6))
    assert [s.name for s in sites] == ["relu", "relu#1"]
    assert [s.tap.call_index for s in sites] == [0, 1]
    assert sites[0].producer == "conv1" and not sites[0].residual
    assert sites[1].producer == "conv2" and sites[1].norm == "bn2" and sites[1].residual


def test_functional_sites_and_taps():
    sites = find_sites(ZOO["functional"][0](), torch.randn(2, 8))
    assert [(s.producer, s.tap.kind, s.tap.module) for s in sites] == [
        ("fc1", "input", "fc2"), ("fc2", "input", "fc3"), ("fc3", "input", "head")]
    assert sites[1].residual and sites[1].norm == "ln"


def test_recompute_tap():
    (site,) = find_sites(ZOO["recompute"][0](), torch.randn(2, 6))
    assert site.tap.kind == "recompute" and site.tap.module == "fc"


def test_tokens_unit_axis_is_last():
    sites = find_sites(ZOO["timm-mlp-tokens"][0](), torch.randn(2, 5, 8))
    assert [(s.name, s.activation, s.unit_dim, s.num_units) for s in sites] == [
        ("mlp1.act", "gelu", -1, 16), ("mlp2.act", "relu", -1, 16)]


def test_filters_and_unknown_names():
    model = ZOO["tanh-sigmoid-silu"][0]()
    x = torch.randn(2, 6)
    assert [s.activation for s in find_sites(model, x)] == ["tanh", "sigmoid", "silu"]
    assert [s.name for s in find_sites(model, x, activations=["sigmoid"])] == ["3"]
    assert [s.name for s in find_sites(model, x, exclude=["1"])] == ["3", "5"]
    with pytest.raises(KeyError, match="sites are"):
        find_sites(model, x, include=["nope"])


def test_no_sites_is_a_clear_error():
    with pytest.raises(NoSitesError, match="pass sites explicitly"):
        find_sites(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), torch.randn(2, 3))


def test_custom_activation_registered_is_found():
    @dormant.register_activation(kind="square_relu")
    class SquareReLU(nn.Module):
        def forward(self, x):
            return torch.relu(x) ** 2

    model = nn.Sequential(nn.Linear(3, 4), SquareReLU(), nn.Linear(4, 2))
    (site,) = find_sites(model, torch.randn(2, 3))
    assert site.activation == "square_relu" and site.num_units == 4


def test_untraceable_model_falls_back_to_recorded_data_flow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace this
                return x
            return self.head(self.act(self.fc(x)))

    with pytest.warns(UserWarning, match="could not trace"):
        (site,) = find_sites(Branchy(), torch.randn(2, 3))
    assert (site.name, site.producer, site.num_units) == ("act", "fc", 5)
    assert site.consumers == ("head",) and site.proof == "dataflow"


def test_make_site_explicit():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    site = make_site(model, "1", producer="0")
    assert (site.num_units, site.unit_dim, site.tap.module) == (4, -1, "1")
    with pytest.raises(KeyError, match="no module named"):
        make_site(model, "9")


def test_find_sites_leaves_running_stats_alone():
    model = ZOO["conv-bn-relu-flatten"][0]().train()
    before = model.features[1].running_mean.clone()
    find_sites(model, torch.randn(4, 1, 8, 8) + 5)
    assert torch.equal(model.features[1].running_mean, before)
    assert model.training
