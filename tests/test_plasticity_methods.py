"""Continual Backprop, Shrink & Perturb and L2 Init on hand-built cases."""
import math

import pytest
import torch
import torch.nn as nn

from dormant.methods import build
from dormant.methods.continual_backprop import outgoing_magnitude


def _mlp():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[0.5, -1.0, 0.1], [0.5, 2.0, -0.1]]))
        model[2].bias.zero_()
    return model


def _step(model, method, x):
    model.train()
    model(x).sum().backward()
    method.after_backward()
    method.after_step()


X = torch.tensor([[1.0, 2.0], [3.0, 0.0]])          # h = relu(W x): [[1, 2, 3], [3, 0, 3]]


def test_cbp_utility_is_the_bias_corrected_running_contribution():
    """contribution_u = mean_k |w_out,k,u| x mean_n |h_u|: (0.5 x 2, 1.5 x 1, 0.1 x 3) =
    (1, 1.5, 0.3); after two identical steps util = (1 - eta)(1 + eta) c and util / bc = c."""
    model = _mlp()
    assert outgoing_magnitude(model, build("redo").prepare(model, None, example=X).sites[0]
                              ).tolist() == pytest.approx([0.5, 1.5, 0.1])
    cbp = build("continual-backprop", replacement_rate=0.0, decay=0.9).prepare(
        model, None, example=X)
    for _ in range(2):
        _step(model, cbp, X)
    util, ages = cbp.util["1"], cbp.ages["1"]
    c = torch.tensor([1.0, 1.5, 0.3], dtype=torch.float64)
    assert ages.tolist() == [2, 2, 2]
    assert torch.allclose(util, 0.1 * 1.9 * c)
    assert torch.allclose(util / (1 - 0.9 ** ages), c)


def test_cbp_replaces_the_lowest_utility_mature_unit_as_the_code_does():
    """rate 1/3 of 3 eligible units (age 1 > maturity 0) = exactly one unit per step: unit 2
    (utility 0.3). Its incoming row is re-drawn within the kaiming bounds, bias 0, outgoing
    column 0, utility and age 0, its optimizer state reset; the other units are untouched."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    cbp = build("continual-backprop", replacement_rate=1 / 3, maturity_threshold=0,
                accumulate=True).prepare(model, opt, example=X)
    before = model[0].weight.detach().clone()
    model(X).sum().backward()
    opt.step()
    cbp.after_step()
    w_in, w_out = model[0].weight.detach(), model[2].weight.detach()
    assert torch.equal(w_in[:2], before[:2]) and not torch.equal(w_in[2], before[2])
    bound = nn.init.calculate_gain("relu") * math.sqrt(3 / 2)
    assert (w_in[2].abs() <= bound).all()
    assert model[0].bias[2] == 0 and (w_out[:, 2] == 0).all() and (w_out[:, :2] != 0).all()
    assert cbp.util["1"][2] == 0 and cbp.ages["1"].tolist() == [1, 1, 0]
    assert (opt.state[model[0].weight]["exp_avg_sq"][2] == 0).all()
    assert cbp.end_epoch()["cbp/replaced"] == 1


def test_cbp_probabilistic_replacement_is_seeded_not_global():
    outs = []
    for global_seed in (1, 2):
        model = _mlp()
        cbp = build("continual-backprop", replacement_rate=0.2, maturity_threshold=0).prepare(
            model, None, example=X, seed=5)
        torch.manual_seed(global_seed)
        for _ in range(6):
            _step(model, cbp, X)
        outs.append((cbp.replaced_total, model[0].weight.detach().clone()))
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])


def test_shrink_perturb_mixes_the_weights_with_a_fresh_initialisation():
    from dormant.methods.plasticity import fresh_parameters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp = build("shrink-perturb", shrink=0.5, perturb=0.2).prepare(model, None)
    sp.epoch = 1                       # the draw end_epoch makes (at epoch 1)
    with sp.seeded():
        fresh = fresh_parameters(model)
    sp.epoch = 0
    assert sp.end_epoch()["sp/applied"] == 1
    for n, p in model.named_parameters():
        assert torch.allclose(p, 0.5 * before[n] + 0.2 * fresh[n]), n


def test_l2_init_adds_the_gradient_of_its_penalty():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    l2 = build("l2-init", lam=0.25).prepare(model, None)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    model.zero_grad()
    (model(torch.ones(1, 3)).sum() * 0).backward()
    l2.after_backward()
    assert torch.allclose(model.weight.grad, 2 * 0.25 * (model.weight - theta0["weight"]))
    assert torch.allclose(model.bias.grad, torch.zeros(2))
    assert l2.end_epoch()["l2init/distance"] == pytest.approx(math.sqrt(6))
