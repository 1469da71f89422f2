"""The edge-of-chaos theory, pinned to the spec's table (§4.3) and to quadrature."""
import math

import numpy as np
import pytest
import torch

from dormant import eoc, find_sites
from dormant.activations import ACTIVATIONS, make_activation
from dormant.models import build_model

# (kind, s, tau) -> {V': (m, sigma_w^2, sigma_b^2, V'')}, q* = 1 (spec §4.3)
TABLE = {
    ("crelu", 0.50, 0.000): {0.5: (1.400, 2.385, 0.122, -0.490), 0.7: (1.814, 2.150, 0.054, -0.494), 0.9: (2.443, 2.030, 0.012, -0.298)},
    ("crelu", 0.60, 0.253): {0.5: (1.217, 3.036, 0.311, -0.444), 0.7: (1.626, 2.704, 0.239, -0.421), 0.9: (2.247, 2.539, 0.194, -0.194)},
    ("crelu", 0.70, 0.524): {0.5: (1.051, 4.125, 0.465, -0.369), 0.7: (1.447, 3.628, 0.393, -0.307), 0.9: (2.054, 3.389, 0.346, -0.036)},
    ("crelu", 0.80, 0.842): {0.5: (0.891, 6.311, 0.598, -0.243), 0.7: (1.267, 5.480, 0.530, -0.121), 0.9: (1.852, 5.090, 0.484, 0.214)},
    ("crelu", 0.85, 1.036): {0.5: (0.810, 8.507, 0.660, -0.144), 0.7: (1.170, 7.335, 0.595, 0.023), 0.9: (1.739, 6.791, 0.551, 0.405)},
    ("crelu", 0.90, 1.282): {0.5: (0.722, 12.92, 0.723, 0.005), 0.7: (1.063, 11.05, 0.663, 0.237), 0.9: (1.611, 10.20, 0.620, 0.688)},
    ("cst", 0.50, 0.674): {0.5: (0.971, 2.499, 0.534, -0.315), 0.7: (1.358, 2.184, 0.463, -0.226), 0.9: (1.955, 2.035, 0.416, 0.073)},
    ("cst", 0.60, 0.842): {0.5: (0.891, 3.156, 0.598, -0.243), 0.7: (1.267, 2.740, 0.530, -0.121), 0.9: (1.852, 2.545, 0.484, 0.214)},
    ("cst", 0.70, 1.036): {0.5: (0.810, 4.253, 0.660, -0.144), 0.7: (1.170, 3.667, 0.595, 0.023), 0.9: (1.739, 3.396, 0.551, 0.405)},
    ("cst", 0.80, 1.282): {0.5: (0.722, 6.458, 0.723, 0.005), 0.7: (1.063, 5.526, 0.663, 0.237), 0.9: (1.611, 5.098, 0.620, 0.688)},
    ("cst", 0.85, 1.440): {0.5: (0.673, 8.670, 0.755, 0.116), 0.7: (1.002, 7.388, 0.699, 0.396), 0.9: (1.534, 6.800, 0.658, 0.897)},
}
CASES = [(k, s, tau, vp, row) for (k, s, tau), d in TABLE.items() for vp, row in d.items()]


def _rel(table_value: float) -> float:
    """The table prints 3 decimals or 4 significant digits (sigma_w^2 >= 10)."""
    return 0.006 if abs(table_value) >= 10 else 1.5e-3


@pytest.mark.parametrize("kind,s,tau,vp,row", CASES)
def test_prescription_matches_the_spec_table(kind, s, tau, vp, row):
    m, sw2, sb2, v2 = row
    p = eoc.prescribe(kind, s, q_star=1.0, v_prime=vp)
    assert p.tau == pytest.approx(tau, abs=1e-3)
    assert p.m == pytest.approx(m, abs=1e-3)
    assert p.sigma_w2 == pytest.approx(sw2, abs=_rel(sw2))
    assert p.sigma_b2 == pytest.approx(sb2, abs=1e-3)
    assert p.v_second == pytest.approx(v2, abs=1e-3)
    assert p.v_prime == pytest.approx(vp, abs=1e-9)


@pytest.mark.parametrize("kind,s,sw2,sb2,v2", [("shifted_relu", 0.85, 6.667, 0.537, 0.806),
                                              ("soft_threshold", 0.85, 6.667, 0.645, 1.358),
                                              ("shifted_relu", 0.5, 2.0, 0.0, 0.0)])
def test_unclipped_rows(kind, s, sw2, sb2, v2):
    p = eoc.prescribe(kind, s)
    assert (p.sigma_w2, p.sigma_b2, p.v_second) == pytest.approx((sw2, sb2, v2), abs=1e-3)
    assert p.v_prime == pytest.approx(1.0)          # unclipped: V'(q*) = chi_1 = 1


def test_cst_is_crelu_at_higher_sparsity_with_half_the_weight_variance():
    for s in (0.5, 0.7, 0.85):
        a = eoc.prescribe("cst", s, v_prime=0.7)
        b = eoc.prescribe("crelu", (1 + s) / 2, v_prime=0.7)
        assert (a.tau, a.m, a.sigma_b2) == pytest.approx((b.tau, b.m, b.sigma_b2), abs=1e-9)
        assert a.sigma_w2 == pytest.approx(b.sigma_w2 / 2)


