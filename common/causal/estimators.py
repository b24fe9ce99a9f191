"""ATE / CATE with confidence intervals from aggregated (DP) sufficient statistics.

Pure math, no I/O and no Flower: the client computes per-person contributions with
:mod:`fedrec.client.statistics`, the server (or a benchmark adding the same vectors in numpy)
sums them, and everything here turns sums into estimates. It is post-processing of DP
releases and costs no budget.

Units. Covariates are scaled to [-1, 1] by their **public** bounds (``scale_covariates``) and a
leading intercept 1 is added, so a design row ``x`` has ``p = d + 1`` coordinates with
``|x_k| <= 1`` and ``||x|| <= sqrt(p)``. The outcome is centred on the middle of its public
bounds and divided by the half range (``scale_outcome``), so ``y`` lies in [-1, 1]. Effects
are computed on this scale and reported in the outcome's units (``half_range * tau``).

Estimators (EconML-like names on :class:`FederatedCausalEstimator`):

* ``ra``   — regression adjustment: per-arm ridge models; ATE = mean of mu1(x) - mu0(x);
* ``ipw``  — inverse propensity weighting (Horvitz-Thompson on the centred outcome);
* ``aipw`` — doubly robust: psi = mu1 - mu0 + T (y - mu1)/e - (1 - T)(y - mu0)/(1 - e).

Propensities are trimmed to [0.05, 0.95] (``TRIM``). Why: the weights 1/e and 1/(1-e) are then
at most 20, which (a) bounds each person's influence term and so the DP sensitivity of the
released sum, (b) bounds the variance that near-0/1 propensities would otherwise blow up, and
(c) states the overlap assumption explicitly: people the logging policy (almost) never or
always treats carry no information about the effect. If the true propensity leaves that
band, the trimmed estimator targets a slightly different weighting: say so in reports.

Standard errors include the DP noise: every released sum ``S = sum + eta`` has public noise
variance ``v`` per coordinate (number of contributors x (sigma * sensitivity)^2 in local
mode, (sigma * sensitivity)^2 in distributed mode), and the delta-method variance of
ATE = S_psi / S_n adds ``v_psi / N^2 + ATE^2 v_n / N^2`` to the sampling variance; the DP
noise in the nuisance fits (propensity Newton steps, outcome Grams) adds the variance of
:func:`cross_fit_variance` (and, with the optional Jacobian release, :func:`nuisance_variance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Sequence

import numpy as np
from scipy.stats import norm

__all__ = [
    "TRIM",
    "ESTIMATORS",
    "vech",
    "unvech",
    "vech_len",
    "half_range",
    "psi_worst_case",
    "scale_covariates",
    "scale_outcome",
    "design",
    "sigmoid",
    "trimmed_propensity",
    "newton_update",
    "ridge_fit",
    "pooled_anchor_fits",
    "influence_terms",
    "aipw_terms",
    "influence_jacobian",
    "jacobian_bound",
    "nuisance_variance",
    "newton_noise_cov",
    "cross_fit_variance",
    "weighted_gram_scale",
    "ridge_noise_cov",
    "ridge_noise_input_cov",
    "ate_from_sums",
    "release_sensitivity",
    "ArmModel",
    "ATEResult",
    "FederatedCausalEstimator",
    "CausalConfig",
    "BudgetPlan",
    "plan_budget",
    "propensity_bound",
    "outcome_bound",
    "outcome_grid",
    "outcome_range_from_histogram",
    "outcome_map",
    "arm_from_mapped",
    "influence_bound",
    "influence_weights",
    "influence_clip",
    "influence_relative_weights",
    "psi_square_weight",
    "histogram_sum_squares",
    "INFLUENCE_WEIGHTS",
    "step_bound",
    "moments_bound",
    "moments_carry_arms",
    "lda_start",
    "psi_grid",
    "clip_from_histogram",
    "noise_limited_clip",
    "PSI_SQUARE_GRID",
    "Whitening",
    "whitening_from_moments",
    "DERIVED_OPS",
    "DerivedFeature",
    "parse_derived",
    "derived_bounds",
    "derived_values",
]

#: Propensity trimming band (see module docstring).
TRIM = (0.05, 0.95)
#: default relative weights ``(count, square)`` of the influence release (see :func:`influence_weights`)
INFLUENCE_WEIGHTS = (0.25, 0.5)
#: the psi clip's histogram rule by noise mode (:attr:`CausalConfig.clip_tail` / ``clip_margin``):
#: distributed noise, the edge above which 1% (``psi_tail``) of the people lie, times 2; local
#: noise (8x the count noise variance, and the 1% edge jumped 9-fold from seed to seed at ε = 1),
#: the 5% edge times 5 (docs/causal.md, "The ψ clip under local noise")
DISTRIBUTED_CLIP_MARGIN = 2.0
LOCAL_CLIP_TAIL = 0.05
LOCAL_CLIP_MARGIN = 5.0
#: candidate psi^2 weights of :func:`psi_square_weight` (ascending)
PSI_SQUARE_GRID = np.geomspace(0.02, 2.0, 101)
ESTIMATORS = ("aipw", "ipw", "ra")
Estimator = Literal["aipw", "ipw", "ra"]


# --------------------------------------------------------------------------- derived features
#: Transforms of declared numeric covariates the nuisance models may add as extra design
#: columns (``causal.derived``, e.g. ``["log1p(earnings_1y_ago)", "ratio(weight_kg, height_cm, 2)"]``).
#: Each is a fixed function of the values clipped to their declared bounds, with bounds derived
#: from the declared ones (public), so the column still scales to [-1, 1] and every L2 bound
#: of the protocol is unchanged in form (``p`` counts the derived columns).
#:
#: * ``log1p(v)``  = log(1 + v - lower)           in [0, log(1 + upper - lower)];
#: * ``log(v)``    = log v (needs lower > 0)       in [log lower, log upper];
#: * ``square(v)`` = v^2                           in [min v^2, max v^2] over the bounds;
#: * ``at_min(v)`` = 1 where v <= lower, else 0    in [0, 1] (e.g. zero earnings);
#: * ``at_max(v)`` = 1 where v >= upper, else 0    in [0, 1] (e.g. the top level of a scale);
#: * ``ratio(a, b, k)`` = a / b^k (b's lower bound > 0, k = 1, 2 or 3, default 1) in the range
#:   the declared bounds' corners give (a ratio is monotone in each argument when b > 0); e.g.
#:   body-mass index ``ratio(weight_kg, height_cm, 2)`` (in kg/cm², i.e. BMI / 10^4). Why it
#:   exists: the health simulator's confounding runs through BMI, which no linear model in
#:   weight and height (or in their logs, measured worse) expresses; the pooled non-private
#:   AIPW on raw weight/height is biased by -0.49 SE, with BMI by -0.01 SE (30 seeds,
#:   docs/causal.md).
#:
#: Any of them may carry explicit public bounds, ``op(...)[lower, upper]``, the values being
#: clipped to them (a fixed function: no data enters the bound). Why: the range the declared
#: bounds imply can dwarf the real spread (BMI from weight in [30, 200] kg and height in
#: [130, 210] cm spans 6.8-118), and a column whose spread is a sliver of its bounds is
#: whitened from noisy moments it cannot resolve (measured health, local ε = 0.5: coverage
#: 0.75 with the implied bounds, 0.96 with ``[12e-4, 60e-4]``, i.e. BMI 12-60).
DERIVED_OPS = ("log1p", "log", "square", "at_min", "at_max", "ratio")
_RATIO_POWERS = (1, 2, 3)


@dataclass(frozen=True)
class DerivedFeature:
    """One parsed derived feature: ``op`` applied to declared ``covariates`` (one, or two for
    ``ratio``) with the ratio's ``power``; ``bounds``: explicit public bounds the values are
    clipped to (None: the range the declared bounds imply); ``name``: its column name."""

    op: str
    covariates: tuple[str, ...]
    power: int = 1
    bounds: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        if self.op == "ratio":
            a, b = self.covariates
            return f"ratio({a},{b})" if self.power == 1 else f"ratio({a},{b},{self.power})"
        return f"{self.op}({self.covariates[0]})"


_DERIVED_FORMS = (f"write op(covariate) with op one of {', '.join(DERIVED_OPS[:-1])}, or ratio(a, b[, k]) "
                  "with k in 1, 2, 3, optionally followed by public bounds [lower, upper]")


def _parse_bounds(spec: str, text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"derived feature {spec!r}: bounds must be [lower, upper] numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"derived feature {spec!r}: bounds must be finite with lower < upper")
    return lo, hi


def parse_derived(spec: str) -> DerivedFeature:
    """``"op(name)"`` or ``"ratio(a, b[, k])"``, each optionally followed by ``[lower, upper]``
    -> :class:`DerivedFeature`; ValueError naming the allowed forms otherwise."""
    s = str(spec).strip()
    bounds = None
    if s.endswith("]") and "[" in s:
        s, _, text = s[:-1].rpartition("[")
        s = s.strip()
        bounds = _parse_bounds(spec, text)
    if "(" in s and s.endswith(")"):
        op, inner = s[:-1].split("(", 1)
        op = op.strip()
        args = [a.strip() for a in inner.split(",")]
        if op in DERIVED_OPS and op != "ratio" and len(args) == 1 and args[0]:
            return DerivedFeature(op, (args[0],), bounds=bounds)
        if op == "ratio" and len(args) in (2, 3) and all(args):
            power = 1
            if len(args) == 3:
                try:
                    power = int(args[2])
                except ValueError:
                    power = 0
                if power not in _RATIO_POWERS:
                    raise ValueError(f"derived feature {spec!r}: the ratio's power must be 1, 2 or 3")
            return DerivedFeature(op, (args[0], args[1]), power, bounds)
    raise ValueError(f"derived feature {spec!r}: {_DERIVED_FORMS}")


def derived_bounds(feature: DerivedFeature, bounds: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Public bounds of a derived column: its explicit bounds, else the range the declared
    bounds of its covariate(s) imply. ValueError where the op needs a positive lower bound."""
    op = feature.op
    lo, hi = bounds[0]
    if op == "log" and not lo > 0:
        raise ValueError(f"log needs a covariate whose declared lower bound is > 0 (got {lo})")
    if op == "ratio" and not bounds[1][0] > 0:
        raise ValueError(f"ratio needs a denominator whose declared lower bound is > 0 (got {bounds[1][0]})")
    if feature.bounds is not None:
        return feature.bounds
    if op == "log1p":
        return 0.0, math.log1p(hi - lo)
    if op == "log":
        return math.log(lo), math.log(hi)
    if op == "square":
        top = max(lo * lo, hi * hi)
        bottom = 0.0 if lo <= 0.0 <= hi else min(lo * lo, hi * hi)
        return bottom, top
    if op in ("at_min", "at_max"):
        return 0.0, 1.0
    if op == "ratio":
        blo, bhi = bounds[1]
        corners = [a / b**feature.power for a in (lo, hi) for b in (blo, bhi)]
        return min(corners), max(corners)
    raise ValueError(op)


