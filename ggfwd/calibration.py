"""Choosing the finite-difference step `eps` by measurement.

ggfwd estimates the directional derivative g = grad L . z from two evaluations of the loss,
`(L(x + eps z) - L(x - eps z)) / (2 eps)`. Through llama.cpp the loss is not a smooth function of the adapter:
with quantized weights the CPU quantizes activations (Q8_K for K-quants, Q8_0 for Q4_0/Q8_0), other
roundings follow (F16 KV cache, FP16 GELU table), and `L` is piecewise constant on a fine scale. Two error
sources then pull `eps` in opposite directions:

- noise: a deviation of every evaluation from the smooth loss, of standard deviation `sigma` (the noise
  floor). It enters the central difference as about `sigma / (sqrt(2) eps)`, so it dominates at small eps.
- curvature: `D(eps) = (L(x + eps z) - L(x - eps z)) / 2 = g eps + c eps^3 + q eps^5 + ...`, so the
  estimate is biased by `c eps^2 + q eps^4`, which dominates at large eps.

`calibrate_eps` measures both on the caller's own batches, adapter point and perturbation distribution: along a
few directions it evaluates `D(eps)` at every candidate eps, fits the odd polynomial `g eps + c eps^3 +
q eps^5` per direction by least squares (the noise on `D` does not depend on eps, so plain least squares is
the right weighting), takes the residual spread as the noise floor and the fitted `c`, `q` as the curvature,
and picks the eps that minimises the predicted error `sqrt(sigma_D^2 / eps^2 + bias(eps)^2)`, relative to the
typical size of `g` (its RMS over the directions, which is |grad L| for Gaussian z).

Only numpy and ggfwd: this runs on the training path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

DEFAULT_CANDIDATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass
class EpsRow:
    """What was measured and what the model predicts at one candidate eps."""

    eps: float
    noise_error: float  # predicted |error| of the central difference from noise: sigma_D / eps
    bias: float  # predicted |error| from curvature: RMS over directions of c eps^2 + q eps^4
    predicted_rel_error: float  # sqrt(noise^2 + bias^2) / g_rms
    observed_rel_error: float  # RMS over directions of (estimate - fitted g) / g_rms
    sign_agreement: float  # fraction of directions whose estimate has the sign of the fitted g
    unchanged: float  # fraction of evaluations whose loss equalled the unperturbed loss bit for bit


@dataclass
class Calibration:
    """The measured numerics of (model, quantization, backend, batch, adapter point) and the chosen eps."""

    eps: float  # the chosen step
    predicted_rel_error: float  # expected |estimate - g| / RMS(g) at `eps`
    noise_floor: float  # sigma: standard deviation of one loss evaluation around the smooth loss
    curvature: float  # RMS over directions of c = L'''(z,z,z) / 6, the eps^2 coefficient of the bias
    grad_rms: float  # RMS over directions of the fitted directional derivative g (about |grad L| for N(0,I))
    base_loss: float
    rows: list[EpsRow]
    n_directions: int  # over all batches
    n_evaluations: int
    n_tokens: int  # tokens per evaluation (of the first batch)
    seconds: float
    warnings: list[str] = field(default_factory=list)
    n_batches: int = 1
    directional: np.ndarray = field(default=None, repr=False)  # fitted g per direction
    differences: np.ndarray = field(default=None, repr=False)  # D (n_directions, n_candidates)

    @property
    def predicted_correlation(self) -> float:
        """Pearson r between estimates and exact derivatives if the error were independent noise of the
        predicted size: 1 / sqrt(1 + rel_error^2)."""
        return 1.0 / math.sqrt(1.0 + self.predicted_rel_error ** 2)

    @property
    def predicted_sign_agreement(self) -> float:
        """Chance that the estimate has the right sign, for Gaussian g and Gaussian error of the predicted
        relative size: 1 - arctan(rel) / pi."""
        return 1.0 - math.atan(self.predicted_rel_error) / math.pi

    def summary(self) -> str:
        return (f"eps {self.eps:.3g}: predicted relative error {self.predicted_rel_error:.1%} "
                f"(r ~ {self.predicted_correlation:.3f}); noise floor {self.noise_floor:.2e}, "
                f"curvature {self.curvature:.3g}, |g| ~ {self.grad_rms:.3g}, "
                f"{self.n_directions} directions on {self.n_batches} batch{'es' if self.n_batches > 1 else ''}, "
                f"{self.n_evaluations} evaluations in {self.seconds:.1f} s")

    def as_dict(self) -> dict:
        return {
            "eps": self.eps, "predicted_rel_error": self.predicted_rel_error,
            "predicted_correlation": self.predicted_correlation, "noise_floor": self.noise_floor,
            "curvature": self.curvature, "grad_rms": self.grad_rms, "base_loss": self.base_loss,
            "n_directions": self.n_directions, "n_batches": self.n_batches, "n_evaluations": self.n_evaluations,
            "n_tokens": self.n_tokens,
            "seconds": self.seconds, "warnings": list(self.warnings),
            "rows": [vars(r).copy() for r in self.rows],
        }

    def table(self, title: str | None = None):
        """A rich Table of the per-eps measurements (rich is imported only here)."""
        from rich.table import Table

        t = Table(title=title or f"eps calibration: chosen {self.eps:.3g}, noise floor {self.noise_floor:.2e}, "
                                 f"curvature {self.curvature:.3g}, |g| ~ {self.grad_rms:.3g}")
        # Headers on two lines: the table then fits an 80-column terminal without cutting them.
        for col in ("eps", "noise\nerr", "curvature\nerr", "predicted\nrel err", "observed\nrel err", "sign\nok",
                    "unchanged"):
            t.add_column(col, justify="right")
        for r in self.rows:
            t.add_row(f"{r.eps:.3g}", f"{r.noise_error:.3g}", f"{r.bias:.3g}", f"{r.predicted_rel_error:.1%}",
                      f"{r.observed_rel_error:.1%}", f"{r.sign_agreement:.0%}", f"{r.unchanged:.0%}")
        t.add_row(f"[bold]{self.eps:.3g}", "", "", f"[bold]{self.predicted_rel_error:.1%}", "", "", "")
        return t


def fit_differences(eps: np.ndarray, d: np.ndarray, degree: int = 5):
    """Fit D_k(e) = g_k e + c_k e^3 (+ q_k e^5) per direction by least squares.

    Returns (coefficients (n_dir, n_terms), sigma_D, residuals). sigma_D pools the residuals of all
    directions with the degrees of freedom left after the fit.
    """
    eps = np.asarray(eps, dtype=np.float64)
    powers = [p for p in (1, 3, 5) if p <= degree]
    if len(eps) < len(powers) + 1:
        powers = powers[: max(1, len(eps) - 1)]
    # Columns scaled to unit size for conditioning.
    X = np.stack([eps ** p for p in powers], axis=1)
    scale = np.abs(X).max(axis=0)
    coef_scaled, *_ = np.linalg.lstsq(X / scale, np.asarray(d, dtype=np.float64).T, rcond=None)
    coef = (coef_scaled / scale[:, None]).T  # (n_dir, n_terms)
    resid = d - coef @ X.T
    dof = d.size - coef.size
    sigma_d = math.sqrt(float((resid ** 2).sum()) / dof) if dof > 0 else float("nan")
    return coef, sigma_d, resid, powers


def predict_error(eps, sigma_d: float, coef: np.ndarray, powers) -> tuple[np.ndarray, np.ndarray]:
    """(noise part, curvature part) of the central-difference error at each eps (arrays)."""
    eps = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    noise = sigma_d / eps
    bias_terms = np.zeros((coef.shape[0], eps.size))
    for j, p in enumerate(powers):
        if p > 1:
            bias_terms += coef[:, j: j + 1] * eps[None, :] ** (p - 1)
    bias = np.sqrt((bias_terms ** 2).mean(axis=0))
    return noise, bias


def calibrate_eps(session, plans, adapter, perturbations, candidates=DEFAULT_CANDIDATES, n_directions: int = 4,
                  step: int = 0, client: int = 0, on_eval: Callable[[int, int], None] | None = None) -> Calibration:
    """Measure noise floor and curvature of the loss on `plans` around `adapter` and choose eps.

    `plans` is one scoring plan (a batch) or a list of them: curvature differs between batches (about 2x
    between two 16-row SST-2 batches on Gemma-3-270M), so several batches give an eps that suits the run
    rather than one batch; each batch gets its own `n_directions` directions (indices b * n_directions + k).
    `perturbations` is anything with `.direction(step, client, index) -> float32 vector` over the adapter's
    parameters (ggfwd.perturbation.Perturbations), or a callable `index -> vector`. Costs
    `n_batches * (1 + 2 * n_directions * len(candidates))` evaluations; the adapter values are restored at
    the end. `on_eval(done, total)` is called after each evaluation (progress bars).
    """
    plans = list(plans) if isinstance(plans, (list, tuple)) else [plans]
    if not plans:
        raise ValueError("calibration needs at least one batch")
    candidates = np.asarray(sorted(float(e) for e in candidates), dtype=np.float64)
    if candidates.size < 3 or np.any(candidates <= 0):
        raise ValueError("calibration needs at least three positive candidate eps values")
    if n_directions < 1:
        raise ValueError("n_directions must be >= 1")
    direction = perturbations if callable(perturbations) and not hasattr(perturbations, "direction") \
        else (lambda k: perturbations.direction(step, client, k))
    x = adapter.params.astype(np.float32, copy=True)
    total = len(plans) * (1 + 2 * n_directions * candidates.size)
    done = 0
    start = time.perf_counter()

    def loss_at(plan, params) -> float:
        nonlocal done
        session.set_params(params)
        value = session.score(plan).loss
        done += 1
        if on_eval is not None:
            on_eval(done, total)
        return value

    n_rows = len(plans) * n_directions
    plus, minus, base = np.zeros((n_rows, candidates.size)), np.zeros((n_rows, candidates.size)), np.zeros(n_rows)
    try:
        session.set_adapter(adapter)
        for b, plan in enumerate(plans):
            base[b * n_directions:(b + 1) * n_directions] = loss_at(plan, x)
            for k in range(b * n_directions, (b + 1) * n_directions):
                z = np.asarray(direction(k), dtype=np.float32)
                if z.shape != x.shape:
                    raise ValueError(f"direction has shape {z.shape}, the adapter has {x.shape} parameters")
                for i, e in enumerate(candidates):
                    plus[k, i] = loss_at(plan, (x + np.float32(e) * z).astype(np.float32))
                    minus[k, i] = loss_at(plan, (x - np.float32(e) * z).astype(np.float32))
    finally:
        session.set_params(x)
    seconds = time.perf_counter() - start
    return analyse(candidates, plus, minus, base, n_tokens=plans[0].n_tokens, seconds=seconds,
                   n_batches=len(plans))


def analyse(candidates, plus: np.ndarray, minus: np.ndarray, base, n_tokens: int = 0,
            seconds: float = 0.0, n_batches: int = 1) -> Calibration:
    """The calibration from measured losses: plus/minus (n_directions, n_candidates) at x +- eps z; `base` is
    the unperturbed loss, one number or one per direction (its batch's)."""
    candidates = np.asarray(candidates, dtype=np.float64)
    base = np.broadcast_to(np.asarray(base, dtype=np.float64).reshape(-1, 1), (plus.shape[0], 1))
    d = (plus - minus) / 2.0
    n_dir = d.shape[0]
    warnings: list[str] = []
    coef, sigma_d, resid, powers = fit_differences(candidates, d, degree=3)
    if candidates.size >= 5:
        # Keep the eps^5 term only where it explains clearly more than noise (an F test at about 4).
        coef5, sigma5, resid5, powers5 = fit_differences(candidates, d, degree=5)
        dof5 = d.size - coef5.size
        if dof5 > 0 and sigma5 > 0:
            f_stat = ((resid ** 2).sum() - (resid5 ** 2).sum()) / n_dir / sigma5 ** 2
            if f_stat > 4.0:
                coef, sigma_d, resid, powers = coef5, sigma5, resid5, powers5
    g = coef[:, 0]
    g_rms = float(np.sqrt((g ** 2).mean()))
    c_rms = float(np.sqrt((coef[:, 1] ** 2).mean())) if len(powers) > 1 else 0.0
    unchanged = ((plus == base) | (minus == base)).mean(axis=0)  # base broadcasts per direction
    estimates = d / candidates[None, :]  # central differences (n_dir, n_eps)
    rows = []
    noise, bias = predict_error(candidates, sigma_d, coef, powers)
    for i, e in enumerate(candidates):
        denom = g_rms if g_rms > 0 else float("nan")
        rows.append(EpsRow(
            eps=float(e), noise_error=float(noise[i]), bias=float(bias[i]),
            predicted_rel_error=float(math.hypot(noise[i], bias[i]) / denom),
            observed_rel_error=float(np.sqrt(((estimates[:, i] - g) ** 2).mean()) / denom),
            sign_agreement=float((np.sign(estimates[:, i]) == np.sign(g)).mean()),
            unchanged=float(unchanged[i])))
    if g_rms == 0.0 or not np.isfinite(sigma_d):
        warnings.append("the loss did not respond to any perturbation: is the adapter active?")
        chosen, rel = float(candidates[-1]), float("inf")
    else:
        grid = np.exp(np.linspace(math.log(candidates[0]), math.log(candidates[-1]), 400))
        n_g, b_g = predict_error(grid, sigma_d, coef, powers)
        err = np.hypot(n_g, b_g)
        j = int(np.argmin(err))
        chosen = float(f"{grid[j]:.2g}")
        n_c, b_c = predict_error(chosen, sigma_d, coef, powers)
        rel = float(math.hypot(n_c[0], b_c[0]) / g_rms)
        if j == 0:
            warnings.append(f"the best eps is at the smallest candidate ({candidates[0]:.3g}): the noise floor is "
                            "low; smaller candidates might do better")
        if j == grid.size - 1:
            warnings.append(f"the best eps is at the largest candidate ({candidates[-1]:.3g}): the estimate is "
                            "noise-dominated everywhere measured")
        if rel > 0.3:
            warnings.append(f"predicted relative error {rel:.0%} at the best eps: directional derivatives are "
                            "unreliable here; score more tokens per step or train on an F16 base")
    if n_dir < 3:
        warnings.append("fewer than 3 directions: the noise and curvature estimates are rough")
    sigma = sigma_d * math.sqrt(2.0)  # D is a half-difference of two evaluations
    return Calibration(eps=chosen, predicted_rel_error=rel, noise_floor=sigma, curvature=c_rms, grad_rms=g_rms,
                       base_loss=float(base.mean()), rows=rows, n_directions=n_dir, n_batches=n_batches,
                       n_evaluations=n_batches + plus.size + minus.size, n_tokens=int(n_tokens), seconds=seconds,
                       warnings=warnings, directional=g, differences=d)
