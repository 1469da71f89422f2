"""Frozen parameters (``requires_grad=False``) are never edited by a method: the sites that
would touch them are left alone with a warning naming them (refused when given explicitly or
when nothing is left), pruning skips them, Shrink & Perturb leaves them; and a method refuses
an optimizer that is not a torch optimizer or does not train the model."""
import contextlib

import pytest
import torch
import torch.nn as nn

import dormant
from dormant.methods import build

ARGS = {"redo": {"tau": 1.0}, "synaptic-stripping": {"factor": 0.5},
        "continual-backprop": {"replacement_rate": 1.0, "maturity_threshold": 0},
        "shrink-perturb": {"shrink": 0.5, "perturb": 0.5},
        "imp": {"rounds": 1, "epochs_per_round": 1, "rate": 0.5},
        "ap": {"rounds": 1, "epochs_per_round": 1, "rate": 0.5},
        "nnrelief": {"rounds": 1, "epochs_per_round": 1, "keep_best": False, "probe_samples": 64}}


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias[:8] = -100        # half the first layer's units dead: every method acts
        model[2].bias[:8] = -100
    model[0].requires_grad_(False)      # a frozen first layer
    return model


@pytest.mark.parametrize("name", sorted(ARGS))
def test_methods_leave_frozen_parameters_alone(name):
    model, x = _model(), torch.rand(64, 8)
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    trained = {k: v.clone() for k, v in model[2].state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    said = (contextlib.nullcontext() if name == "shrink-perturb"      # acts on every tensor
            else pytest.warns(UserWarning, match=r"frozen"))
    with said:
        method = build(name, **ARGS[name]).prepare(model, opt, probe=x, epochs=2,
                                                  total_steps=4)
    for _ in range(2):
        loss = model(x).sum()
        opt.zero_grad()
        loss.backward()
        method.after_backward()
        opt.step()
        method.after_step()
        method.end_epoch()
    method.finalize()
    assert all(torch.equal(model[0].state_dict()[k], v) for k, v in frozen.items())
    assert any(not torch.equal(model[2].state_dict()[k], v) for k, v in trained.items())


def test_frozen_sites_given_explicitly_or_everywhere_are_refused():
    model, x = _model(), torch.rand(64, 8)
    sites = dormant.find_sites(model, x)
    with pytest.raises(ValueError, match=r"redo: the given sites touch frozen parameters .*"
                                         r"'0.weight'"):
        build("redo", sites=sites).prepare(model, None, probe=x)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every site touches frozen parameters"):
        build("synaptic-stripping").prepare(model, None, probe=x)
    with pytest.raises(ValueError, match=r"imp: every site touches frozen"):
        build("imp", rounds=1, epochs_per_round=1).prepare(model, None, probe=x, epochs=2)


def test_a_wrong_optimizer_is_refused():
    model, x = _model(), torch.rand(64, 8)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"redo: the optimizer holds none of the model's "
                                         r"parameters"):
        build("redo").prepare(model, other, probe=x)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer .* got str"):
        build("redo").prepare(model, "sgd", probe=x)