def derived_values(feature: DerivedFeature, values: Sequence[np.ndarray],
                   bounds: Sequence[tuple[float, float]]) -> np.ndarray:
    """The derived column of raw covariate ``values`` (each clipped to its declared bounds
    first; the result clipped to the feature's explicit bounds when it has them)."""
    v = [np.clip(np.asarray(x, dtype=np.float64), lo, hi) for x, (lo, hi) in zip(values, bounds)]
    op, lo, hi = feature.op, bounds[0][0], bounds[0][1]
    if op == "log1p":
        out = np.log1p(v[0] - lo)
    elif op == "log":
        out = np.log(v[0])
    elif op == "square":
        out = v[0] * v[0]
    elif op == "at_min":
        out = (v[0] <= lo).astype(np.float64)
    elif op == "at_max":
        out = (v[0] >= hi).astype(np.float64)
    elif op == "ratio":
        out = v[0] / v[1] ** feature.power
    else:
        raise ValueError(op)
    if feature.bounds is not None:
        out = np.clip(out, *feature.bounds)
    return out


# --------------------------------------------------------------------------- linear algebra
def vech_len(p: int) -> int:
    return p * (p + 1) // 2


def vech(m: np.ndarray) -> np.ndarray:
    """Upper triangle (with diagonal) of the last two axes, row-major: (..., p, p) -> (..., p(p+1)/2)."""
    p = m.shape[-1]
    iu = np.triu_indices(p)
    return m[..., iu[0], iu[1]]


def unvech(v: np.ndarray, p: int) -> np.ndarray:
    """Symmetric (p, p) matrix from its :func:`vech`."""
    out = np.zeros((p, p))
    iu = np.triu_indices(p)
    out[iu] = v
    out[(iu[1], iu[0])] = v
    return out


def _solve_pd(a: np.ndarray, b: np.ndarray, floor: float) -> np.ndarray:
    """Solve with a symmetric matrix whose eigenvalues are floored (DP noise can break PD)."""
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    w = np.maximum(w, floor)
    return v @ ((v.T @ b) / w if b.ndim == 1 else (v.T @ b) / w[:, None])


def _inv_pd(a: np.ndarray, floor: float) -> np.ndarray:
    return _solve_pd(a, np.eye(a.shape[0]), floor)


def _psd_part(a: np.ndarray) -> np.ndarray:
    """The positive semi-definite part of a (noisy) symmetric matrix: negative eigenvalues set to 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.maximum(w, 0.0)) @ v.T


# --------------------------------------------------------------------------- scaling
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


# --------------------------------------------------------------------------- nuisance fits
def newton_update(beta: np.ndarray, grad_sum: np.ndarray, hess_vech_sum: np.ndarray, *,
                  ridge: float = 0.0, floor: float = 1e-8) -> np.ndarray:
    """One Newton step for (ridge-penalised) logistic regression from summed statistics.

    ``grad_sum = sum (T - e(x)) x`` (log-likelihood gradient), ``hess_vech_sum = vech(sum
    e(1 - e) x x')``. Maximises ``loglik - ridge/2 |beta|^2`` (ridge = 0: plain MLE step).
    """
    p = beta.shape[0]
    h = unvech(hess_vech_sum, p) + ridge * np.eye(p)
    g = grad_sum - ridge * beta
    return beta + _solve_pd(h, g, max(floor, ridge))


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


def _shrinkage(arm: ArmModel) -> float:
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
    coef = _solve_pd(a, xy, max(floor, ridge))
    n = max(float(g[0, 0]), 1.0)
    rss = float(yy - 2 * coef @ xy + coef @ g @ coef)
    resid_var = max(rss / max(n - p, 1.0), 1e-12)
    ainv = _inv_pd(a, max(floor, ridge))
    cov = ainv @ (resid_var * _psd_part(g) + noise_var * np.eye(p)) @ ainv
    arm = ArmModel(coef=coef, gram=g, n=n, resid_var=resid_var, cov=cov, ainv=ainv)
    vg = noise_var if gram_noise_var is None else gram_noise_var
    return replace(arm, noise_cov=ridge_noise_cov(arm, noise_var, gram_noise_var),
                   gram_noise_cov=ridge_noise_cov(arm, 0.0, vg))


def pooled_anchor_fits(gram_vechs: Sequence[np.ndarray], xys: Sequence[np.ndarray], yys: Sequence[float], *,
                       ridge: float, noise_var: float = 0.0, floor: float = 1e-8,
                       gram_noise_var: float | None = None) -> tuple[ArmModel, ArmModel]:
    """Per-arm ridge fits shrunk towards the pooled fit of both arms instead of towards zero.

    The ridge (and the eigenvalue floor a noisy Gram needs) shrinks a coefficient towards its
    anchor. Towards zero it takes the covariates' effect out of the outcome model of the smaller
    arm, and AIPW's bias is the product of that error with the propensity's (finance, local
    ε = 1: the treated arm's DP model carried +0.15 SE of bias with the DP propensity, 0.00 with
    the ε = inf models). Where the arms share how covariates move the outcome, a better anchor
    is the pooled ridge fit of both arms (all the people; the two arms' noise, so its floor is
    sqrt(2) times an arm's): arm a fits ``d_a`` on ``y - X c_pool`` from the same sums (``X'y - G c_pool``, and the
    matching ``y'y``), ``coef_a = c_pool + d_a``, and only the arms' *difference* from the
    pooled model is shrunk. Post-processing of the same release: no data, no budget.

    The covariances are exact for the linear map: with ``A_a = G_a + ridge P`` and ``A_p`` the
    pooled one, ``coef_a = A_a^-1 [(I + N) u_a + N u_b]``, ``N = ridge P A_p^-1``, for the
    per-arm perturbations ``u`` of ``X'y - G coef`` (sampling: ``s^2 G + v I`` as in
    :func:`ridge_fit`; DP noise: :func:`ridge_noise_cov`'s ``S``). Returns ``(arm0, arm1)``.
    The two arms' noises are then correlated (both carry the anchor's); :func:`cross_fit_variance`
    takes each arm's covariance alone, an approximation (coverage stayed >= 0.933 in all 33 cells
    of the 1,000-run benchmark with this anchor).
    With ``ridge`` 0 (no DP) the fits equal :func:`ridge_fit`'s.

    Not the default (``CausalConfig.outcome_anchor``): on the simulators it lowered finance's
    bias by up to 0.23 SE but raised health's by up to 0.18 and widened the local-noise CIs by up
    to a third (docs/causal.md, "What carries the remaining bias").
    """
    p = xys[0].shape[0]
    grams = [unvech(g, p) for g in gram_vechs]
    pen = np.eye(p)
    pen[0, 0] = 0.0
    pool_floor = max(floor * math.sqrt(2.0), ridge)  # the pooled Gram sums two arms' noise
    a_pool = grams[0] + grams[1] + ridge * pen
    c_pool = _solve_pd(a_pool, xys[0] + xys[1], pool_floor)
    n_mat = ridge * pen @ _inv_pd(a_pool, pool_floor)
    m_mat = np.eye(p) + n_mat
    vg = noise_var if gram_noise_var is None else gram_noise_var
    offs, samp, nois, gnois = [], [], [], []
    for g_vech, g, xy, yy in zip(gram_vechs, grams, xys, yys):
        off = ridge_fit(g_vech, xy - g @ c_pool, float(yy - 2 * c_pool @ xy + c_pool @ g @ c_pool),
                        ridge=ridge, noise_var=noise_var, floor=floor, gram_noise_var=gram_noise_var)
        c = c_pool + off.coef
        samp.append(off.resid_var * _psd_part(g) + noise_var * np.eye(p))
        nois.append(ridge_noise_input_cov(c, noise_var, gram_noise_var))
        gnois.append(ridge_noise_input_cov(c, 0.0, vg))
        offs.append(replace(off, coef=c))
    out = []
    for a, b in ((0, 1), (1, 0)):
        ainv = offs[a].ainv
        assert ainv is not None
        cov, noise_cov, gram_noise_cov = (ainv @ (m_mat @ s[a] @ m_mat.T + n_mat @ s[b] @ n_mat.T) @ ainv.T
                                          for s in (samp, nois, gnois))
        out.append(replace(offs[a], cov=cov, noise_cov=noise_cov, gram_noise_cov=gram_noise_cov))
    return out[0], out[1]


# --------------------------------------------------------------------------- influence terms
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


def influence_jacobian(x: np.ndarray, t: np.ndarray, y: np.ndarray, *, estimator: str,
                       prop_coef: np.ndarray | None, coef1: np.ndarray | None, coef0: np.ndarray | None,
                       trim: tuple[float, float] = TRIM) -> np.ndarray:
    """Per-person derivative of psi with respect to the nuisance coefficients, (n, k).

    aipw: ``[d psi/d beta, d psi/d coef1, d psi/d coef0]`` (k = 3p); ipw: ``d psi/d beta`` (k = p).
    With e = sigmoid(x' beta) (0 where trimmed: the trimmed e does not move), mu_t = x' coef_t
    (0 where clipped at +-1):

    * ``d psi/d beta  = -[T (y - mu1)(1 - e)/e + (1 - T)(y - mu0) e/(1 - e)] x``
    * ``d psi/d coef1 = (1 - T/e) x``,  ``d psi/d coef0 = ((1 - T)/(1 - e) - 1) x``.

    Their sum over people, J, turns the (public) covariance of the DP noise in the fitted
    nuisances into the variance it adds to the ATE: ``J Cov(theta) J' / N^2`` (delta method).
    """
    t = np.asarray(t, dtype=np.float64)
    lin = x @ prop_coef
    e_raw = sigmoid(lin)
    e = np.clip(e_raw, trim[0], trim[1])
    inside = ((e_raw > trim[0]) & (e_raw < trim[1])).astype(np.float64)
    if estimator == "ipw":
        db = -(t * y * (1 - e) / e + (1 - t) * y * e / (1 - e)) * inside
        return db[:, None] * x
    if estimator != "aipw":
        raise ValueError(f"no nuisance Jacobian for estimator {estimator!r}")
    l1, l0 = x @ coef1, x @ coef0
    m1, m0 = np.clip(l1, -1.0, 1.0), np.clip(l0, -1.0, 1.0)
    db = -(t * (y - m1) * (1 - e) / e + (1 - t) * (y - m0) * e / (1 - e)) * inside
    d1 = (1 - t / e) * (np.abs(l1) < 1.0)
    d0 = ((1 - t) / (1 - e) - 1) * (np.abs(l0) < 1.0)
    return np.hstack([db[:, None] * x, d1[:, None] * x, d0[:, None] * x])


def jacobian_bound(r2: float, k: float) -> float:
    """Public L2 clip of one person's Jacobian row: ``k * sqrt(r2)`` (``k`` = ``jacobian_k`` of
    the config). Clipping the few people with extreme weights only perturbs a variance term;
    the release's sensitivity is this bound whatever the data."""
    return k * math.sqrt(r2)