def _gauss(f, q, n=400_001, lim=12.0):
    z = np.linspace(-lim, lim, n)
    w = np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    return float((f(math.sqrt(q) * z) * w).sum())


def _phi(kind, tau, m):
    act = make_activation(kind, tau=tau, **({"m": m} if m is not None else {}))
    return lambda x: act(torch.from_numpy(x)).numpy()


KINDS = [("shifted_relu", 0.7, None), ("soft_threshold", 0.9, None), ("crelu", 0.5, 1.2),
         ("cst", 1.1, 0.8)]


@pytest.mark.parametrize("kind,tau,m", KINDS)
@pytest.mark.parametrize("q", [0.6, 1.0, 2.3])
def test_closed_forms_against_quadrature_and_finite_differences(kind, tau, m, q):
    phi = _phi(kind, tau, m)
    assert eoc.e_phi2(q, kind, tau, m) == pytest.approx(_gauss(lambda x: phi(x) ** 2, q), abs=1e-6)
    h = 1e-5
    dphi = lambda x: (phi(x + h) - phi(x - h)) / (2 * h)
    assert eoc.e_dphi2(q, kind, tau, m) == pytest.approx(_gauss(lambda x: dphi(x) ** 2, q), abs=1e-3)
    sw2, sb2 = 2.7, 0.3
    V = lambda t: eoc.variance_map(t, kind, tau, m, sw2, sb2)
    d = 1e-4
    assert eoc.variance_slope(q, kind, tau, m, sw2) == pytest.approx((V(q + d) - V(q - d)) / (2 * d), abs=1e-6)
    assert eoc.variance_curvature(q, kind, tau, m, sw2) == pytest.approx(
        (V(q + d) - 2 * V(q) + V(q - d)) / d ** 2, abs=1e-4)
    zeros = _gauss(lambda x: (phi(x) == 0).astype(float), q)
    assert eoc.sparsity(tau, q, kind) == pytest.approx(zeros, abs=1e-4)


def test_correlation_map_fixed_point_and_chi1():
    p = eoc.prescribe("crelu", 0.8, v_prime=0.7)
    args = (p.q_star, p.kind, p.tau, p.m, p.sigma_w2, p.sigma_b2)
    assert eoc.correlation_map(1.0, *args) == pytest.approx(1.0, abs=1e-4)   # C(1) = 1 at q*
    # chi_1 = C'(1) = 1 on the edge of chaos. phi' jumps, so C(1) - C(1-d) = chi_1 d - k d^1.5
    # + ...: one Richardson step in sqrt(d) removes the d^1.5 term
    slope = lambda d: (eoc.correlation_map(1.0, *args) - eoc.correlation_map(1 - d, *args)) / d
    assert 2 * slope(0.01) - slope(0.04) == pytest.approx(1.0, abs=2e-3)
    assert eoc.chi1(p.q_star, p.kind, p.tau, p.m, p.sigma_w2) == pytest.approx(1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sparsity must be in"):
        eoc.prescribe("crelu", 1.2, v_prime=0.5)
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        eoc.prescribe("crelu", 0.8, v_prime=1.0)
    with pytest.raises(ValueError, match="needs a target v_prime"):
        eoc.prescribe("cst", 0.8)
    with pytest.raises(ValueError, match="unclipped"):
        eoc.prescribe("shifted_relu", 0.8, v_prime=0.5)
    with pytest.raises(ValueError, match="negative tau"):
        eoc.prescribe("shifted_relu", 0.3)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        make_activation("shifted_relu", tau=-0.1)
    with pytest.raises(ValueError, match="unknown activation kind"):
        eoc.prescribe("swish", 0.8)


def test_eoc_init_keeps_the_variance_at_q_star_through_depth():
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10, activation="crelu", depth=30, width=1024)
    x = torch.randn(256, 64)
    p = eoc.eoc_init(model, "crelu", 0.85, v_prime=0.7, example=x)
    q = eoc.preactivation_variance(model, x)[:-1]       # hidden layers
    assert q[0] == pytest.approx(1.0, rel=0.05)
    assert np.mean(q) == pytest.approx(1.0, rel=0.05) and max(q) < 1.3
    assert eoc.iterate_variance(1.0, 30, p) == pytest.approx([1.0] * 30)
    act = model.act7
    assert (act.tau, act.m) == pytest.approx((p.tau, p.m))
    # measured sparsity at init is the target
    from dormant import probe
    spars = probe(model, x).activation_sparsity()
    assert np.mean(list(spars.values())) == pytest.approx(0.85, abs=0.02)


@pytest.mark.parametrize("name", ["shifted_relu", "soft_threshold", "crelu", "cst"])
def test_activations_are_found_by_site_discovery_in_every_model(name):
    from dormant.models import MODELS
    assert name in ACTIVATIONS
    for model in MODELS.names():
        m = build_model(model, (1, 28, 28), 10, activation=name)
        x = torch.randn(2, 1, 28, 28)
        assert m(x).shape == (2, 10)
        assert {s.activation for s in find_sites(m, x)} == {name}, model
