"""Plasticity metrics against numpy, on random and hand-built matrices."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from dormant.metrics import (
    approximate_rank,
    distance_from,
    effective_rank,
    feature_norm,
    fraction_active,
    stable_rank,
    weight_magnitude,
)


def _numpy_ranks(a: np.ndarray):
    s = np.linalg.svd(a, compute_uv=False)
    p = s[s > 0] / s.sum()
    erank = float(np.exp(-(p * np.log(p)).sum()))
    srank = float((s ** 2).sum() / s[0] ** 2)
    k = lambda v: int(np.searchsorted(np.cumsum(v) / v.sum(), 0.99 - 1e-12) + 1)
    return erank, srank, k(s), k(s ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_numpy_on_random_matrices(seed):
    a = np.random.default_rng(seed).normal(size=(64, 20))
    erank, srank, dohare, approx = _numpy_ranks(a)
    t = torch.tensor(a)
    assert effective_rank(t) == pytest.approx(erank, rel=1e-10)
    assert stable_rank(t) == pytest.approx(srank, rel=1e-10)
    assert approximate_rank(t) == dohare and approximate_rank(t, squared=True) == approx


def test_hand_built_matrices():
    # rank 3 with equal singular values: every rank is 3
    eye = torch.zeros(10, 6)
    eye[0, 0] = eye[1, 1] = eye[2, 2] = 2.0
    assert effective_rank(eye) == pytest.approx(3.0)
    assert stable_rank(eye) == pytest.approx(3.0)
    assert approximate_rank(eye) == 3 and approximate_rank(eye, squared=True) == 3
    # one dominant direction: singular values 10, 0.1, 0.1
    d = torch.zeros(5, 3)
    d[0, 0], d[1, 1], d[2, 2] = 10.0, 0.1, 0.1
    p = np.array([10, 0.1, 0.1]) / 10.2
    assert effective_rank(d) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert stable_rank(d) == pytest.approx((100 + 0.02) / 100)
    assert approximate_rank(d) == 2                  # 10/10.2 = 98% < 99%, 10.1/10.2 = 99.0%
    assert approximate_rank(d, squared=True) == 1    # 100/100.02 > 99% of the variance
    assert approximate_rank(d, prop=0.5) == 1
    # rank deficient and zero
    r1 = torch.outer(torch.arange(1.0, 7.0), torch.ones(4))
    assert effective_rank(r1) == pytest.approx(1.0) and approximate_rank(r1) == 1
    assert effective_rank(torch.zeros(4, 3)) == 0.0 and stable_rank(torch.zeros(4, 3)) == 0.0
    with pytest.raises(ValueError, match="prop must be in"):
        approximate_rank(d, prop=0.0)


def test_unit_and_parameter_metrics():
    a = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    assert fraction_active(a) == pytest.approx(1 / 3)
    assert feature_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]])) == pytest.approx(2.5)
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -3.0]]))
        model.bias.fill_(2.0)
    assert weight_magnitude(model) == pytest.approx(2.0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(torch.tensor([[3.0, 4.0]]))
    assert distance_from(model, init) == pytest.approx(5.0)


def test_plasticity_per_site_matches_the_features_by_hand():
    from dormant.metrics import plasticity
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[:3] = -100.0                       # three dead units
    x = torch.randn(300, 5)
    m = plasticity(model, x, max_samples=200)
    h = torch.relu(model[0](x[:200])).detach()
    assert m["erank/1"] == pytest.approx(effective_rank(h))
    assert m["approx_rank/1"] == approximate_rank(h) <= 5
    assert m["fau/1"] == pytest.approx(5 / 8) and m["dormant_0.1/1"] >= 3 / 8
    assert m["weight_magnitude"] == pytest.approx(weight_magnitude(model))