def nuisance_variance(jac: np.ndarray, covs: Sequence[np.ndarray], n: float, *,
                      jac_noise_var: float = 0.0, floor: bool = True) -> float:
    """Variance the DP noise in the nuisance fits adds to ATE = mean psi (scaled units).

    ``jac`` is the (noisy) summed Jacobian, blocks in the order of ``covs`` (the nuisance noise
    covariances). ``E[J' C J]`` over the Jacobian's own DP noise (variance ``jac_noise_var``
    per coordinate) is ``J' C J + jac_noise_var tr(C)``: that term is removed (unbiased), and
    the result floored at 0.
    """
    out, i = 0.0, 0
    for c in covs:
        k = c.shape[0]
        j = np.asarray(jac[i:i + k], dtype=np.float64)
        out += float(j @ c @ j) - jac_noise_var * float(np.trace(c))
        i += k
    return (max(out, 0.0) if floor else out) / max(n, 1.0) ** 2


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
    g0, g1 = k_scale * _psd_part(arm0.gram), k_scale * _psd_part(arm1.gram)
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


def newton_noise_cov(prev_cov: np.ndarray, hess_vech_sum: np.ndarray, noise_var: float, *,
                     ridge: float = 0.0, floor: float = 1e-8) -> np.ndarray:
    """Covariance of the DP noise carried by beta after one :func:`newton_update` step.

    beta_new - beta_exact ~= M (beta - beta_exact) + H^-1 eta with eta the gradient's noise
    (variance ``noise_var`` per coordinate), ``H`` the floored (noisy) Hessian the step used and
    ``M = I - H^-1 H_raw`` (0 where the floor does not bind: Newton forgets earlier noise).
    The Hessian's own noise is second order at convergence and left out."""
    p = prev_cov.shape[0]
    h_raw = unvech(hess_vech_sum, p) + ridge * np.eye(p)
    hinv = _inv_pd(h_raw, max(floor, ridge))
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


def psi_worst_case(estimator: str, trim: tuple[float, float] = TRIM) -> float:
    """Largest |psi| the scaled outcome and the trimming band allow (no data involved)."""
    w = 1.0 / min(trim[0], 1.0 - trim[1])
    if estimator == "ra":
        return 2.0
    if estimator == "ipw":
        return w
    return 2.0 + 2.0 * w


# --------------------------------------------------------------------------- ATE from sums
@dataclass(frozen=True)
class ATEResult:
    """ATE in the outcome's units with its standard error and the parts of its variance."""

    ate: float
    se: float
    n: float
    sampling_var: float
    noise_var: float
    #: variance the DP noise in the nuisance fits adds (delta method, :func:`nuisance_variance`)
    nuisance_var: float = 0.0
    #: SD that the DP noise on the psi^2 sum puts on ``sampling_var`` (public: from the noise
    #: variance alone). Where it exceeds ``sampling_var`` the sampling part is mostly noise
    #: (many items with local noise) and the SE rests on ``noise_var`` + ``nuisance_var``.
    sampling_var_noise_sd: float = 0.0

    def interval(self, alpha: float = 0.05) -> tuple[float, float]:
        z = float(norm.ppf(1 - alpha / 2))
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


# --------------------------------------------------------------------------- the estimator
@dataclass
class FederatedCausalEstimator:
    """ATE / CATE for one binary treatment from released statistics (EconML-like API).

    ``fit`` takes the fitted nuisances and the summed influence terms; ``effect(X)`` is the
    linear CATE ``(coef1 - coef0)' x`` (difference of the per-arm ridge models) in outcome
    units; ``effect_interval`` its pointwise CI from the models' covariances; ``ate`` /
    ``ate_interval`` / ``ate_stderr`` the chosen estimator's ATE.
    """

    covariate_bounds: Sequence[tuple[float, float]]
    outcome_bounds: tuple[float, float]
    estimator: str = "aipw"
    trim: tuple[float, float] = TRIM
    prop_coef: np.ndarray | None = None
    arm1: ArmModel | None = None
    arm0: ArmModel | None = None
    result: ATEResult | None = None
    whitening: Whitening | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return half_range(self.outcome_bounds)

    def fit(self, *, prop_coef: np.ndarray | None, arm1: ArmModel | None, arm0: ArmModel | None,
            sums: Mapping[str, float] | None = None, noise: Mapping[str, float] | None = None,
            ) -> FederatedCausalEstimator:
        """Store the nuisances and compute the ATE.

        ``sums``: ``{"n", "psi", "psi2"}`` summed influence terms (aipw/ipw) with their noise
        variances ``noise`` (same keys). For ``ra`` the ATE comes from the arm models and the
        covariate mean (first row of the pooled Gram): no influence-term release is needed.
        """
        self.prop_coef, self.arm1, self.arm0 = prop_coef, arm1, arm0
        noise = dict(noise or {})
        if self.estimator == "ra":
            assert arm1 is not None and arm0 is not None
            gram = arm1.gram + arm0.gram
            n = max(gram[0, 0], 1.0)
            xbar = gram[0] / n
            diff = arm1.coef - arm0.coef
            ate = float(xbar @ diff)
            # heterogeneity of tau(x) across people + coefficient uncertainty (+ noise in xbar)
            second = gram / n
            var_tau = max(float(diff @ second @ diff) - ate**2, 0.0)
            coef_var = float(xbar @ (arm1.total_cov + arm0.total_cov) @ xbar)
            noise_x = float(noise.get("gram", 0.0)) * float(diff @ diff) / n**2
            sampling = var_tau / n + coef_var
            self.result = ATEResult(ate=self.scale * ate, se=self.scale * math.sqrt(sampling + noise_x), n=n,
                                    sampling_var=self.scale**2 * sampling, noise_var=self.scale**2 * noise_x)
        else:
            if sums is None:
                raise ValueError(f"{self.estimator} needs the summed influence terms")
            self.result = ate_from_sums(sums["n"], sums["psi"], sums["psi2"], v_n=noise.get("n", 0.0),
                                        v_psi=noise.get("psi", 0.0), v_psi2=noise.get("psi2", 0.0),
                                        scale=self.scale, v_nuisance=noise.get("nuisance", 0.0))
        return self

    # ---- ATE
    def ate(self) -> float:
        assert self.result is not None, "call fit() first"
        return self.result.ate

    def ate_stderr(self) -> float:
        assert self.result is not None, "call fit() first"
        return self.result.se

    def ate_interval(self, alpha: float = 0.05) -> tuple[float, float]:
        assert self.result is not None, "call fit() first"
        return self.result.interval(alpha)

    # ---- CATE (linear in covariates)
    def _rows(self, X: np.ndarray) -> np.ndarray:
        x = design(scale_covariates(np.atleast_2d(X), self.covariate_bounds))
        return x if self.whitening is None else self.whitening.apply(x)

    def _coef(self) -> np.ndarray:
        if self.arm1 is None or self.arm0 is None:
            raise ValueError(f"the {self.estimator} estimator fits no outcome models: no CATE")
        return self.scale * (self.arm1.coef - self.arm0.coef)

    def cate_coef(self) -> np.ndarray:
        """CATE coefficients on the bound-scaled design (intercept first), outcome units
        (the linear map; exact for everyone with weighted fits, else for people inside the
        whitening radius)."""
        c = self._coef()
        return c if self.whitening is None else self.whitening.linear_coef(c)

    def cate_shrinkage(self) -> float:
        """How much of the arm models the ridge and the eigenvalue floor take: ``tr(I - A^-1 G) / p``
        for each arm (``A`` the floored, ridged Gram the fit inverted, ``G`` the released one; 0
        without DP, 1 when the floor swamps the Gram), the larger of the two. Post-processing of
        released Grams: no budget. The CATE's intervals carry the noise, not this shrinkage's
        bias; in the simulators they under-cover where it is above about 0.8 (small federations,
        many items per run, small ε; docs/causal.md "CATE coverage")."""
        if self.arm1 is None or self.arm0 is None:
            raise ValueError(f"the {self.estimator} estimator fits no outcome models: no CATE")
        return max(_shrinkage(arm) for arm in (self.arm1, self.arm0))

    def cate_cov(self, part: str = "total_cov") -> np.ndarray:
        """Covariance of :meth:`cate_coef` (outcome units squared, bound-scaled design): the two
        arm models' ``total_cov`` (sampling, X'y noise and the Gram's noise), as
        :meth:`effect_interval` uses. With it, anyone holding ``cate_coef`` gets the same
        pointwise CI as ``effect_interval``: ``x' C x`` for a bound-scaled design row x.
        ``part``: another :class:`ArmModel` covariance mapped the same way (``"noise_cov"``,
        ``"gram_noise_cov"``: the DP noise alone, as benchmarks/cate_coverage.py measures it;
        an arm without it counts 0)."""
        if self.arm1 is None or self.arm0 is None:
            raise ValueError(f"the {self.estimator} estimator fits no outcome models: no CATE")
        parts = [getattr(arm, part) for arm in (self.arm1, self.arm0)]
        c = self.scale**2 * sum(np.zeros_like(self.arm1.cov) if v is None else v for v in parts)
        if self.whitening is None:
            return c
        m = self.whitening.linear_map()
        return m @ c @ m.T

    def effect(self, X: np.ndarray) -> np.ndarray:
        """tau(x) for raw covariate rows X (columns in ``study.design_columns()`` order)."""
        return self._rows(X) @ self._coef()

    def effect_interval(self, X: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        assert self.arm1 is not None and self.arm0 is not None
        x = self._rows(X)
        cov = self.arm1.total_cov + self.arm0.total_cov
        se = self.scale * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, cov, x), 0.0))
        z = float(norm.ppf(1 - alpha / 2))
        tau = x @ self._coef()
        return tau - z * se, tau + z * se


