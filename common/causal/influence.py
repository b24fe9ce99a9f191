"""Influence terms and the ATE from their sums, with a DP-aware standard error.

* ``ra``   — regression adjustment: per-arm ridge models; ATE = mean of mu1(x) - mu0(x);
* ``ipw``  — inverse propensity weighting (Horvitz-Thompson on the centred outcome);
* ``aipw`` — doubly robust: psi = mu1 - mu0 + T (y - mu1)/e - (1 - T)(y - mu0)/(1 - e).

Standard errors include the DP noise: every released sum ``S = sum + eta`` has public noise
variance ``v`` per coordinate (number of contributors x (sigma * sensitivity)^2 in local
mode, (sigma * sensitivity)^2 in distributed mode), and the delta-method variance of
ATE = S_psi / S_n adds ``v_psi / N^2 + ATE^2 v_n / N^2`` to the sampling variance; the DP
noise in the nuisance fits (propensity Newton steps, outcome Grams) adds the variance of
:func:`cross_fit_variance`. Everything but :func:`influence_terms` / :func:`aipw_terms`
(computed on the client, per person) is post-processing of releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fedrec.common.causal.linalg import psd_part, unvech
from fedrec.common.causal.nuisance import ArmModel
from fedrec.common.causal.scaling import ESTIMATORS, TRIM, trimmed_propensity
from fedrec.common.causal.whitening import Whitening

__all__ = [
    "aipw_terms", "influence_terms", "cross_fit_variance", "weighted_gram_scale", "ATEResult",
    "ate_from_sums",
]


def aipw_terms(t: np.ndarray, y: np.ndarray, m1: np.ndarray, m0: np.ndarray, e: np.ndarray) -> np.ndarray:
    """AIPW influence terms from fitted outcome predictions ``m1``/``m0`` and propensities ``e``:
    ``m1 - m0 + T (y - m1)/e - (1-T)(y - m0)/(1-e)``."""
    return m1 - m0 + t * (y - m1) / e - (1 - t) * (y - m0) / (1 - e)


def influence_terms(x: np.ndarray, t: np.ndarray, y: np.ndarray, *, estimator: str,
                    prop_coef: np.ndarray | None, coef1: np.ndarray | None, coef0: np.ndarray | None,
                    trim: tuple[float, float] = TRIM) -> np.ndarray:
    """Per-person influence term psi (scaled outcome units) whose mean is the ATE estimate.

    aipw: ``mu1 - mu0 + T (y - mu1)/e - (1-T)(y - mu0)/(1-e)``; ipw: ``T y/e - (1-T) y/(1-e)``;
    ra: ``mu1 - mu0``. With y, mu in [-1, 1] and e in ``trim``, |psi| <= 2 + 2/min(trim) (42
    at the default band): the worst-case bound :func:`psi_worst_case` reports.
    """
    t = np.asarray(t, dtype=np.float64)
    if estimator == "ra":
        return np.clip(x @ coef1, -1.0, 1.0) - np.clip(x @ coef0, -1.0, 1.0)
    e = trimmed_propensity(x, prop_coef, trim)
    if estimator == "ipw":
        return t * y / e - (1 - t) * y / (1 - e)
    if estimator == "aipw":
        return aipw_terms(t, y, np.clip(x @ coef1, -1.0, 1.0), np.clip(x @ coef0, -1.0, 1.0), e)
    raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")


def cross_fit_variance(beta_cov: np.ndarray, arm1: "ArmModel", arm0: "ArmModel", n: float, *,
                       k_scale: float = 1.0) -> float:
    """Variance (scaled units) of the interaction of the propensity's and the outcome models' DP
    noise in the AIPW mean: ``(tr(K1 C1 K1 Cb) + tr(K0 C0 K0 Cb)) / N^2``.

    psi is linear in the outcome coefficients and its mixed second derivative in (beta, coef_t)
    summed over people is ``K1 = sum T (1-e)/e x x'`` and ``K0 = sum (1-T) e/(1-e) x x'``. With
    independent noises delta_b, delta_t the term ``delta_b' K_t delta_t`` has mean 0 and the
    variance above. Under a correct propensity ``E[K1] = sum (1-e) x x' = E[G0]`` and
    ``E[K0] = E[G1]``: the released per-arm Grams stand in for K (post-processing, no release).
    The first-order terms ``J Cov J'`` vanish when the nuisance models are correctly specified
    (Neyman orthogonality of AIPW), so this is the nuisance-noise variance to second order
    under correct specification; measured on the simulators it matches the observed spread
    to within about +-20% and errs on the large side where the models are misspecified.

    ``k_scale``: K is a sum over people of unweighted ``w w'`` while the released Grams of a
    weighted fit (``Whitening.weighted``) carry ``omega^2 w w'``: K ~= k_scale x G with
    k_scale the ratio of the unweighted to the weighted trace (:func:`weighted_gram_scale`)."""
    g0, g1 = k_scale * psd_part(arm0.gram), k_scale * psd_part(arm1.gram)
    return 0.0 if n <= 0 else (float(np.trace(g0 @ arm1.noise_cov @ g0 @ beta_cov))
                               + float(np.trace(g1 @ arm0.noise_cov @ g1 @ beta_cov))) / max(n, 1.0) ** 2


def weighted_gram_scale(moments_vech: np.ndarray, p: int, whitening: "Whitening", n_item: float,
                        weighted_trace: float) -> float:
    """Unweighted / weighted trace of the whitened Gram of one item's people (>= 1; 1 when the
    fits are not weighted). The unweighted trace is the all-people mean ``E||w||^2`` (from the
    DP ``moments`` sum, mapped through the public whitening) times the item's people count;
    the weighted one is ``tr(G0) + tr(G1)`` of the outcome release. Post-processing only."""
    if not whitening.weighted or not math.isfinite(whitening.radius) or weighted_trace <= 0:
        return 1.0
    m = unvech(moments_vech, p)
    t = np.zeros((p, p))
    t[0, 0] = 1.0
    t[1:, 0] = whitening.b
    t[1:, 1:] = whitening.a
    mean_norm2 = float(np.trace(t @ m @ t.T)) / max(float(m[0, 0]), 1.0)
    return max(1.0, mean_norm2 * max(n_item, 0.0) / weighted_trace)


@dataclass(frozen=True)
class ATEResult:
    """ATE in the outcome's units with its standard error and the parts of its variance."""

    ate: float
    se: float
    n: float
    sampling_var: float
    noise_var: float
    #: variance the DP noise in the nuisance fits adds (:func:`cross_fit_variance`)
    nuisance_var: float = 0.0
    #: SD that the DP noise on the psi^2 sum puts on ``sampling_var`` (public: from the noise
    #: variance alone). Where it exceeds ``sampling_var`` the sampling part is mostly noise
    #: (many items with local noise) and the SE rests on ``noise_var`` + ``nuisance_var``.
    sampling_var_noise_sd: float = 0.0

    def interval(self, alpha: float = 0.05) -> tuple[float, float]:
        # the stdlib's normal quantile (Wichura's AS241, ~1e-16): scipy.stats would add about
        # a second to every deployed ClientApp process, which imports this module
        z = NormalDist().inv_cdf(1 - alpha / 2)
        return (self.ate - z * self.se, self.ate + z * self.se)


