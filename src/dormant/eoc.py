"""Edge-of-chaos (EoC) theory for sparsity-inducing activations (Price et al., ICLR 2024).

Infinite-width Gaussian-process recursion at initialisation for h^l = W^l phi(h^{l-1}) + b^l
with W_ij ~ N(0, sigma_w^2 / fan_in), b_i ~ N(0, sigma_b^2) (Poole et al. 2016; Schoenholz
et al. 2017; Xiao et al. 2018 for CNNs):

    variance map     V(q)  = sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2
    correlation map  C(c)  = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*
    chi_1 = C'(1)          = sigma_w^2 E[phi'(sqrt(q*) z)^2]     (EoC: chi_1 = 1, V(q*) = q*)
    V'(q)  = chi_1(q) + sigma_w^2 E[phi phi'']        (< 1 at q* only for the clipped forms)

`kind` is one of "shifted_relu" (ReLU_tau; tau = 0 is ReLU), "soft_threshold" (ST_tau),
"crelu" (CReLU_{tau,m}) and "cst" (CST_{tau,m}). The closed forms are those of the spec
(§4.2, derived there and checked against quadrature in our tests); the expected sparsity of
an activation at q* is Phi(tau/sqrt(q*)) (ReLU-type) or 2 Phi(tau/sqrt(q*)) - 1 (ST-type).

    variance_slope = V'(q), variance_curvature = V''(q)

    p = prescribe("crelu", sparsity=0.85, v_prime=0.7)   # tau, m, sigma_w^2, sigma_b^2
    eoc_init(model, "crelu", sparsity=0.85, v_prime=0.7)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn as nn

from .sites import PRODUCERS, _unwrap

__all__ = ["KINDS", "Prescription", "e_phi2", "e_dphi2", "variance_map", "variance_slope",
           "variance_curvature", "chi1", "correlation_map", "sparsity", "tau_hat", "sigma_w2",
           "sigma_b2", "solve_m", "prescribe", "eoc_init", "iterate_variance",
           "preactivation_variance"]

KINDS = {"shifted_relu": (1, False), "soft_threshold": (2, False), "crelu": (1, True),
         "cst": (2, True)}           # kind -> (kappa, clipped)
_N = NormalDist()
Phi, pdf = _N.cdf, _N.pdf


def _kind(kind: str, m: float | None) -> tuple[int, bool]:
    if kind not in KINDS:
        raise ValueError(f"unknown activation kind {kind!r}; kinds: {', '.join(KINDS)}")
    kappa, clipped = KINDS[kind]
    if clipped and (m is None or not m > 0):
        raise ValueError(f"{kind} needs a clip level m > 0, got {m}")
    return kappa, clipped


def _check_q(q: float) -> float:
    if not q > 0:
        raise ValueError(f"q must be > 0, got {q}")
    return float(q)


def e_phi2(q: float, kind: str, tau: float, m: float | None = None) -> float:
    """E[phi(sqrt(q) z)^2], z ~ N(0, 1)."""
    kappa, clipped = _kind(kind, m)
    r = math.sqrt(_check_q(q))
    a = tau / r
    if not clipped:
        return kappa * ((q + tau ** 2) * (1 - Phi(a)) - tau * r * pdf(a))
    b = (tau + m) / r
    return kappa * ((q + tau ** 2) * (Phi(b) - Phi(a)) - tau * r * pdf(a)
                    + r * (tau - m) * pdf(b) + m ** 2 * (1 - Phi(b)))


def e_dphi2(q: float, kind: str, tau: float, m: float | None = None) -> float:
    """E[phi'(sqrt(q) z)^2] (= chi_1 / sigma_w^2)."""
    kappa, clipped = _kind(kind, m)
    r = math.sqrt(_check_q(q))
    a = tau / r
    return kappa * ((Phi((tau + m) / r) if clipped else 1.0) - Phi(a))


def variance_map(q: float, kind: str, tau: float, m: float | None, sw2: float, sb2: float) -> float:
    """V(q) = sigma_w^2 E[phi^2] + sigma_b^2."""
    return sw2 * e_phi2(q, kind, tau, m) + sb2


def chi1(q: float, kind: str, tau: float, m: float | None, sw2: float) -> float:
    return sw2 * e_dphi2(q, kind, tau, m)


def variance_slope(q: float, kind: str, tau: float, m: float | None, sw2: float) -> float:
    """V'(q): chi_1(q) minus the clip term sigma_w^2 kappa (m/sqrt q) pdf(b)."""
    kappa, clipped = _kind(kind, m)
    r = math.sqrt(_check_q(q))
    out = chi1(q, kind, tau, m, sw2)
    if clipped:
        out -= sw2 * kappa * (m / r) * pdf((tau + m) / r)
    return out


def variance_curvature(q: float, kind: str, tau: float, m: float | None, sw2: float) -> float:
    """V''(q)."""
    kappa, clipped = _kind(kind, m)
    r = math.sqrt(_check_q(q))
    a = tau / r
    if not clipped:
        return sw2 * kappa * a * pdf(a) / (2 * q)
    b = (tau + m) / r
    return sw2 * kappa * ((a * pdf(a) - b * pdf(b)) / (2 * q)
                          - m * pdf(b) * (b * b - 1) / (2 * q ** 1.5))


def sparsity(tau: float, q: float, kind: str) -> float:
    """Expected fraction of exact zeros of the activation at pre-activation variance q."""
    kappa, _ = _kind(kind, 1.0)
    p = Phi(tau / math.sqrt(_check_q(q)))
    return p if kappa == 1 else 2 * p - 1


def _check_s(s: float) -> float:
    if not 0 < s < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {s}")
    return float(s)


def tau_hat(s: float, q_star: float, kind: str) -> float:
    """The threshold giving expected sparsity s at q*: sqrt(q*) Phi^-1(s) (ReLU-type) or
    sqrt(q*) Phi^-1((1+s)/2) (ST-type). ReLU-type needs s >= 0.5 (tau >= 0)."""
    _check_s(s)
    kappa, _ = _kind(kind, 1.0)
    if kappa == 1 and s < 0.5:
        raise ValueError(f"{kind} is at least 50% sparse for tau >= 0; sparsity {s} would "
                         "need a negative tau")
    p = s if kappa == 1 else (1 + s) / 2
    return math.sqrt(_check_q(q_star)) * _N.inv_cdf(p)


def sigma_w2(q_star: float, kind: str, tau: float, m: float | None = None) -> float:
    """EoC weight variance: 1 / E[phi'(sqrt(q*) z)^2] (chi_1 = 1)."""
    return 1.0 / e_dphi2(q_star, kind, tau, m)


def sigma_b2(q_star: float, kind: str, tau: float, m: float | None, sw2: float) -> float:
    """Bias variance from the fixed point V(q*) = q*; refused when it would be negative."""
    sb2 = q_star - sw2 * e_phi2(q_star, kind, tau, m)
    if sb2 < -1e-12:
        raise ValueError(f"no fixed point at q*={q_star} for {kind}(tau={tau:.4g}, m={m}): "
                         f"sigma_b^2 would be {sb2:.4g} < 0")
    return max(sb2, 0.0)


def _v_prime_at_eoc(m: float, s: float, q_star: float, kind: str) -> float:
    tau = tau_hat(s, q_star, kind)
    return variance_slope(q_star, kind, tau, m, sigma_w2(q_star, kind, tau, m))


def solve_m(s: float, q_star: float, kind: str, target: float, *, tol: float = 1e-12) -> float:
    """The clip level m for which V'(q*) = target on the EoC (bisection; V' grows with m
    from 0 towards 1 as the clip goes to infinity)."""
    if kind not in ("crelu", "cst"):
        raise ValueError(f"only clipped kinds (crelu, cst) have a clip level, got {kind!r}")
    if not 0 < target < 1:
        raise ValueError(f"target V'(q*) must be in (0, 1): the clipped forms approach 1 only "
                         f"as m -> infinity, got {target}")
    lo, hi = 1e-6, 1.0
    while _v_prime_at_eoc(hi, s, q_star, kind) < target:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no clip level reaches V'(q*)={target} for {kind} at s={s}")
    if _v_prime_at_eoc(lo, s, q_star, kind) > target:
        raise ValueError(f"V'(q*)={target} is below what {kind} reaches at s={s}")
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _v_prime_at_eoc(mid, s, q_star, kind) < target else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Prescription:
    """Everything an EoC initialisation needs for one activation at one sparsity target."""
    kind: str
    sparsity: float
    q_star: float
    tau: float
    m: float | None
    sigma_w2: float
    sigma_b2: float
    v_prime: float
    v_second: float


def prescribe(kind: str, sparsity: float, q_star: float = 1.0,
              v_prime: float | None = None) -> Prescription:
    """tau for the target sparsity, m for the target V'(q*) (clipped kinds), sigma_w^2 on the
    EoC and sigma_b^2 from the fixed point."""
    _check_s(sparsity)
    _check_q(q_star)
    _, clipped = _kind(kind, 1.0)
    if clipped and v_prime is None:
        raise ValueError(f"{kind} needs a target v_prime in (0, 1) to set its clip level")
    if not clipped and v_prime is not None:
        raise ValueError(f"{kind} is unclipped: V'(q*) = 1 on the EoC, v_prime cannot be set")
    tau = tau_hat(sparsity, q_star, kind)
    m = solve_m(sparsity, q_star, kind, v_prime) if clipped else None
    sw2 = sigma_w2(q_star, kind, tau, m)
    sb2 = sigma_b2(q_star, kind, tau, m, sw2)
    return Prescription(kind, sparsity, q_star, tau, m, sw2, sb2,
                        variance_slope(q_star, kind, tau, m, sw2),
                        variance_curvature(q_star, kind, tau, m, sw2))


def correlation_map(c: float, q_star: float, kind: str, tau: float, m: float | None,
                    sw2: float, sb2: float, points: int = 1201) -> float:
    """C(c) by 2-D Simpson quadrature on z1, z2 in [-9, 9] (accurate to ~1e-5)."""
    from .activations import make_activation
    if not -1 <= c <= 1:
        raise ValueError(f"correlation must be in [-1, 1], got {c}")
    z = np.linspace(-9.0, 9.0, points)
    w = np.ones(points)
    w[1:-1:2], w[2:-1:2] = 4, 2
    w *= (z[1] - z[0]) / 3 * np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    act = make_activation(kind, tau=tau, **({"m": m} if m is not None else {}))
    phi = lambda x: act(torch.from_numpy(x)).numpy()
    r = math.sqrt(q_star)
    u1 = r * z[:, None]
    u2 = r * (c * z[:, None] + math.sqrt(max(1 - c * c, 0.0)) * z[None, :])
    e = float(w @ (phi(u1) * phi(u2)) @ w)
    return (sw2 * e + sb2) / q_star


def iterate_variance(q0: float, depth: int, p: Prescription) -> list[float]:
    """Theory: q^1 = q0, q^{l+1} = V(q^l), for `depth` layers."""
    qs = [float(q0)]
    for _ in range(depth - 1):
        qs.append(variance_map(qs[-1], p.kind, p.tau, p.m, p.sigma_w2, p.sigma_b2))
    return qs


@torch.no_grad()
def eoc_init(model: nn.Module, kind: str, sparsity: float, q_star: float = 1.0,
             v_prime: float | None = None, example: torch.Tensor | None = None,
             head: str = "default") -> Prescription:
    """Initialise a plain network on the edge of chaos for `kind` at `sparsity`.

    Every activation module of that kind gets tau (and m); every Linear/ConvNd weight is drawn
    from N(0, sigma_w^2 / fan_in) and every bias from N(0, sigma_b^2). The first layer reads
    data, not activations: its weight variance is set so that its pre-activations start at
    q* given the mean square of `example` (1 when no example is given). The classifier (the
    last Linear/Conv) keeps PyTorch's initialisation unless head="eoc".
    """
    from .activations import ClippedReLU, ClippedSoftThreshold, ShiftedReLU, SoftThreshold
    classes = {"shifted_relu": ShiftedReLU, "soft_threshold": SoftThreshold,
               "crelu": ClippedReLU, "cst": ClippedSoftThreshold}
    if head not in ("default", "eoc"):
        raise ValueError(f"head must be 'default' or 'eoc', got {head!r}")
    p = prescribe(kind, sparsity, q_star, v_prime)
    model = _unwrap(model)
    acts = [mod for mod in model.modules() if type(mod) is classes[kind]]
    if not acts:
        raise ValueError(f"eoc_init({kind!r}): the model has no {classes[kind].__name__} "
                         "module; build it with that activation")
    for a in acts:
        a.set_params(p.tau, p.m)
    layers = [mod for mod in model.modules() if isinstance(mod, PRODUCERS)]
    if head == "default":
        layers = layers[:-1]
    ms_in = float(example.pow(2).mean()) if example is not None else 1.0
    for i, layer in enumerate(layers):
        fan_in = layer.weight[0].numel()
        var = p.sigma_w2 if i > 0 else max(q_star - p.sigma_b2, 1e-12) / max(ms_in, 1e-12)
        layer.weight.normal_(0.0, math.sqrt(var / fan_in))
        if layer.bias is not None:
            layer.bias.normal_(0.0, math.sqrt(p.sigma_b2))
    return p


@torch.no_grad()
def preactivation_variance(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Measured: mean square of every Linear/ConvNd output (in forward order) on `x`."""
    model = _unwrap(model)
    out: list[float] = []
    handles = [mod.register_forward_hook(lambda m_, i, y: out.append(float(y.pow(2).mean())))
               for mod in model.modules() if isinstance(mod, PRODUCERS)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out