# --------------------------------------------------------------------------- config and budget
#: Newton steps without DP (ε = inf): enough for the fit to converge to machine precision
NEWTON_STEPS_NO_DP = 8


def _flat_auto(value: float | None) -> float:
    """A knob whose None means automatic, as a run-config number: -1.0 for None
    (:meth:`CausalConfig.from_flat` reads it back as None: any value <= 0, or < 0 for the
    ridge, where 0 is a setting)."""
    return -1.0 if value is None else float(value)


@dataclass(frozen=True)
class CausalConfig:
    """Knobs of one causal-estimation run (carried in run config keys ``causal.*`` and in the
    step messages' ConfigRecords).

    ``epsilon``/``delta``: the run's total per institution (``inf`` = DP off, simulations only).
    ``shares``: the split of the run's budget across steps, as fractions of the Gaussian
    "privacy loss" 1/sigma^2 (Gaussian releases compose by adding 1/sigma^2, so a step with
    share w gets sigma_step = sigma / sqrt(w)); the propensity share is split evenly over the
    Newton steps; shares of steps an estimator does not run are renormalised away.
    ``psi_clip``: |psi| bound in scaled outcome units (None = automatic: from the DP |psi|
    histogram of the ``scale`` step, ``psi_clip_tail`` / ``psi_clip_margin`` (:attr:`clip_tail`,
    :attr:`clip_margin`: by noise mode unless set) / ``psi_tail`` / ``psi_noise_ratio``;
    the worst case when DP is off).
    ``ridge``: ridge penalty of the nuisance fits (None = automatic: 0 without DP, else the
    noise sd of a released Gram coordinate x sqrt(p)).
    ``floor_k`` / ``newton_floor_k``: eigenvalue floor of the noisy Grams / Newton Hessians =
    that multiple of the spectral norm of their noise; ``outcome_ridge_k``: outcome ridge = outcome_ridge_k x 2 x the spectral norm of the
    noise on X'y (equal to the Gram's when ``gram_weight`` is 1).
    ``whiten_weighted``: bound the whitened design by fit weights instead of clipping features
    (:class:`Whitening`); ``derived``: extra nuisance features ``op(covariate)`` (``DERIVED_OPS``).
    ``nuisance_variance``: add to the AIPW variance what the DP noise in the nuisance fits adds
    (:func:`cross_fit_variance`, post-processing of public quantities, no release).
    ``share_jacobian`` > 0 adds the optional ``jacobian`` release (per-person d psi / d nuisance,
    clipped to ``jacobian_k * sqrt(r2)``) for the first-order terms of that variance; off by
    default: at 2,500 people per institution its DP noise swamps the signal (docs/causal.md).
    """

    estimator: str = "aipw"
    epsilon: float = 1.0
    delta: float = 1e-5
    items: tuple[str, ...] = ()
    covariates: tuple[str, ...] | None = None
    derived: tuple[str, ...] = ()
    #: Newton steps of the propensity fit under DP (one release each); from the LDA start two
    #: reach what four from zero did (docs/causal.md). Without DP (ε = inf) the fit runs at least
    #: :data:`NEWTON_STEPS_NO_DP`, which costs nothing (:attr:`newton_count`)
    newton_steps: int = 2
    #: fraction of ``share_propensity`` the last Newton step gets (the rest split evenly over the
    #: earlier ones; 0: every step the same). Newton forgets the earlier steps' gradient noise
    #: (``newton_noise_cov``), so the last step's noise is what the fitted beta carries; from the
    #: LDA start the first step has little left to do (docs/causal.md). Default 0.65.
    newton_last: float = 0.65
    #: where Newton starts: "lda" (default; :func:`lda_start` from per-item arm sums the
    #: ``moments`` release then carries) or "zero" (the moments release stays ``vech(x x')``)
    propensity_start: str = "lda"
    share_moments: float = 0.10
    share_propensity: float = 0.175
    share_outcome: float = 0.25
    share_influence: float = 0.40
    share_scale: float = 0.06
    #: share of the ``outcome-range`` step (aipw/ra under DP; 0: off, the outcome models are
    #: fitted on the declared bounds): a DP histogram of the scaled outcome from which the
    #: server picks the interval the outcome models are fitted on (:func:`outcome_range_from_histogram`)
    share_outcome_range: float = 0.03
    #: fraction of people each side of that interval (before the margin) and its widening
    outcome_range_tail: float = 0.005
    outcome_range_margin: float = 1.25
    #: ratio of consecutive edges of the public signed outcome grid (:func:`outcome_grid`)
    outcome_grid_factor: float = 2.0 ** 0.5
    share_jacobian: float = 0.0
    jacobian_k: float = 4.0
    nuisance_variance: bool = True
    #: fraction of people above the |psi| histogram edge from which the noise-limited rule
    #: estimates sum(psi^2) (:func:`histogram_sum_squares`)
    psi_tail: float = 0.01
    #: the clip is ``clip_margin`` x the edge above which at most ``clip_tail`` of the people lie.
    #: None = by noise mode (:attr:`clip_tail`, :attr:`clip_margin`): 1% and 2 with distributed
    #: noise; 5% and 5 with local noise, whose 1% edge is not resolvable at ε <= 1 (the count
    #: noise summed over the bins above it is as large as the 1% it is compared with)
    psi_clip_tail: float | None = None
    psi_clip_margin: float | None = None
    #: ratio of consecutive edges of the public |psi| grid of the ``scale`` histogram
    psi_grid_factor: float = 2.0
    #: the psi clip is raised (never lowered) until the influence-sum noise is this fraction of
    #: the sampling SD (:func:`noise_limited_clip`; 0: off): at large ε it removes clipping bias
    #: for at most sqrt(1 + ratio^2) - 1 more SE; at ε <= 1 it does not bind. 0.40 (1,000 runs
    #: per cell against 0.45: ε >= 2 CIs 1-2% narrower, same biases, coverage 33/33; at 0.35 the
    #: clip bias starts to return, education distributed ε = 2 -0.03 -> -0.07 SE; docs/causal.md)
    psi_noise_ratio: float = 0.40
    #: the weight of the psi^2 coordinate of the influence release is the smallest that keeps
    #: the noise on ``sum psi^2`` (which sets the SE's sampling part) within this fraction of the
    #: psi sum's variance (:func:`psi_square_weight`); 0: the fixed weight ``INFLUENCE_WEIGHTS[1]``
    psi_square_error: float = 0.2
    #: relative weight of the count coordinate of the influence release (:func:`influence_weights`);
    #: its noise only enters through ATE x the count's relative error (:func:`ate_from_sums`)
    influence_count_weight: float = 0.05
    #: weight of the Hessian coordinates in each Newton release ``[g, h vech(H)]`` (the server
    #: divides it out): < 1 moves noise from the gradient, which sets the fitted beta, to the
    #: Hessian, which only sets the step (docs/causal.md)
    hessian_weight: float = 1.0
    #: weight of the Gram coordinates in the outcome release ``[g vech(G), X'y, y'y]``: the
    #: coefficients' noise is mostly X'y's when they are small (:func:`ridge_noise_cov`).
    #: None (default): :func:`auto_gram_weight` after the propensity steps (public post-processing)
    gram_weight: float | None = None
    #: lowest automatic Gram weight, and the largest Gram-noise eigenvalue floor it may cause as
    #: a multiple of the fitted propensity Hessian's intercept entry (about the smaller arm's size
    #: times the mean e(1-e)): the floor is a shrinkage the SE does not carry (docs/causal.md)
    gram_weight_min: float = 0.3
    gram_floor_ratio: float = 1.0
    whiten_radius: float | None = None
    whiten_mode: str = "diag"
    whiten_weighted: bool = True
    psi_clip: float | None = None
    ridge: float | None = None
    floor_k: float = 1.0
    #: eigenvalue floor of the noisy Newton Hessians, in the same units as ``floor_k`` (which
    #: the Grams use). Both 1 (were 2) since the outcome models fit the ``outcome-range``
    #: interval: with accurate outcome models what is left of the small-ε bias is the floors'
    #: shrinkage of the nuisances (finance local ε = 1: +0.61 SE of nuisance bias with both at
    #: 2, +0.33 with the Newton floor at 1, +0.25 with both; docs/causal.md)
    newton_floor_k: float = 1.0
    outcome_ridge_k: float = 1.0
    #: what the outcome ridge shrinks each arm's coefficients towards: "pooled" (the ridge fit of
    #: both arms together; only the arms' difference is shrunk, :func:`pooled_anchor_fits`) or
    #: "zero" (each arm on its own, the earlier rule)
    outcome_anchor: str = "zero"
    trim: tuple[float, float] = TRIM
    noise_mode: str = "local"
    #: distributed noise: survivors each client's σ²/n_min share rests on (0 = automatic: the
    #: institutions minus the dropouts the secure sum tolerates; resolved where the federation's
    #: size is known, :meth:`resolved`)
    n_min: int = 0
    accountant: str = "prv"
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r}: use one of {', '.join(ESTIMATORS)}")
        if not self.epsilon > 0:
            raise ValueError("epsilon must be > 0 (inf turns DP off)")
        for spec in self.derived:
            parse_derived(spec)
        if self.newton_steps < 1:
            raise ValueError("newton_steps must be >= 1")
        if not 0.0 <= self.newton_last < 1.0:
            raise ValueError("newton_last must be in [0, 1) (0: an even split)")
        if min(self.share_moments, self.share_propensity, self.share_outcome, self.share_influence,
               self.share_scale, self.share_jacobian, self.share_outcome_range) < 0:
            raise ValueError("budget shares must be >= 0")
        for name in ("hessian_weight", "gram_weight", "gram_weight_min", "gram_floor_ratio"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite, got {v}")
        if not self.psi_grid_factor > 1.0:
            raise ValueError(f"psi_grid_factor must be > 1, got {self.psi_grid_factor}")
        if not self.outcome_grid_factor > 1.0:
            raise ValueError(f"outcome_grid_factor must be > 1, got {self.outcome_grid_factor}")
        if not (self.psi_square_error >= 0 and math.isfinite(self.psi_square_error)):
            raise ValueError(f"psi_square_error must be >= 0 and finite (0: fixed weight), got {self.psi_square_error}")
        if not (self.influence_count_weight > 0 and math.isfinite(self.influence_count_weight)):
            raise ValueError(f"influence_count_weight must be positive and finite, got {self.influence_count_weight}")
        if not (self.psi_noise_ratio >= 0 and math.isfinite(self.psi_noise_ratio)):
            raise ValueError(f"psi_noise_ratio must be >= 0 and finite (0: off), got {self.psi_noise_ratio}")
        lo, hi = self.trim
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"trim must be 0 < trim-low < trim-high < 1, got {self.trim}")
        for name, ok, rule in (("delta", 0.0 < self.delta < 1.0, "in (0, 1)"),
                               ("alpha", 0.0 < self.alpha < 1.0, "in (0, 1)"),
                               ("psi_tail", 0.0 < self.psi_tail < 1.0, "in (0, 1)"),
                               ("psi_clip_tail", self.psi_clip_tail is None or 0.0 < self.psi_clip_tail < 1.0,
                                "in (0, 1)"),
                               ("psi_clip_margin", self.psi_clip_margin is None or self.psi_clip_margin > 0, "> 0"),
                               ("outcome_range_tail", 0.0 < self.outcome_range_tail < 0.5, "in (0, 0.5)"),
                               ("outcome_range_margin", self.outcome_range_margin >= 1.0, ">= 1"),
                               ("jacobian_k", self.jacobian_k > 0, "> 0"),
                               ("floor_k", self.floor_k >= 0, ">= 0"),
                               ("newton_floor_k", self.newton_floor_k >= 0, ">= 0"),
                               ("outcome_ridge_k", self.outcome_ridge_k >= 0, ">= 0"),
                               ("n_min", self.n_min >= 0, ">= 0 (0: automatic)")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        for name, allowed in (("noise_mode", ("local", "distributed")), ("accountant", ("prv", "rdp")),
                              ("whiten_mode", ("diag", "full")), ("propensity_start", ("lda", "zero")),
                              ("outcome_anchor", ("pooled", "zero"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: use one of {', '.join(allowed)}")

    @property
    def dp(self) -> bool:
        return math.isfinite(self.epsilon)

    def resolved(self, automatic_n_min: int) -> "CausalConfig":
        """This config with an automatic ``n_min`` (0) replaced by ``automatic_n_min``."""
        import dataclasses

        return self if self.n_min else dataclasses.replace(self, n_min=max(1, int(automatic_n_min)))

    @property
    def clip_tail(self) -> float:
        """The tail fraction of the psi clip's histogram edge: the config's, else by noise mode
        (:attr:`psi_clip_tail`)."""
        if self.psi_clip_tail is not None:
            return self.psi_clip_tail
        return LOCAL_CLIP_TAIL if self.noise_mode == "local" else self.psi_tail

    @property
    def clip_margin(self) -> float:
        """The psi clip as a multiple of that edge: the config's, else by noise mode."""
        if self.psi_clip_margin is not None:
            return self.psi_clip_margin
        return LOCAL_CLIP_MARGIN if self.noise_mode == "local" else DISTRIBUTED_CLIP_MARGIN

    @property
    def radius_factor(self) -> float | None:
        """Whitening radius / sqrt(d): the config's, else 1.0 with weighted fits (the default;
        measured on the three simulators, docs/causal.md) and, for clipped features
        (``whiten_weighted=False``), 1.0 up to ε = 2 and 1.5 above (a smaller radius clips more
        people's features — a model change, more bias — but lowers the sensitivity).
        None: DP off."""
        if not self.dp:
            return None
        if self.whiten_radius is not None:
            return self.whiten_radius
        if self.weighted_fits:
            return 1.0
        return 1.0 if self.epsilon <= 2.0 else 1.5

    @property
    def weighted_fits(self) -> bool:
        """Whether the nuisance fits use radius weights (``whiten_weighted``) rather than
        clipped features. Not for ``ra``: its ATE averages the arm models over the released
        Gram's covariate mean, which weights would tilt."""
        return bool(self.whiten_weighted) and self.estimator != "ra"

    def steps(self) -> list[str]:
        """The releases of one run, in order (``propensity:k`` per Newton step)."""
        prop = [f"propensity:{k}" for k in range(1, self.newton_count + 1)]
        # "outcome-range" only under DP: without noise the declared bounds cost nothing
        rng = ["outcome-range"] if self.dp and self.share_outcome_range > 0 else []
        if self.estimator == "ra":
            return ["moments"] + rng + ["outcome"]
        # "jacobian" (sums of d psi / d nuisance, for the nuisance-noise variance) only under DP:
        # without noise the nuisances carry no DP noise to propagate
        jac = ["jacobian"] if self.dp and self.share_jacobian > 0 else []
        if self.estimator == "ipw":
            return ["moments"] + prop + ["scale"] + jac + ["influence"]
        return ["moments"] + prop + rng + ["outcome", "scale"] + jac + ["influence"]

    @property
    def newton_count(self) -> int:
        """Newton steps this run takes: ``newton_steps`` under DP, at least
        :data:`NEWTON_STEPS_NO_DP` without (no release costs budget; the fit converges)."""
        return self.newton_steps if self.dp else max(self.newton_steps, NEWTON_STEPS_NO_DP)

    def _newton_fraction(self, k: int) -> float:
        """Fraction of the propensity share that Newton step k (1-based) gets."""
        n = self.newton_count
        if not self.newton_last or n == 1:
            return 1.0 / n
        return self.newton_last if k == n else (1.0 - self.newton_last) / (n - 1)

    def step_shares(self) -> dict[str, float]:
        raw = {}
        for s in self.steps():
            if s == "moments":
                raw[s] = self.share_moments
            elif s.startswith("propensity"):
                raw[s] = self.share_propensity * self._newton_fraction(int(s.split(":")[1]))
            elif s == "outcome":
                raw[s] = self.share_outcome
            elif s == "scale":
                raw[s] = self.share_scale
            elif s == "outcome-range":
                raw[s] = self.share_outcome_range
            elif s == "jacobian":
                raw[s] = self.share_jacobian
            else:
                raw[s] = self.share_influence
        tot = sum(raw.values())
        if tot <= 0:
            raise ValueError("the budget shares of the steps this estimator runs sum to 0")
        return {k: v / tot for k, v in raw.items()}

    def to_flat(self) -> dict[str, object]:
        import json

        return {
            "causal.estimator": self.estimator, "causal.epsilon": float(self.epsilon), "causal.delta": self.delta,
            "causal.items": json.dumps(list(self.items)),
            "causal.covariates": json.dumps(None if self.covariates is None else list(self.covariates)),
            "causal.derived": json.dumps(list(self.derived)),
            "causal.newton-steps": self.newton_steps,
            "causal.newton-last": float(self.newton_last),
            "causal.propensity-start": self.propensity_start,
            "causal.outcome-anchor": self.outcome_anchor,
            "causal.share-moments": self.share_moments,
            "causal.whiten-radius": _flat_auto(self.whiten_radius),
            "causal.share-propensity": self.share_propensity,
            "causal.share-scale": self.share_scale, "causal.psi-tail": self.psi_tail,
            "causal.share-outcome-range": self.share_outcome_range,
            "causal.outcome-range-tail": self.outcome_range_tail,
            "causal.outcome-range-margin": self.outcome_range_margin,
            "causal.outcome-grid-factor": self.outcome_grid_factor,
            "causal.share-jacobian": self.share_jacobian, "causal.jacobian-k": self.jacobian_k,
            "causal.nuisance-variance": bool(self.nuisance_variance),
            "causal.psi-clip-margin": _flat_auto(self.psi_clip_margin),
            "causal.psi-clip-tail": _flat_auto(self.psi_clip_tail),
            "causal.whiten-mode": self.whiten_mode,
            "causal.psi-grid-factor": self.psi_grid_factor, "causal.hessian-weight": self.hessian_weight,
            "causal.psi-noise-ratio": self.psi_noise_ratio,
            "causal.psi-square-error": self.psi_square_error,
            "causal.influence-count-weight": self.influence_count_weight,
            "causal.gram-weight": _flat_auto(self.gram_weight),
            "causal.gram-weight-min": self.gram_weight_min, "causal.gram-floor-ratio": self.gram_floor_ratio,
            "causal.whiten-weighted": bool(self.whiten_weighted),
            "causal.share-outcome": self.share_outcome, "causal.share-influence": self.share_influence,
            "causal.psi-clip": _flat_auto(self.psi_clip),
            "causal.ridge": _flat_auto(self.ridge),
            "causal.floor-k": self.floor_k, "causal.outcome-ridge-k": self.outcome_ridge_k,
            "causal.newton-floor-k": self.newton_floor_k,
            "causal.trim-low": self.trim[0], "causal.trim-high": self.trim[1],
            "causal.noise-mode": self.noise_mode, "causal.n-min": self.n_min,
            "causal.accountant": self.accountant, "causal.alpha": self.alpha,
        }

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> CausalConfig:
        import json

        d = {k[len("causal."):]: v for k, v in flat.items() if k.startswith("causal.")}
        kw: dict = {}
        if "estimator" in d:
            kw["estimator"] = str(d["estimator"])
        for key, attr in (("epsilon", "epsilon"), ("delta", "delta"), ("share-propensity", "share_propensity"),
                          ("share-moments", "share_moments"),
                          ("share-scale", "share_scale"), ("psi-tail", "psi_tail"),
                          ("share-outcome-range", "share_outcome_range"),
                          ("outcome-range-tail", "outcome_range_tail"),
                          ("outcome-range-margin", "outcome_range_margin"),
                          ("outcome-grid-factor", "outcome_grid_factor"),
                          ("share-jacobian", "share_jacobian"), ("jacobian-k", "jacobian_k"),
                          ("share-outcome", "share_outcome"), ("share-influence", "share_influence"),
                          ("alpha", "alpha"), ("floor-k", "floor_k"), ("newton-floor-k", "newton_floor_k"),
                          ("outcome-ridge-k", "outcome_ridge_k"), ("psi-grid-factor", "psi_grid_factor"),
                          ("psi-noise-ratio", "psi_noise_ratio"),
                          ("psi-square-error", "psi_square_error"),
                          ("influence-count-weight", "influence_count_weight"),
                          ("hessian-weight", "hessian_weight"), ("gram-weight-min", "gram_weight_min"),
                          ("gram-floor-ratio", "gram_floor_ratio")):
            if key in d:
                kw[attr] = float(d[key])  # type: ignore[arg-type]
        for key, attr in (("newton-steps", "newton_steps"), ("n-min", "n_min")):
            if key in d:
                kw[attr] = int(d[key])  # type: ignore[arg-type]
        if "items" in d:
            kw["items"] = tuple(json.loads(str(d["items"])))
        if "covariates" in d:
            cov = json.loads(str(d["covariates"]))
            kw["covariates"] = None if cov is None else tuple(cov)
        if "whiten-weighted" in d:
            v = d["whiten-weighted"]
            kw["whiten_weighted"] = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        if "derived" in d:
            kw["derived"] = tuple(json.loads(str(d["derived"])) or ())
        if "nuisance-variance" in d:
            v = d["nuisance-variance"]
            kw["nuisance_variance"] = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        for key, attr in (("psi-clip-margin", "psi_clip_margin"), ("psi-clip-tail", "psi_clip_tail"),
                          ("psi-clip", "psi_clip"), ("gram-weight", "gram_weight"),
                          ("whiten-radius", "whiten_radius")):
            if key in d:  # <= 0: automatic (by noise mode, ε or data; see the field)
                v = float(d[key])  # type: ignore[arg-type]
                kw[attr] = None if v <= 0 else v
        if "newton-last" in d:
            kw["newton_last"] = max(float(d["newton-last"]), 0.0)  # type: ignore[arg-type]
        if "ridge" in d:
            v = float(d["ridge"])  # type: ignore[arg-type]
            kw["ridge"] = None if v < 0 else v
        if "trim-low" in d or "trim-high" in d:
            kw["trim"] = (float(d.get("trim-low", TRIM[0])), float(d.get("trim-high", TRIM[1])))  # type: ignore[arg-type]
        for key, attr in (("noise-mode", "noise_mode"), ("accountant", "accountant"), ("whiten-mode", "whiten_mode"),
                          ("propensity-start", "propensity_start"), ("outcome-anchor", "outcome_anchor")):
            if key in d:
                kw[attr] = str(d[key])
        return cls(**kw)


@dataclass(frozen=True)
class BudgetPlan:
    """Noise multiplier per step (0 = DP off) and what the run spends in all."""

    sigma: dict[str, float]
    shares: dict[str, float]
    epsilon: float
    delta: float

    def events(self) -> list:
        from fedrec.common.privacy.accountant import GaussianEvent

        return [GaussianEvent(noise_multiplier=s) for s in self.sigma.values() if s > 0]

    def step_epsilon(self, accountant: str = "prv") -> dict[str, float]:
        """ε of each step alone (for the report; the run's total is their composition)."""
        from fedrec.common.privacy.accountant import GaussianEvent, epsilon_for

        if not math.isfinite(self.epsilon):
            return {k: math.inf for k in self.sigma}
        return {k: epsilon_for([GaussianEvent(noise_multiplier=s)], delta=self.delta, accountant=accountant)
                for k, s in self.sigma.items()}


def plan_budget(cfg: CausalConfig) -> BudgetPlan:
    """Calibrate one sigma so that the run's steps (sigma / sqrt(share) each) compose to the
    target ε at δ under the ledger's accountant; DP off (ε = inf) gives sigma 0 everywhere."""
    shares = cfg.step_shares()
    if not cfg.dp:
        return BudgetPlan({k: 0.0 for k in shares}, shares, math.inf, cfg.delta)
    from fedrec.common.privacy.accountant import GaussianEvent, calibrate_for_events

    used = {k: w for k, w in shares.items() if w > 0}
    if len(used) != len(shares):
        raise ValueError(f"every step needs a budget share > 0, got {shares}")
    sigma = _calibrate_cached(tuple(sorted(used.items())), float(cfg.epsilon), float(cfg.delta), cfg.accountant)
    return BudgetPlan({k: sigma / math.sqrt(w) for k, w in shares.items()}, shares, float(cfg.epsilon), cfg.delta)


_CAL: dict = {}


def _calibrate_cached(shares: tuple, epsilon: float, delta: float, accountant: str) -> float:
    from fedrec.common.privacy.accountant import GaussianEvent, calibrate_for_events

    import warnings

    key = (shares, epsilon, delta, accountant)
    if key not in _CAL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CAL[key] = calibrate_for_events(
                lambda s: [GaussianEvent(noise_multiplier=s / math.sqrt(w)) for _, w in shares],
                target_epsilon=epsilon, delta=delta, accountant=accountant, sigma_bounds=(0.05, 2000.0),
                tolerance=0.002 * epsilon)
    return _CAL[key]


# --------------------------------------------------------------------------- public L2 bounds
# One person's contribution to each release, from public quantities only: the declared bounds
# (through r2, the public bound on a design row's squared norm) and the run's clip choices.
# client/statistics.py clips every person's row to exactly these.
def moments_bound(p: int, arm_items: int = 0) -> float:
    """L2 bound of ``vech(x x')`` for a bound-scaled design row (|x_k| <= 1, p coordinates):
    ``||vech(x x')||^2 = (||x||^4 + sum x_k^4)/2 <= (p^2 + p)/2``; with the per-item arm sums
    ``[T x, (1-T) x]`` of ``arm_items`` items (the propensity's LDA start), each adds
    ``||x||^2 <= p`` (a person is in one arm per item)."""
    return math.sqrt((p * p + p) / 2.0 + arm_items * p)


def propensity_bound(r2: float, hessian_weight: float = 1.0) -> float:
    """L2 bound of one person's propensity Newton terms ``[(T - e) w, h vech(e(1-e) w w')]`` for
    design rows with ``||w||^2 <= r2`` and Hessian weight ``h``: ``sqrt(r2 + h^2 r2^2/16)``.
    Gradient: norm <= sqrt(r2); Hessian with ``e(1-e) <= 1/4``: ``||vech|| <= ||w||^2 / 4``."""
    return math.sqrt(r2 + (hessian_weight * r2 / 4.0) ** 2)


def outcome_bound(r2: float, gram_weight: float = 1.0) -> float:
    """L2 bound of one person's outcome terms ``[g vech(w w'), w y, y^2]`` for rows with
    ``||w||^2 <= r2``, |y| <= 1 and Gram weight ``g``: ``sqrt(g^2 r2^2 + r2 + 1)``
    (``||vech(w w')|| <= ||w||^2``, ``||w y|| <= ||w||``, ``y^2 <= 1``; the person is in one
    arm's block only)."""
    return math.sqrt((gram_weight * r2) ** 2 + r2 + 1.0)


def auto_gram_weight(*, arm_scale: float, noise_multiplier: float, r2: float, p: int, n_items: int,
                     contributors: int, noise_mode: str, n_min: int, floor_k: float,
                     lowest: float = 0.3, max_ratio: float = 1.0) -> float:
    """The outcome release's Gram weight: the smallest ``g`` in ``[lowest, 1]`` whose Gram noise
    keeps the eigenvalue floor (``floor_k`` x the noise's spectral norm) at most ``max_ratio`` x
    ``arm_scale``; 1 if none does, or without DP.

    Why: in ``[g vech(G), X'y, y'y]`` a smaller g lowers the sensitivity and so the noise on X'y,
    which carries most of the coefficients' noise when they are small (their variance goes as
    ``v_xy + v_G |c|^2``, :func:`ridge_noise_cov`), but raises the Gram's noise ``v_G = v_xy /
    g^2``; once the floor that noise forces is a sizeable part of the Gram, the ridge shrinks
    the outcome models by more than the SE accounts for (measured: coverage 0.80 at ε = 0.5
    local with g = 0.3). ``arm_scale`` is public: the fitted propensity Hessian's intercept
    entry ``sum omega^2 e(1-e)``, at most the smaller arm's (weighted) size. Post-processing of
    earlier releases only, so the choice costs no budget; the weight travels with the step and
    sets the sensitivity the client charges (:func:`release_sensitivity`).
    """
    from fedrec.common.privacy.gaussian import summed_noise_var

    if noise_multiplier <= 0:
        return 1.0
    for g in np.geomspace(lowest, 1.0, 41):
        gram_nv = summed_noise_var(sensitivity=outcome_bound(r2, g) * math.sqrt(n_items),
                                   noise_multiplier=noise_multiplier, noise_mode=noise_mode, n_min=n_min,
                                   contributors=contributors) / g**2
        if floor_k * math.sqrt(gram_nv * p) <= max_ratio * arm_scale:
            return float(g)
    return 1.0


def release_weight(arrays: Mapping[str, np.ndarray], key: str) -> float:
    """A public coordinate weight the server sent with a step (``hessian-weight``,
    ``gram-weight``); 1 when absent. Must be positive and finite: it sets the sensitivity."""
    if key not in arrays:
        return 1.0
    v = float(np.asarray(arrays[key]).reshape(-1)[0])
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{key} must be positive and finite, got {v}")
    return v


def influence_relative_weights(arrays: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """The public relative weights ``(a, k)`` the server sent with the ``influence`` step as
    ``influence-weights`` (:data:`INFLUENCE_WEIGHTS` when absent). Both must be positive and
    finite: they set the sensitivity."""
    if "influence-weights" not in arrays:
        return INFLUENCE_WEIGHTS
    v = np.asarray(arrays["influence-weights"], dtype=np.float64).reshape(-1)
    if v.shape != (2,) or not (np.all(v > 0) and np.all(np.isfinite(v))):
        raise ValueError(f"influence-weights must be two positive finite numbers, got {v.tolist()}")
    return float(v[0]), float(v[1])


def influence_weights(clip: float, rel: tuple[float, float] = INFLUENCE_WEIGHTS) -> tuple[float, float, float]:
    """Coordinate weights ``(w_n, w_psi, w_2) = (a, 1 / clip, k / clip^2)`` of the influence
    release's row ``[w_n, w_psi psi, w_2 psi^2]`` for an item whose psi is clipped to
    ``[-clip, clip]``, with relative weights ``rel = (a, k)``: the row is ``[a, u, k u^2]`` with
    ``u = psi / clip`` in [-1, 1], so its bound (:func:`influence_bound`) does not depend on
    the clip, and relative to psi's the count and the square get ``a^2`` and ``k^2`` of the
    noise budget (default 1/16 and 1/4). The server divides the weights out, so item ``i``'s
    psi sum carries noise in proportion to its own clip.

    Why per item: with one clip for every item of a release (the largest item's), one item
    whose noisy histogram tail jumped set every item's noise (8 items, ε = 1: CI widths 5-6x
    pooled against 1.2-1.3x for one item, docs/causal.md)."""
    a, k = rel
    return a, 1.0 / clip, k / (clip * clip)


def influence_bound(rel: tuple[float, float] = INFLUENCE_WEIGHTS) -> float:
    """Per-item L2 bound of the influence row ``[a, u, k u^2]`` with ``|u| = |psi| / clip <= 1``
    (:func:`influence_weights`): ``sqrt(a^2 + 1 + k^2)`` (``1.146`` at the default weights),
    whatever each item's clip."""
    a, k = rel
    return math.sqrt(a * a + 1.0 + k * k)


def influence_clip(arrays: Mapping[str, np.ndarray], item: str) -> float:
    """The public psi clip the server sent for ``item`` with the ``influence`` step
    (``clip/<item>``): positive and finite, or ValueError naming it (checked before the client
    charges anything). It does not enter the release's bound (:func:`influence_bound`)."""
    key = f"clip/{item}"
    if key not in arrays:
        raise ValueError(f"{key} (the psi clip of item {item!r}) is missing")
    v = np.asarray(arrays[key], dtype=np.float64).reshape(-1)
    if v.shape != (1,) or not (v[0] > 0 and math.isfinite(v[0])):
        raise ValueError(f"{key} must be one positive finite number, got {v.tolist()}")
    return float(v[0])


def psi_square_weight(sum_sq: float, unit_noise_var: float, clip: float, *, count_weight: float,
                      target: float, grid: np.ndarray | None = None) -> float:
    """The smallest relative weight ``k`` of the ``psi^2`` coordinate (:func:`influence_weights`)
    whose noise keeps the SE honest: the released ``sum psi^2`` (from which the sampling
    variance is estimated) gets noise SD at most ``target`` x the variance of the psi sum
    (sampling ``sum_sq`` plus the DP noise on it).

    ``unit_noise_var``: noise variance of the item's psi sum (psi units) if its release row
    were ``[0, psi, 0]`` (bound ``clip``); with weights ``(a, k)`` it scales with
    :func:`influence_bound` squared (``unit_noise_var (1 + a^2 + k^2)``), and the square's noise,
    after dividing ``w_2 = k / clip^2`` out, ``clip^2 / k^2`` times the psi sum's.
    ``sum_sq``: an estimate of ``sum psi^2`` (:func:`histogram_sum_squares`). Public
    post-processing of released values; chooses a weight, releases nothing.

    Why: a fixed ``k`` either starves the square where the clip is large relative to psi's
    spread (large ε, where :func:`noise_limited_clip` raises the clip: the SE's sampling part
    then carries the noise and coverage fell to 0.88 with ``k`` 0.2, docs/causal.md) or spends
    budget on it where the psi noise dominates the SE anyway (small ε), which widens the CI.
    Returns the grid's largest ``k`` when none meets the target.
    """
    grid = PSI_SQUARE_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if not unit_noise_var > 0 or not target > 0:
        return INFLUENCE_WEIGHTS[1]
    for k in grid:
        nv = unit_noise_var * influence_bound((count_weight, float(k))) ** 2
        if math.sqrt(nv) * clip / k <= target * (max(sum_sq, 0.0) + nv):
            return float(k)
    return float(grid[-1])


def step_bound(step: str, p: int, *, r2: float | None = None, jac_k: float = 1.0,
               hessian_weight: float = 1.0, gram_weight: float = 1.0, arm_items: int = 0,
               influence_rel: tuple[float, float] = INFLUENCE_WEIGHTS) -> float:
    """Per-item L2 bound of one person's contribution to ``step`` (r2 defaults to p); for
    ``moments``, the whole release's bound (``arm_items`` items' arm sums included)."""
    r2 = float(p) if r2 is None else r2
    if step == "jacobian":
        return jacobian_bound(r2, jac_k)
    if step == "moments":
        return moments_bound(p, arm_items)
    if step.startswith("propensity"):
        return propensity_bound(r2, hessian_weight)
    if step == "outcome":
        return outcome_bound(r2, gram_weight)
    if step == "influence":  # the row is [a, psi/clip, k (psi/clip)^2]: the clip cancels
        return influence_bound(influence_rel)
    if step in ("scale", "outcome-range"):  # one-hot histogram rows
        return 1.0
    raise ValueError(step)


def release_sensitivity(step: str, p: int, arrays: Mapping[str, np.ndarray], n_items: int,
                        items: Sequence[str] | None = None) -> float:
    """L2 sensitivity of one protocol release, from public values only.

    ``arrays`` are the public arrays the server sends with the step (whitening radius, psi
    clips and influence weights, Jacobian clip, Hessian and Gram weights); a release carrying
    ``n_items`` items has ``sqrt(n_items)`` x the per-item bound (a person can be considered
    for every item), except ``moments`` (each person once). The client charges its ledger with
    this and the server sizes SecAgg+ with it: one function, so the two cannot disagree.
    ``items`` (the release's items): when given, each item's public inputs that do not enter
    the bound but that the client needs (the ``influence`` step's per-item psi clips) are
    checked too, so a bad one is refused before any charge. ValueError on anything unusable.
    """
    radius = float(arrays["whiten/radius"][0]) if "whiten/radius" in arrays else -1.0
    r2 = 1.0 + radius**2 if radius > 0 else float(p)
    jac_k = float(arrays["jacobian-k"][0]) if "jacobian-k" in arrays else 1.0
    if step == "outcome":  # the outcome maps must be usable (they do not enter the bound)
        for key in arrays:
            if key.startswith("outcome-map/"):
                outcome_map(arrays, key[len("outcome-map/"):])
    if step == "influence" and items is not None:
        for it in items:
            influence_clip(arrays, it)
    if step in HISTOGRAM_EDGES:
        histogram_edges(arrays, HISTOGRAM_EDGES[step])
    per_item = step_bound(step, p, r2=r2, jac_k=jac_k,
                          hessian_weight=release_weight(arrays, "hessian-weight"),
                          gram_weight=release_weight(arrays, "gram-weight"),
                          arm_items=n_items if moments_carry_arms(arrays) else 0,
                          influence_rel=influence_relative_weights(arrays) if step == "influence" else INFLUENCE_WEIGHTS)
    return per_item * (1.0 if step == "moments" else math.sqrt(n_items))


#: the public grid each histogram step is sent with
HISTOGRAM_EDGES = {"scale": "edges", "outcome-range": "outcome-edges"}


def histogram_edges(arrays: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """The public grid of a histogram step: finite and strictly ascending, or ValueError
    (checked before the client charges anything)."""
    if key not in arrays:
        raise ValueError(f"{key} (the histogram's grid) is missing")
    e = np.asarray(arrays[key], dtype=np.float64).reshape(-1)
    if e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise ValueError(f"{key} must be at least two finite, strictly ascending numbers")
    return e


def moments_carry_arms(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether the server asked the ``moments`` step for the per-item arm sums (public flag)."""
    return "moments/arms" in arrays and float(np.asarray(arrays["moments/arms"]).reshape(-1)[0]) > 0


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


def psi_grid(estimator: str, trim: tuple[float, float] = TRIM, factor: float = 2.0, decades: float = 3.0) -> np.ndarray:
    """Public geometric grid of |psi| values (scaled units) for the clip-choosing histogram:
    from the worst case down by ``decades`` powers of ten, ratio ``factor``."""
    top = psi_worst_case(estimator, trim)
    n = int(math.ceil(decades * math.log(10) / math.log(factor)))
    return top / factor ** np.arange(n, -1, -1)


def clip_from_histogram(counts: np.ndarray, edges: np.ndarray, *, tail: float) -> float:
    """Smallest grid edge above which at most ``tail`` of the people lie, from (noisy) counts
    of |psi| per bin (bin b = [edges[b-1], edges[b]), bin 0 below edges[0], last bin at the top)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = max(float(counts.sum()), 1.0)
    above = np.cumsum(counts[::-1])[::-1]  # above[b] = people in bins >= b
    # people with |psi| >= edges[b] are in bins >= b + 1
    for b, edge in enumerate(edges):
        rest = above[b + 1] if b + 1 < len(above) else 0.0
        if rest <= tail * n:
            return float(edge)
    return float(edges[-1])


def noise_limited_clip(sum_sq: float, *, noise_sd_per_clip: float, ratio: float) -> float:
    """The largest psi clip whose influence-sum noise stays at most ``ratio`` x the sampling
    SD of the psi sum.

    ``noise_sd_per_clip``: public SD of the released psi sum's noise per unit of clip (the
    noise is linear in the clip; it depends on the release's weights, :func:`influence_bound`).
    ``sum_sq``: an estimate of ``sum psi^2`` from the (noisy) |psi| histogram of the ``scale``
    step, :func:`histogram_sum_squares` below the tail-rule edge (:func:`clip_from_histogram`):
    the bins above hold at most the tail's people, and their counts are mostly DP noise on
    empty bins, which at |psi| ~ 20 would swamp the sum (measured: the clip rose 3x at ε = 1).
    Leaving them out can only lower the estimate, so the clip errs low. Post-processing of the
    released counts; 0 when there is no noise.

    Why: the clip from the histogram's tail (:func:`clip_from_histogram`) is the same at
    every ε, but its clipping bias is a fixed amount while the SE shrinks as ε grows, so at
    large ε the bias showed in SE units (education, -0.14 to -0.17 SE against an AIPW with the
    true propensity at ε >= 2, docs/causal.md). Where the budget is large a larger clip costs
    little: at ``ratio`` 0.5 the noise adds at most sqrt(1 + 0.25) - 1 = 12% to the SE.
    """
    if not noise_sd_per_clip > 0 or not ratio > 0:
        return 0.0
    return ratio * math.sqrt(max(sum_sq, 0.0)) / noise_sd_per_clip


def histogram_sum_squares(counts: np.ndarray, edges: np.ndarray, *, upto: float) -> float:
    """``sum psi^2`` estimated from the (noisy) |psi| histogram of the ``scale`` step: the bins
    whose upper edge is at most ``upto``, each at its geometric middle (bin 0, below
    ``edges[0]``, at ``edges[0] / sqrt(ratio of the grid)``), negative noisy counts as 0
    (:func:`noise_limited_clip` says why the bins above are left out). Post-processing."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    edges = np.asarray(edges, dtype=np.float64)
    step = float(edges[1] / edges[0]) if len(edges) > 1 else 2.0
    mids = np.concatenate([[edges[0] / math.sqrt(step)], np.sqrt(edges[:-1] * edges[1:])])
    keep = int(np.searchsorted(edges, upto * (1 + 1e-9), side="right"))  # bins whose upper edge <= upto
    return max(float(counts[:keep] @ mids[:keep] ** 2), 0.0)


# --------------------------------------------------------------------------- outcome range
def outcome_grid(factor: float = 2.0 ** 0.5, decades: float = 3.0) -> np.ndarray:
    """Public signed grid of scaled outcome values (|y| <= 1) for the ``outcome-range``
    histogram: ``±1, ±1/factor, ...`` down to ``10^-decades``, ascending. Bin b is
    ``[edges[b-1], edges[b])`` (bin 0 below ``-1``: empty; the last bin ``y >= 1``); the bin
    around zero spans ``±10^-decades``."""
    n = int(math.ceil(decades * math.log(10) / math.log(factor)))
    pos = 1.0 / factor ** np.arange(n, -1, -1)  # ascending, ending at 1
    return np.concatenate([-pos[::-1], pos])


def outcome_range_from_histogram(counts: np.ndarray, edges: np.ndarray, *, tail: float, margin: float,
                                 noise_sd: float = 0.0, z: float = 2.0) -> tuple[float, float]:
    """``(centre, half)`` of the scaled-outcome interval the outcome models are fitted on, from
    the (noisy) signed histogram of the ``outcome-range`` step: walking in from each end, the
    last edge before the people passed exceed ``tail`` of all, widened ``margin`` times about
    the middle and cut to [-1, 1] (y never leaves it). Public post-processing of released counts.

    ``noise_sd``: the public noise SD of one released count. The walk from each end crosses
    many empty bins whose noise adds up (SD ``noise_sd sqrt(k)`` after k bins), which alone
    would stop it early and leave the declared bounds (measured: health, 9,000 people, ε = 1:
    the whole lower half-range). So it walks on while the count passed is at most ``tail n +
    z noise_sd sqrt(k)`` (z = 2: the noise of what it passed rarely reaches that), and so clips
    at most about that many more people than ``tail`` — a cost in the outcome models'
    efficiency, not in the ATE's validity (AIPW stays unbiased with any outcome model when the propensity is right).
    A degenerate range (both walks in one bin) keeps that bin's width."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    n = max(float(counts.sum()), 1.0)

    def walk(c: np.ndarray) -> int:
        """How many bins from the outer end may be passed (counts in walking order)."""
        passed = np.cumsum(c)
        allowed = tail * n + z * noise_sd * np.sqrt(np.arange(1, len(c) + 1))
        over = np.flatnonzero(passed > allowed)
        return int(over[0]) if over.size else len(c)

    # bin b = [edges[b-1], edges[b]); passing bins 0..k-1 from below puts lo at edges[k-1]
    k_lo = walk(counts)
    k_hi = walk(counts[::-1])
    lo = float(edges[min(max(k_lo - 1, 0), len(edges) - 1)])
    hi = float(edges[max(len(edges) - k_hi, 0) if k_hi > 0 else len(edges) - 1])
    if hi <= lo:  # everyone in one bin (or the walks crossed): that bin's edges
        j = int(np.clip(np.searchsorted(edges, (lo + hi) / 2, side="right"), 1, len(edges) - 1))
        lo, hi = float(edges[j - 1]), float(edges[j])
    centre, half = (lo + hi) / 2.0, margin * (hi - lo) / 2.0
    lo, hi = max(centre - half, -1.0), min(centre + half, 1.0)
    return (lo + hi) / 2.0, (hi - lo) / 2.0


def outcome_map(arrays: Mapping[str, np.ndarray], item: str) -> tuple[float, float]:
    """The public ``(centre, half)`` of ``item``'s outcome models (``outcome-map/<item>``, sent
    with the ``outcome`` step); ``(0, 1)`` — the declared bounds — when absent. The client fits
    on ``clip((y - centre) / half, -1, 1)``, so the release's bound does not depend on it; it
    must still be usable: finite, ``|centre| <= 1`` and ``0 < half <= 1`` (else ValueError)."""
    key = f"outcome-map/{item}"
    if key not in arrays:
        return 0.0, 1.0
    v = np.asarray(arrays[key], dtype=np.float64).reshape(-1)
    if v.shape != (2,) or not np.all(np.isfinite(v)) or not 0.0 < v[1] <= 1.0 or abs(v[0]) > 1.0:
        raise ValueError(f"{key} must be [centre, half] with |centre| <= 1 and 0 < half <= 1, got {v.tolist()}")
    return float(v[0]), float(v[1])


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


# --------------------------------------------------------------------------- whitening
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