def ate_from_sums(s_n: float, s_psi: float, s_psi2: float, *, v_n: float = 0.0, v_psi: float = 0.0,
                  v_psi2: float = 0.0, scale: float = 1.0, v_nuisance: float = 0.0) -> ATEResult:
    """ATE = S_psi / S_n and its SE from (noisy) sums of 1, psi and psi^2.

    ``v_*`` are the DP noise variances of those sums (0 when DP is off). The sampling variance
    of psi is ``S_psi2/N - ATE^2`` corrected for the noise ``S_psi`` carries; the SE adds the
    noise terms by the delta method. ``scale`` converts to the outcome's units.
    """
    n = max(float(s_n), 1.0)
    ate = s_psi / n
    # E[(S/N)^2] = ate^2 + v_psi/N^2: remove the noise's share before taking the variance
    var_psi = s_psi2 / n - ate**2 + v_psi / n**2
    var_psi = max(var_psi, 1e-12)
    sampling = var_psi / n
    noise = v_psi / n**2 + ate**2 * v_n / n**2
    se = math.sqrt(sampling + noise + v_nuisance)
    # S_psi2 / N carries noise of SD sqrt(v_psi2) / N, and sampling = var_psi / N
    return ATEResult(ate=scale * ate, se=scale * se, n=n, sampling_var=scale**2 * sampling,
                     noise_var=scale**2 * noise, nuisance_var=scale**2 * v_nuisance,
                     sampling_var_noise_sd=scale**2 * math.sqrt(max(v_psi2, 0.0)) / n**2)
