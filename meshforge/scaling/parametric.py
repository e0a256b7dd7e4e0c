"""Chinchilla approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta.

As Hoffmann et al. (2022, section 3.3 and appendix D.2) describe: with A = exp(a),
B = exp(b), E = exp(e), minimise

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3

with L-BFGS from a grid of initialisations: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5,
..., 1}, a, b in {0, 5, ..., 25}. The objective is evaluated at all 4,500 grid points at once
and L-BFGS-B (scipy, analytic gradient, alpha and beta kept in [0, 4]) starts from the best
``starts`` of them (default 8) rather than from every one: the far-away starts end in the same
minima or in worse ones. Intervals come from a bootstrap: refits to resampled points (with
replacement), started from the full-data optimum and the best grid points, and the 2.5/97.5
percentiles of each quantity.

With C = 6 N D the loss-minimising allocation is N_opt = G (C/6)^a, D_opt = (C/6)^b / G with
a = beta / (alpha + beta), b = alpha / (alpha + beta), G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from . import ScalingError

HUBER_DELTA = 1e-3
GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.01, 5.0),
    "b": np.arange(0.0, 25.01, 5.0),
}
PARAMS = ("a", "b", "e", "alpha", "beta")
N_PARAMS = 5
BOUNDS = [(None, None), (None, None), (None, None), (0.0, 4.0), (0.0, 4.0)]


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float = HUBER_DELTA
) -> tuple[float, np.ndarray]:
    """Mean Huber loss of the log residuals and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    lse = logsumexp(u, axis=0)
    w = np.exp(u - lse)
    r = lse - log_l
    dh = np.clip(r, -delta, delta)  # Huber'(r)
    n = len(r)
    grad = (
        np.array(
            [
                (dh * w[0]).sum(),
                (dh * w[1]).sum(),
                (dh * w[2]).sum(),
                -(dh * w[0] * log_n).sum(),
                -(dh * w[1] * log_d).sum(),
            ]
        )
        / n
    )
    return float(huber(r, delta).mean()), grad


def grid_losses(log_n, log_d, log_l, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """(grid points [G, 5], mean Huber loss at each)."""
    pts = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))
    u1 = pts[:, :1] - pts[:, 3:4] * log_n[None]
    u2 = pts[:, 1:2] - pts[:, 4:5] * log_d[None]
    u3 = np.broadcast_to(pts[:, 2:3], u1.shape)
    r = logsumexp(np.stack([u1, u2, u3]), axis=0) - log_l[None]
    return pts, huber(r, delta).mean(axis=1)


def _minimise(starts, log_n, log_d, log_l, delta) -> np.ndarray:
    best = None
    for x0 in starts:
        res = minimize(
            objective,
            x0,
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=BOUNDS,
            options={"maxiter": 500, "ftol": 1e-13, "gtol": 1e-10},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x


@dataclass
class ParametricFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n_points: int
    loss: float
    """Mean Huber loss at the optimum."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: np.ndarray | None = None
    """Bootstrap estimates [n, 5] of (E, A, B, alpha, beta)."""

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def predict(self, n, d):
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    def optimal(self, c, flops_per_param_token: float = 6.0):
        """(N_opt, D_opt, predicted loss) at compute ``c`` with C = k N D."""
        return optimal_allocation(np.array([self.E, self.A, self.B, self.alpha, self.beta]), c, flops_per_param_token)


def optimal_allocation(params: np.ndarray, c, k: float = 6.0):
    E, A, B, alpha, beta = params
    c = np.asarray(c, float)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # degenerate bootstrap fits give inf/nan
        g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
        n = g * (c / k) ** (beta / (alpha + beta))
        d = (c / k) / n
        return n, d, E + A / n**alpha + B / d**beta


def fit_parametric(
    n, d, loss, starts: int = 8, bootstrap: int = 100, seed: int = 0, delta: float = HUBER_DELTA
) -> ParametricFit:
    """Approach 3 on points (N, D, loss); ``bootstrap`` resamples for the intervals (0: none)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with the scaling extra
        return _fit(n, d, loss, starts, bootstrap, seed, delta)
    with threadpool_limits(1):  # a multithreaded BLAS makes each tiny L-BFGS step ~30x slower on a busy machine
        return _fit(n, d, loss, starts, bootstrap, seed, delta)


def _fit(n, d, loss, starts: int, bootstrap: int, seed: int, delta: float) -> ParametricFit:
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    if len(n) <= N_PARAMS:
        raise ScalingError(
            f"approach 3 fits {N_PARAMS} parameters (E, A, B, alpha, beta) and needs more points "
            f"than that; got {len(n)}"
        )
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    pts, losses = grid_losses(log_n, log_d, log_l, delta)
    order = np.argsort(losses)
    theta = _minimise(pts[order[:starts]], log_n, log_d, log_l, delta)
    fit = ParametricFit(
        E=float(np.exp(theta[2])),
        A=float(np.exp(theta[0])),
        B=float(np.exp(theta[1])),
        alpha=float(theta[3]),
        beta=float(theta[4]),
        n_points=len(n),
        loss=objective(theta, log_n, log_d, log_l, delta)[0],
    )
    if bootstrap:
        rng = np.random.default_rng(seed)
        restarts = [theta, pts[order[0]]]
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(n), len(n))
            t = _minimise(restarts, log_n[idx], log_d[idx], log_l[idx], delta)
            samples.append([np.exp(t[2]), np.exp(t[0]), np.exp(t[1]), t[3], t[4]])
        fit.samples = np.array(samples)
        for j, name in enumerate(("E", "A", "B", "alpha", "beta")):
            lo, hi = np.percentile(fit.samples[:, j], [2.5, 97.5])
            fit.intervals[name] = (float(lo), float(hi))
        s = fit.samples
        a_s = s[:, 4] / (s[:, 3] + s[:, 4])
        fit.intervals["a"] = tuple(float(x) for x in np.percentile(a_s, [2.5, 97.5]))
        fit.intervals["b"] = tuple(float(x) for x in np.percentile(1 - a_s, [2.5, 97.5]))
    return fit
