"""Nuisance fits from summed (DP) statistics: the propensity's Newton steps (and its LDA
start), the per-arm ridge outcome models, and the covariance of the DP noise each carries.

Post-processing of DP releases: no data, no budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fedrec.common.causal.linalg import inv_pd, psd_part, solve_pd, unvech
from fedrec.common.causal.whitening import Whitening, moments_mean_cov

__all__ = [
    "newton_update", "ArmModel", "arm_shrinkage", "ridge_fit", "newton_noise_cov",
    "ridge_noise_input_cov", "ridge_noise_cov", "lda_start", "arm_from_mapped",
]


def newton_update(beta: np.ndarray, grad_sum: np.ndarray, hess_vech_sum: np.ndarray, *,
                  ridge: float = 0.0, floor: float = 1e-8) -> np.ndarray:
    """One Newton step for (ridge-penalised) logistic regression from summed statistics.

    ``grad_sum = sum (T - e(x)) x`` (log-likelihood gradient), ``hess_vech_sum = vech(sum
    e(1 - e) x x')``. Maximises ``loglik - ridge/2 |beta|^2`` (ridge = 0: plain MLE step).
    """
    p = beta.shape[0]
    h = unvech(hess_vech_sum, p) + ridge * np.eye(p)
    g = grad_sum - ridge * beta
    return beta + solve_pd(h, g, max(floor, ridge))


@dataclass(frozen=True)
class ArmModel:
    """Per-arm ridge outcome model ``mu_t(x) = x' coef`` on the scaled outcome, with what its
    covariance needs: the (noisy) Gram, the residual variance and the number of people."""

    coef: np.ndarray
    gram: np.ndarray
    n: float
    resid_var: float
    cov: np.ndarray
    ainv: np.ndarray | None = None
    #: covariance of the DP noise in ``coef`` (:func:`ridge_noise_cov`; zeros without DP)
    noise_cov: np.ndarray | None = None
    #: the part of ``noise_cov`` that the Gram's noise carries (``cov`` leaves it out)
    gram_noise_cov: np.ndarray | None = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x @ self.coef, -1.0, 1.0)

    @property
    def total_cov(self) -> np.ndarray:
        """Covariance of ``coef``: sampling, the X'y noise (``cov``) and the Gram's noise
        (first order: ``G + E`` moves the fit by ``-A^-1 E coef``, :func:`ridge_noise_input_cov`).
        What the CATE's intervals use."""
        return self.cov if self.gram_noise_cov is None else self.cov + self.gram_noise_cov


def arm_shrinkage(arm: ArmModel) -> float:
    """``tr(I - A^-1 G) / p`` of one ridge fit (:meth:`FederatedCausalEstimator.cate_shrinkage`)."""
    assert arm.ainv is not None
    p = arm.coef.shape[0]
    return float(np.trace(np.eye(p) - arm.ainv @ arm.gram)) / p


def ridge_fit(gram_vech: np.ndarray, xy: np.ndarray, yy: float, *, ridge: float = 0.0,
              noise_var: float = 0.0, floor: float = 1e-8, gram_noise_var: float | None = None) -> ArmModel:
    """Ridge regression from summed ``vech(X'X)``, ``X'y`` and ``y'y`` of one arm.

    The residual variance comes from ``RSS = y'y - 2 b'X'y + b'X'X b`` (post-processing of the
    same release), and the coefficient covariance is ``A^-1 (s^2 G + v I) A^-1`` with
    ``A = G + ridge I``: the sampling part plus the DP noise ``v`` on each coordinate of
    ``X'y``. The Gram's noise is carried apart, in ``gram_noise_cov`` (``noise_cov`` holds both
    noises, ``total_cov`` all three parts). ``gram_noise_var``: noise variance per coordinate of
    the Gram when it differs from X'y's (a release with a Gram weight, :func:`outcome_bound`);
    None = ``noise_var``.
    """
    p = xy.shape[0]
    g = unvech(gram_vech, p)
    pen = np.eye(p)
    pen[0, 0] = 0.0  # the intercept is not shrunk (0 is the middle of the bounds, not the mean)
    a = g + ridge * pen
    coef = solve_pd(a, xy, max(floor, ridge))
    n = max(float(g[0, 0]), 1.0)
    rss = float(yy - 2 * coef @ xy + coef @ g @ coef)
    resid_var = max(rss / max(n - p, 1.0), 1e-12)
    ainv = inv_pd(a, max(floor, ridge))
    cov = ainv @ (resid_var * psd_part(g) + noise_var * np.eye(p)) @ ainv
    arm = ArmModel(coef=coef, gram=g, n=n, resid_var=resid_var, cov=cov, ainv=ainv)
    vg = noise_var if gram_noise_var is None else gram_noise_var
    return replace(arm, noise_cov=ridge_noise_cov(arm, noise_var, gram_noise_var),
                   gram_noise_cov=ridge_noise_cov(arm, 0.0, vg))


def newton_noise_cov(prev_cov: np.ndarray, hess_vech_sum: np.ndarray, noise_var: float, *,
                     ridge: float = 0.0, floor: float = 1e-8) -> np.ndarray:
    """Covariance of the DP noise carried by beta after one :func:`newton_update` step.

    beta_new - beta_exact ~= M (beta - beta_exact) + H^-1 eta with eta the gradient's noise
    (variance ``noise_var`` per coordinate), ``H`` the floored (noisy) Hessian the step used and
    ``M = I - H^-1 H_raw`` (0 where the floor does not bind: Newton forgets earlier noise).
    The Hessian's own noise is second order at convergence and left out."""
    p = prev_cov.shape[0]
    h_raw = unvech(hess_vech_sum, p) + ridge * np.eye(p)
    hinv = inv_pd(h_raw, max(floor, ridge))
    m = np.eye(p) - hinv @ ((h_raw + h_raw.T) / 2)
    return m @ prev_cov @ m.T + noise_var * hinv @ hinv


def ridge_noise_input_cov(coef: np.ndarray, noise_var: float, gram_noise_var: float | None = None) -> np.ndarray:
    """Covariance S of ``eta_xy - eta_G coef`` for iid noise of variance ``v`` on every
    released coordinate of ``X'y`` and ``v_G`` (``gram_noise_var``, default ``v``) on every one
    of ``vech(G)``: ``v I + v_G (|c|^2 I + c c' - diag(c^2))`` (an off-diagonal Gram coordinate
    enters two rows of ``G c``)."""
    c = coef
    p = c.shape[0]
    vg = noise_var if gram_noise_var is None else gram_noise_var
    return noise_var * np.eye(p) + vg * (float(c @ c) * np.eye(p) + np.outer(c, c) - np.diag(c * c))


def ridge_noise_cov(arm: "ArmModel", noise_var: float, gram_noise_var: float | None = None) -> np.ndarray:
    """Covariance of the DP noise carried by a ridge fit's coefficients: ``A^-1 S A^-1`` with
    S = :func:`ridge_noise_input_cov` at the fit's coefficients."""
    return arm.ainv @ ridge_noise_input_cov(arm.coef, noise_var, gram_noise_var) @ arm.ainv


def lda_start(moments_vech: np.ndarray, arm_sums: np.ndarray, p: int, whitening: "Whitening", *,
              noise_var: float = 0.0, max_slope: float = 10.0) -> np.ndarray:
    """Starting logistic coefficients on the whitened design from the ``moments`` release:
    linear discriminant analysis (post-processing, no budget).

    ``arm_sums = [sum_T=1 x, sum_T=0 x]`` over the item's people (bound-scaled design, intercept
    first: entry 0 of each half is the arm's count). LDA's logit is
    ``log(n1/n0) + b'(z - (m1 + m0)/2)`` with ``b = S_w^-1 (m1 - m0)``, S_w the within-arm
    covariance; here S_w is the covariance of all people (the ``vech`` part) minus the
    between-arm part, mapped through the whitening. It is the logistic MLE when the covariates
    are Gaussian with a common covariance, and close to it otherwise (Efron 1975), so Newton
    from here needs two steps where it needed four from zero (one leaves beta unconverged):
    the budget of the rest goes to the other releases (measured in docs/causal.md). Falls back
    to zeros when a noisy arm count is below 2; the slope's norm is capped at ``max_slope``
    (logit units per whitened unit), far beyond any propensity the trimming keeps.
    Written here rather than with scikit-learn's LinearDiscriminantAnalysis, which fits from
    rows: the server has only the DP sums.
    """
    s1, s0 = arm_sums[:p], arm_sums[p:2 * p]
    n1, n0 = float(s1[0]), float(s0[0])
    zero = np.zeros(p)
    if not (n1 >= 2.0 and n0 >= 2.0):
        return zero
    n, _, cov = moments_mean_cov(moments_vech, p)
    a = whitening.a
    cov_z = a @ cov @ a.T
    m1 = a @ (s1[1:] / n1) + whitening.b
    m0 = a @ (s0[1:] / n0) + whitening.b
    d = m1 - m0
    pi1 = n1 / (n1 + n0)
    within = cov_z - pi1 * (1 - pi1) * np.outer(d, d)
    lam, vec = np.linalg.eigh((within + within.T) / 2)
    # whitened covariates have unit variance: floor at what the noise resolves, at least 1e-3
    floor = max(1e-3, 2.0 * math.sqrt(noise_var * p) / n * float(np.max(np.abs(a))) ** 2)
    lam = np.maximum(lam, floor)
    b = vec @ ((vec.T @ d) / lam)
    norm = float(np.linalg.norm(b))
    if not math.isfinite(norm):
        return zero
    if norm > max_slope:
        b = b * (max_slope / norm)
    intercept = math.log(n1 / n0) - float(b @ (m1 + m0)) / 2.0
    return np.concatenate([[intercept], b])


def arm_from_mapped(arm: ArmModel, centre: float, half: float) -> ArmModel:
    """An arm model fitted on the mapped outcome ``(y - centre) / half`` back in scaled units:
    ``coef = half coef' + centre e_0`` (the design's first column is the intercept, 1 for every
    row), covariances times ``half^2``. Exact (the identity map returns equal values);
    post-processing."""
    coef = half * arm.coef
    coef[0] += centre
    h2 = half * half
    return replace(arm, coef=coef, resid_var=arm.resid_var * h2, cov=arm.cov * h2,
                   noise_cov=None if arm.noise_cov is None else arm.noise_cov * h2,
                   gram_noise_cov=None if arm.gram_noise_cov is None else arm.gram_noise_cov * h2)
