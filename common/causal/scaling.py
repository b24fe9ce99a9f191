"""Units of the causal protocol: bound-scaled covariates and outcome, the design row, the
trimmed propensity.

Covariates are scaled to [-1, 1] by their **public** bounds (``scale_covariates``) and a
leading intercept 1 is added, so a design row ``x`` has ``p = d + 1`` coordinates with
``|x_k| <= 1`` and ``||x|| <= sqrt(p)``. The outcome is centred on the middle of its public
bounds and divided by the half range (``scale_outcome``), so ``y`` lies in [-1, 1]. Effects
are computed on this scale and reported in the outcome's units (``half_range * tau``).

Propensities are trimmed to [0.05, 0.95] (``TRIM``). Why: the weights 1/e and 1/(1-e) are then
at most 20, which (a) bounds each person's influence term and so the DP sensitivity of the
released sum, (b) bounds the variance that near-0/1 propensities would otherwise blow up, and
(c) states the overlap assumption explicitly: people the logging policy (almost) never or
always treats carry no information about the effect. If the true propensity leaves that
band, the trimmed estimator targets a slightly different weighting: say so in reports.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

__all__ = [
    "TRIM", "ESTIMATORS", "scale_covariates", "design", "scale_outcome", "half_range", "sigmoid",
    "trimmed_propensity",
]


#: Propensity trimming band (see module docstring).
TRIM = (0.05, 0.95)
ESTIMATORS = ("aipw", "ipw", "ra")
Estimator = Literal["aipw", "ipw", "ra"]


def scale_covariates(x: np.ndarray, bounds: Sequence[tuple[float, float]]) -> np.ndarray:
    """Map each column to [-1, 1] by its public (lower, upper) bounds, clipping outside values."""
    x = np.asarray(x, dtype=np.float64)
    lo = np.array([b[0] for b in bounds], dtype=np.float64)
    hi = np.array([b[1] for b in bounds], dtype=np.float64)
    z = 2.0 * (x - lo) / (hi - lo) - 1.0
    return np.clip(z, -1.0, 1.0)


def design(z: np.ndarray) -> np.ndarray:
    """Prepend the intercept column: rows of norm <= sqrt(d + 1)."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    return np.column_stack([np.ones(len(z)), z])


def scale_outcome(y: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Centre on the middle of the public bounds, divide by the half range, clip to [-1, 1]."""
    lo, hi = bounds
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    return np.clip((np.asarray(y, dtype=np.float64) - mid) / half, -1.0, 1.0)


def half_range(bounds: tuple[float, float]) -> float:
    return (bounds[1] - bounds[0]) / 2.0


def sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(t, dtype=np.float64)))


def trimmed_propensity(x: np.ndarray, beta: np.ndarray, trim: tuple[float, float] = TRIM) -> np.ndarray:
    return np.clip(sigmoid(x @ beta), trim[0], trim[1])
