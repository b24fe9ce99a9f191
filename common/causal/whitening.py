"""The public whitening of the bound-scaled design, built from the DP ``moments`` release
(post-processing): well-conditioned nuisance fits, and the radius that bounds a fit row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedrec.common.causal.linalg import unvech

__all__ = ["Whitening", "moments_mean_cov", "whitening_from_moments"]


@dataclass(frozen=True)
class Whitening:
    """A public affine map of the bound-scaled design to (about) standardised coordinates.

    ``w = [1, A x_c + b]``. Built by :func:`whitening_from_moments` from the DP covariate
    moments (post-processing), it makes the nuisance fits well-conditioned: covariates whose
    real spread is a small part of their declared range no longer need huge coefficients that
    DP noise and eigenvalue floors would shrink. The covariate part is bounded by ``radius``
    (``inf``: no bound) in one of two ways:

    * ``weighted=False``: rows are scaled down to norm <= ``radius`` (a model change for the
      people outside: their features move);
    * ``weighted=True``: rows keep their features, and the nuisance fits' per-person terms are
      multiplied by ``omega^2 = min(1, radius^2/|z|^2)`` (:meth:`weights`): weighted least
      squares / weighted logistic likelihood, which stays consistent for a correctly specified
      model because the weights depend on x only. Every per-person bound is the same as for a
      row of norm <= radius (``omega^2 |w|^2 <= 1 + radius^2``, ``omega^2 |w| <= sqrt(1 +
      radius^2)``).

    Either way the public bound on ``||w||^2`` of a (weighted) fit row is ``1 + radius^2``.
    """

    a: np.ndarray
    b: np.ndarray
    radius: float
    weighted: bool = False

    @property
    def r2(self) -> float:
        return 1.0 + self.radius**2

    def _z(self, x: np.ndarray) -> np.ndarray:
        return x[:, 1:] @ self.a.T + self.b

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Design rows (intercept first, bound-scaled) -> whitened design rows (clipped to the
        radius unless ``weighted``)."""
        z = self._z(x)
        if math.isfinite(self.radius) and not self.weighted:
            norms = np.linalg.norm(z, axis=1)
            z = z * np.minimum(1.0, self.radius / np.maximum(norms, 1e-300))[:, None]
        return np.column_stack([np.ones(len(x)), z])

    def weights(self, x: np.ndarray) -> np.ndarray:
        """Per-row fit weight ``omega^2`` (ones unless ``weighted`` with a finite radius)."""
        if not (self.weighted and math.isfinite(self.radius)):
            return np.ones(len(x))
        n2 = np.sum(self._z(x) ** 2, axis=1)
        return np.minimum(1.0, self.radius**2 / np.maximum(n2, 1e-300))

    def linear_coef(self, c: np.ndarray) -> np.ndarray:
        """Coefficients on the bound-scaled design of ``c' w`` (exact where no row is clipped)."""
        return np.concatenate([[c[0] + c[1:] @ self.b], self.a.T @ c[1:]])

    def linear_map(self) -> np.ndarray:
        """The matrix M of :meth:`linear_coef` (``linear_coef(c) = M c``): maps a covariance of
        whitened-design coefficients to the bound-scaled design's, ``M C M'``."""
        p = self.a.shape[0] + 1
        m = np.zeros((p, p))
        m[0, 0] = 1.0
        m[0, 1:] = self.b
        m[1:, 1:] = self.a.T
        return m

    @staticmethod
    def identity(p: int) -> Whitening:
        return Whitening(np.eye(p - 1), np.zeros(p - 1), math.inf)


def moments_mean_cov(gram_vech: np.ndarray, p: int) -> tuple[float, np.ndarray, np.ndarray]:
    """From the summed ``vech(x x')`` of people (the ``moments`` release): their count (at
    least 1), covariate mean and (symmetric) covariance. Post-processing only."""
    g = unvech(gram_vech, p)
    n = max(float(g[0, 0]), 1.0)
    m = g[0, 1:] / n
    cov = g[1:, 1:] / n - np.outer(m, m)
    return n, m, (cov + cov.T) / 2


def whitening_from_moments(gram_vech: np.ndarray, p: int, *, noise_var: float = 0.0,
                           radius_factor: float | None = 1.5, mode: str = "diag",
                           weighted: bool = False) -> Whitening:
    """Whitening from the summed ``vech(x x')`` of people (noisy). ``mode="diag"``
    standardises each covariate by its DP mean and sd; ``"full"`` decorrelates too (needs a
    covariance precise enough to resolve its smallest eigenvalues: large ε or many people).
    Variances / eigenvalues are floored at what the noise can resolve. ``radius = radius_factor *
    sqrt(p - 1)`` (E||z||^2 = p - 1 for whitened data); None: inf (DP off, nothing to bound)."""
    n, m, cov = moments_mean_cov(gram_vech, p)
    if mode == "full":
        lam, vec = np.linalg.eigh(cov)
        floor = max(2.0 * math.sqrt(noise_var * p) / n, 1e-9 * max(float(np.trace(cov)), 1e-12))
        lam = np.maximum(lam, floor)
        a = (vec / np.sqrt(lam)).T
    elif mode == "diag":
        var = np.diag(cov)
        floor = max(2.0 * math.sqrt(noise_var) / n, 1e-9 * max(float(np.trace(cov)), 1e-12))
        a = np.diag(1.0 / np.sqrt(np.maximum(var, floor)))
    else:
        raise ValueError(f"whitening mode {mode!r}: use 'full' or 'diag'")
    radius = radius_factor * math.sqrt(p - 1) if radius_factor is not None else math.inf
    return Whitening(a=a, b=-a @ m, radius=radius, weighted=weighted)
