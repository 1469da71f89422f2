import copy

import pytest
import torch
import torch.nn as nn

from dormant import find_sites
from dormant.methods.redo import recycle
from dormant.monitor import CRITERIA
from dormant.units import incoming, outgoing


def _adam_state(model):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, *_shape(model))).sum().backward()
    opt.step()
    return opt


def _shape(model):
    return (6,) if isinstance(model[0], nn.Linear) else (2, 4, 4)


def test_recycle_linear_golden():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    opt = _adam_state(model)
    site = find_sites(model, torch.randn(2, 6))[0]
    before = copy.deepcopy(model)
    units = torch.tensor([False, True, False, True])
    torch.manual_seed(123)
    expected = nn.Linear(6, 4)              # what a fresh init draws with the same RNG state
    torch.manual_seed(123)
    assert recycle(model, site, units, opt) == 2
    w, b, out = model[0].weight, model[0].bias, model[2].weight
    assert torch.equal(w[units], expected.weight[units])
    assert torch.equal(b[units], expected.bias[units])
    assert torch.equal(w[~units], before[0].weight[~units])   # live units untouched
    assert (out[:, units] == 0).all()
    assert torch.equal(out[:, ~units], before[2].weight[:, ~units])
    for p, where in ((w, units[:, None].expand_as(w)), (out, units[None, :].expand_as(out))):
        for key in ("exp_avg", "exp_avg_sq"):
            s = opt.state[p][key]
            assert (s[where] == 0).all() and (s[~where] != 0).all()


def test_recycle_conv_bn_flatten_consumer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 16, 5))
    opt = _adam_state(model)
    site = find_sites(model, torch.randn(2, 2, 4, 4))[0]
    assert [s.name for s in incoming(model, site)] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert [(s.name, s.group, s.layout) for s in outgoing(model, site)] == [("4.weight", 16, "block")]
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[1].running_var.fill_(7.0)
    units = torch.tensor([False, True, False])
    recycle(model, site, units, opt)
    fc = model[4].weight
    assert (fc[:, 16:32] == 0).all() and (fc[:, :16] != 0).all() and (fc[:, 32:] != 0).all()
    assert model[1].weight.tolist() == [3.0, 1.0, 3.0]
    assert model[1].running_var.tolist() == [7.0, 1.0, 7.0]


def test_tau_zero_recycles_exactly_the_never_active_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[[1, 5]] = -100.0
    from dormant import probe
    mon = probe(model, torch.randn(256, 6))
    d0 = mon.dead_units("dormant", tau=0.0)["1"]
    assert torch.equal(d0, mon.dead_units("never_active")["1"])
    assert d0.nonzero().flatten().tolist() == [1, 5]
    assert CRITERIA.get("dormant") is not None


@pytest.mark.parametrize("groups, out", [(4, 4), (4, 8), (2, 6)])
def test_grouped_and_depthwise_consumers_lose_exactly_the_units_input_channels(groups, out):
    """Filter o of a grouped conv reads input channels of group o // (out / groups) only:
    recycling unit u zeroes weight[o, u % (4 / groups)] for the filters of u's group, and
    the consumer then ignores unit u (checked by perturbing it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, out, 3, groups=groups))
    site = find_sites(model, torch.randn(2, 2, 5, 5))[0]
    units = torch.tensor([False, True, False, True])
    recycle(model, site, units)
    w, in_pg, out_pg = model[2].weight, 4 // groups, out // groups
    for o in range(out):
        for j in range(in_pg):
            u = (o // out_pg) * in_pg + j
            assert bool((w[o, j] == 0).all()) == bool(units[u]), (o, j)
    h = torch.relu(model[0](torch.randn(3, 2, 5, 5)))
    bumped = h.clone()
    bumped[:, units] += 5.0
    assert torch.allclose(model[2](h), model[2](bumped))


@pytest.mark.parametrize("bias", ["redraw", "zero"])
def test_bias_of_a_recycled_unit_and_its_adam_moments(bias):
    """bias="zero" is the official rule: bias 0, its Adam moments left alone; "redraw" draws
    it from the layer's initialiser and zeroes its moments, like the incoming weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    site = find_sites(model, torch.randn(2, 4))[0]
    units = torch.tensor([True, False, True, False, False, False])
    b_before = model[0].bias.detach().clone()
    moments = {k: v.clone() for k, v in opt.state[model[0].bias].items()}
    recycle(model, site, units, opt, bias=bias)
    b = model[0].bias.detach()
    state = opt.state[model[0].bias]
    assert torch.equal(b[~units], b_before[~units])
    if bias == "zero":
        assert (b[units] == 0).all()
        assert all(torch.equal(state[k], moments[k]) for k in ("exp_avg", "exp_avg_sq"))
    else:
        assert (b[units] != b_before[units]).all() and (b[units] != 0).all()
        assert (state["exp_avg"][units] == 0).all() and (state["exp_avg_sq"][units] == 0).all()
    assert (opt.state[model[0].weight]["exp_avg"][units] == 0).all()     # both rules
    assert (model[2].weight[:, units] == 0).all()


def test_recycled_weights_do_not_depend_on_the_callers_random_state():
    """Ranks of a distributed run (or a resumed run) each have their own random state: the
    re-drawn weights come from the method's own seeded draw, so they agree, and the caller's
    stream is left where it was."""
    from dormant.methods import build
    outs = []
    for rank_seed in (1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        with torch.no_grad():
            model[0].bias[[0, 3]] = -100.0
        method = build("redo", tau=0.0).prepare(model, None, probe=torch.randn(32, 4))
        torch.manual_seed(rank_seed)
        before = torch.get_rng_state()
        method.end_epoch()
        assert torch.equal(torch.get_rng_state(), before)
        outs.append(model[0].weight.detach().clone())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0][0], torch.zeros(4))


def test_redo_score_has_the_official_denominator():
    """score = E|a| / (layer mean + 1e-9): with a layer mean of 1e-9 the 1e-9 halves it."""
    from types import SimpleNamespace
    stats = SimpleNamespace(mean_abs=torch.tensor([0.0, 2e-9, 1e-9], dtype=torch.float64))
    assert CRITERIA.get("dormant")(stats, tau=0.6).tolist() == [True, False, True]


def test_a_weight_joining_two_recycled_units_ends_at_zero_as_in_the_official_code():
    """All incoming rows are re-drawn first, then all outgoing columns zeroed: W2[k, i] (unit
    i's outgoing column, unit k's incoming row) is 0 afterwards, not re-drawn."""
    from dormant.methods.redo import recycle_all
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    sites = find_sites(model, torch.rand(3, 4))
    units = {sites[0].name: torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool),
             sites[1].name: torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool)}
    before = copy.deepcopy(model)
    assert recycle_all(model, sites, units) == 2
    w2 = model[2].weight.detach()
    assert w2[2, 1] == 0                                     # the joining weight
    assert (w2[2] != before[2].weight[2]).all()              # row 2 re-drawn, [2, 1] zeroed
    assert (w2[:, 1] == 0).all() and (model[4].weight[:, 2] == 0).all()
