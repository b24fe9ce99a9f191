"""Local clipped statistics for each causal step: one function per sufficient statistic.

Every function here returns a :class:`Contribution`: one row of ``terms`` per **person**
(the unit of privacy; a person has one row per item considered, and the treatment of a row
is ``exposed`` for that item) and the public L2 ``bound`` each row is clipped to. The bound is
derived from the study's **declared** bounds only, never from the data:

* covariates are scaled to [-1, 1] by their public bounds and an intercept is prepended, so a
  design row ``x`` has ``p = d + 1`` coordinates, ``|x_k| <= 1`` and ``||x||^2 <= p``;
* the outcome is centred on the middle of its public bounds and divided by the half range,
  so ``|y| <= 1``; the outcome models may fit a public re-centred, narrower interval of it
  (``outcome-map``, clipped back to [-1, 1]), which leaves every bound as it is;
* ``vech`` of an outer product ``x x'`` (upper triangle with diagonal) has squared norm
  ``(||x||^4 + sum x_k^4) / 2 <= (p^2 + p) / 2``.

:func:`release` clips each person's row to the bound (so a wrong derivation can only lose
signal, never privacy), sums over persons, and adds the Gaussian noise of
``common/privacy/gaussian.py`` with sensitivity ``bound * sqrt(J)`` when one release carries
J items' blocks (a person may be considered for every item in the catalogue).

Adding a statistic (policy value, mediation, ...) = adding one function that returns a
Contribution; the release path, the accounting and the server's sums do not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from fedrec.common.causal.derived import derived_values
from fedrec.common.causal.influence import influence_terms
from fedrec.common.causal.linalg import vech
from fedrec.common.causal.scaling import TRIM, design, scale_covariates, scale_outcome, sigmoid
from fedrec.common.causal.sensitivity import (
    INFLUENCE_WEIGHTS, moments_bound, moments_carry_arms, influence_bound, influence_clip,
    influence_relative_weights, influence_weights, outcome_bound, outcome_map, propensity_bound,
    release_weight,
)
from fedrec.common.causal.whitening import Whitening
from fedrec.common.causal.design import base_columns, derived_specs, design_columns_of, raw_design  # noqa: F401 (re-export)
from fedrec.common.datasets import InstitutionData
from fedrec.common.privacy.accountant import GaussianEvent
from fedrec.common.privacy.gaussian import clip_rows
from fedrec.common.privacy.release import gaussian_release

__all__ = [
    "ItemRows",
    "Contribution",
    "design_columns",
    "encode_item",
    "people_design",
    "fold_subset",
    "raw_design",
    "whiten_rows",
    "covariate_moments_terms",
    "item_arms",
    "propensity_newton_terms",
    "outcome_gram_terms",
    "influence_sum_terms",
    "influence_scale_terms",
    "release",
    "clipped_sum",
    "release_bound",
]


@dataclass(frozen=True)
class ItemRows:
    """One item's analysis rows at one institution: one row per person considered for it.

    ``x``: scaled design with intercept (n, p); ``t``: exposed 0/1; ``y``: scaled outcome.
    """

    item: str
    x: np.ndarray
    t: np.ndarray
    y: np.ndarray
    #: public bound on ||x||^2 of a row (p for the bound-scaled design; 1 + radius^2 whitened)
    r2: float = -1.0
    #: per-row weight of the nuisance fits' terms (None = 1; see ``Whitening.weighted``): a
    #: weighted row ``wt * terms`` obeys the same bound as a row of ``||x||^2 <= r2``
    wt: np.ndarray | None = None

    @property
    def p(self) -> int:
        return int(self.x.shape[1])

    @property
    def row_norm2(self) -> float:
        return float(self.p) if self.r2 < 0 else self.r2


@dataclass(frozen=True)
class Contribution:
    """Per-person terms (n, k) whose clipped sum is released, and their public L2 bound."""

    terms: np.ndarray
    bound: float


# --------------------------------------------------------------------------- encoding
def design_columns(data: InstitutionData, covariates: Sequence[str] | None = None,
                   derived: Sequence[str] = ()) -> list[tuple[str, float, float]]:
    """The study's design columns (name, lower, upper) restricted to ``covariates``, then one
    column per ``derived`` feature (its canonical name, e.g. ``ratio(weight_kg,height_cm,2)``,
    bounds from the declared ones: :func:`~fedrec.common.causal.derived.derived_bounds`).

    Raises :class:`FedrecInputError` naming an unknown covariate (checked before any charge).
    """
    return design_columns_of(data.study, covariates, derived)


def _item_interactions(data: InstitutionData, item: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The interaction rows of ``item`` and each row's person index in people order."""
    rows = data.interactions[data.interactions["item_id"] == item]
    pos = {pid: i for i, pid in enumerate(data.people["person_id"].astype(str).to_numpy())}
    take = np.array([pos[pid] for pid in rows["person_id"].astype(str)], dtype=np.int64)
    return rows, take


def encode_item(data: InstitutionData, item: str, covariates: Sequence[str] | None = None,
                derived: Sequence[str] = ()) -> ItemRows:
    """Rows of the people considered for ``item``: scaled covariates (and derived features) +
    intercept, exposure, scaled outcome (clipped to the declared bounds)."""
    cov, cols = raw_design(data, covariates, derived)
    rows, take = _item_interactions(data, item)
    x = design(scale_covariates(cov[take], [(lo, hi) for _, lo, hi in cols]))
    if len(take) == 0:
        x = np.zeros((0, len(cols) + 1))
    t = rows["exposed"].to_numpy(np.float64)
    y = scale_outcome(rows["outcome"].to_numpy(np.float64), data.study.outcome_bounds)
    return ItemRows(item=item, x=x, t=t, y=y)


def people_design(data: InstitutionData, covariates: Sequence[str] | None = None,
                  derived: Sequence[str] = ()) -> np.ndarray:
    """Every person once: bound-scaled covariates (and derived features) + intercept (rows of
    norm <= sqrt(p))."""
    cov, cols = raw_design(data, covariates, derived)
    return design(scale_covariates(cov, [(lo, hi) for _, lo, hi in cols]))


def fold_subset(data: InstitutionData, salt: str, fold: int, folds: int = 2) -> InstitutionData:
    """The institution restricted to the people of one cross-fitting fold
    (:func:`~fedrec.common.causal.ope.person_fold` of the person id and the public ``salt``) and
    their interactions: same name (same ledger), fewer people. The one fold filter of the
    Flower causal handler (client/causal_app.py, ``causal.expert.fold``) and of the in-process
    cross-fitting (simulations/strategies.crossfit_runs), so both paths select the same people.
    Idempotent: a fold's subset filtered again by the same fold is itself."""
    from dataclasses import replace

    from fedrec.common.causal.ope import person_fold

    ids = data.people["person_id"].astype(str)
    keep = set(ids[person_fold(ids.to_numpy(), salt, folds) == int(fold)])
    return replace(data, people=data.people[ids.isin(keep)].reset_index(drop=True),
                   interactions=data.interactions[data.interactions["person_id"].astype(str).isin(keep)]
                   .reset_index(drop=True))


def whiten_rows(rows: ItemRows, whitening: Whitening) -> ItemRows:
    """The same rows on the public whitened design (``||w||^2 <= 1 + radius^2``)."""
    wt = whitening.weights(rows.x) if whitening.weighted else None
    return ItemRows(rows.item, whitening.apply(rows.x), rows.t, rows.y, r2=whitening.r2, wt=wt)


# --------------------------------------------------------------------------- statistics
def covariate_moments_terms(x_people: np.ndarray,
                            arms: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> Contribution:
    """Per person (each once, whatever the items) ``vech(x x')`` of the bound-scaled design,
    then for each item of ``arms`` — ``(person index, exposed)`` of the people considered for
    it — the person's ``[T x, (1-T) x]`` (zeros if not considered).

    Sum: count (entry [0, 0]), covariate sums and second moments: the server's whitening; per
    item, each arm's count and covariate sums: the propensity's LDA start (:func:`lda_start`).
    L2 bound per person: ``sqrt((p^2 + p)/2 + J p)`` for J items (:func:`moments_bound`; one
    row per person and item, which the data contract enforces).
    """
    x = x_people
    n, p = x.shape
    parts = [vech(x[:, :, None] * x[:, None, :])]
    for idx, t in arms:
        block = np.zeros((n, 2 * p))
        block[idx, :p] = x[idx] * t[:, None]
        block[idx, p:] = x[idx] * (1.0 - t)[:, None]
        parts.append(block)
    return Contribution(np.hstack(parts), moments_bound(p, len(arms)))


def item_arms(data: InstitutionData, item: str) -> tuple[np.ndarray, np.ndarray]:
    """(person index in people order, exposed) of the people considered for ``item``."""
    rows, take = _item_interactions(data, item)
    return take, rows["exposed"].to_numpy(np.float64)


def propensity_newton_terms(rows: ItemRows, beta: np.ndarray, hessian_weight: float = 1.0) -> Contribution:
    """Per person ``[(T - e(x)) x, h vech(e(1-e) x x')]`` at the current logistic coefficients,
    ``h`` the public Hessian weight (the server divides it out).

    Sum: log-likelihood gradient and Hessian for one Newton step. L2 bound per person:
    :func:`propensity_bound` ``sqrt(r2 + h^2 r2^2/16)`` with r2 the public bound on ``||x||^2``.
    """
    x = rows.x
    e = sigmoid(x @ beta)
    grad = (rows.t - e)[:, None] * x
    hess = hessian_weight * vech((e * (1 - e))[:, None, None] * x[:, :, None] * x[:, None, :])
    terms = np.hstack([grad, hess])
    if rows.wt is not None:  # weighted likelihood (whitening radius as weights, see Whitening)
        terms = terms * rows.wt[:, None]
    return Contribution(terms, propensity_bound(rows.row_norm2, hessian_weight))


def histogram_rows(values: np.ndarray, edges: np.ndarray) -> Contribution:
    """Per person a one-hot row: which bin of the public grid ``edges`` (bin b =
    ``[edges[b-1], edges[b])``, one open bin at each end) the value falls in. L2 bound per
    person: 1 (one count in one bin), whatever the value."""
    b = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    terms = np.zeros((len(values), len(edges) + 1))
    terms[np.arange(len(values)), b] = 1.0
    return Contribution(terms, 1.0)


def outcome_range_terms(rows: ItemRows, edges: np.ndarray) -> Contribution:
    """Per person a one-hot row: which bin of the public signed grid ``edges``
    (:func:`~fedrec.common.causal.clipping.outcome_grid`) the scaled outcome falls in.

    Sum: a histogram of the outcome; the server picks from its tails the interval the outcome
    models are fitted on. L2 bound per person: 1 (one count in one bin), so one person moves
    the released histogram by at most 1 per item whatever their data.
    """
    return histogram_rows(rows.y, edges)


def outcome_gram_terms(rows: ItemRows, gram_weight: float = 1.0,
                       y_map: tuple[float, float] = (0.0, 1.0)) -> Contribution:
    """Per person, for each arm (0 then 1): ``[g vech(x x'), x y', y'^2]``, zero in the other
    arm; ``g`` the public Gram weight (the server divides it out) and ``y' = clip((y - c) / h,
    -1, 1)`` for the public outcome map ``y_map = (c, h)`` (the server maps the fits back).

    Sums: the per-arm Gram ``X'X`` (its [0, 0] entry is the arm's count, its first row the
    covariate sums), ``X'y'`` and ``y''y'`` — ridge fits, residual variances and (later)
    mediation paths come from them. L2 bound per person: :func:`outcome_bound`
    ``sqrt(g^2 r2^2 + r2 + 1)`` with r2 the public bound on ``||x||^2`` (|y'| <= 1 whatever the
    map, so the map does not enter the bound).
    """
    centre, half = y_map
    x = rows.x
    y = np.clip((rows.y - centre) / half, -1.0, 1.0)  # the identity map leaves y (in [-1, 1]) as it is
    block = np.hstack([gram_weight * vech(x[:, :, None] * x[:, None, :]), x * y[:, None], (y * y)[:, None]])
    if rows.wt is not None:  # weighted least squares (whitening radius as weights)
        block = block * rows.wt[:, None]
    t = rows.t[:, None]
    return Contribution(np.hstack([block * (1 - t), block * t]), outcome_bound(rows.row_norm2, gram_weight))


def influence_sum_terms(rows: ItemRows, *, estimator: str, clip: float, prop_coef: np.ndarray | None,
                        coef1: np.ndarray | None, coef0: np.ndarray | None,
                        trim: tuple[float, float] = TRIM,
                        rel: tuple[float, float] = INFLUENCE_WEIGHTS) -> Contribution:
    """Per person ``[a, u, k u^2]`` with ``u = psi / clip``, psi (aipw or ipw influence term)
    clipped to this item's public ``[-clip, clip]``, and the public relative weights
    ``rel = (a, k)`` (:func:`influence_weights`); the server divides the weights out (so the
    noise on the item's psi sum scales with its own clip). L2 bound per person:
    :func:`influence_bound` ``sqrt(a^2 + 1 + k^2)`` (``1.146`` at the default weights),
    whatever the clip.
    """
    psi = np.clip(influence_terms(rows.x, rows.t, rows.y, estimator=estimator, prop_coef=prop_coef,
                                  coef1=coef1, coef0=coef0, trim=trim), -clip, clip)
    w_n, w_psi, w_2 = influence_weights(clip, rel)
    terms = np.column_stack([np.full(len(psi), w_n), w_psi * psi, w_2 * psi * psi])
    return Contribution(terms, influence_bound(rel))


def influence_scale_terms(rows: ItemRows, *, estimator: str, edges: np.ndarray, prop_coef: np.ndarray | None,
                          coef1: np.ndarray | None, coef0: np.ndarray | None,
                          trim: tuple[float, float] = TRIM) -> Contribution:
    """Per person a one-hot row: which bin of the public grid ``edges`` |psi| falls in.

    Sum: a histogram of |psi|; the server picks the psi clip from its tail. L2 bound per
    person: 1 (one count in one bin).
    """
    return histogram_rows(np.abs(influence_terms(rows.x, rows.t, rows.y, estimator=estimator, prop_coef=prop_coef,
                                                 coef1=coef1, coef0=coef0, trim=trim)), edges)


# --------------------------------------------------------------------------- release
def clipped_sum(c: Contribution) -> np.ndarray:
    """Sum over persons of the rows clipped to ``c.bound`` (sensitivity ``c.bound``).

    A row with a non-finite entry (a NaN or inf from the server's public values, e.g. an
    overflow of huge coefficients on this person's covariates) counts as a zero row: clipping
    cannot bound it (NaN survives any scaling), and whether one occurs depends on the person's
    data, so letting it through would release that fact without noise."""
    if len(c.terms) == 0:
        return np.zeros(c.terms.shape[1])
    terms = c.terms
    bad = ~np.isfinite(terms).reshape(len(terms), -1).all(axis=1)
    if bad.any():
        terms = np.where(bad.reshape((-1,) + (1,) * (terms.ndim - 1)), 0.0, terms)
    if not math.isfinite(c.bound):  # DP off (ε = inf, no whitening radius): nothing to bound
        return terms.sum(axis=0)
    return clip_rows(terms, c.bound).sum(axis=0)


def release_bound(blocks: Mapping[str, Contribution]) -> float:
    """The L2 sensitivity of a release carrying ``blocks``: ``max bound * sqrt(J)`` (J blocks; one
    person can appear in each)."""
    return max(c.bound for c in blocks.values()) * math.sqrt(len(blocks))


def release(blocks: Mapping[str, Contribution], *, event: GaussianEvent | None, noise_share: float = 1.0,
            generator: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Clip, sum and noise a release carrying one block per item, with the charged ``event``.

    Privacy contract: every block's rows are clipped to its public bound, so one person moves
    the concatenated release by at most :func:`release_bound`, which must not exceed the
    charged ``event.sensitivity`` (checked: a release whose bound the charge did not cover is
    refused). The noise is the event's (``common/privacy/release.py``): std
    ``σ · Δ · √noise_share`` per coordinate. ``event=None`` means no noise: only a
    non-private simulation the institution's policy allowed (ε = inf).
    """
    sums = {item: clipped_sum(c) for item, c in blocks.items()}
    if event is None:
        return sums
    sens = release_bound(blocks)
    if not (math.isfinite(sens) and sens <= event.sensitivity * (1 + 1e-9)):
        raise ValueError(f"the release's sensitivity {sens:.6g} exceeds the charged {event.sensitivity:.6g}")
    names = list(sums)
    flat = np.concatenate([np.ravel(sums[k]) for k in names])
    noisy = gaussian_release(flat, event=event, noise_share=noise_share, generator=generator)
    out: dict[str, np.ndarray] = {}
    at = 0
    for k in names:
        size = np.size(sums[k])
        out[k] = noisy[at:at + size].reshape(np.shape(sums[k]))
        at += size
    return out


# --------------------------------------------------------------------------- one step
def whitening_from_arrays(arrays: Mapping[str, np.ndarray]) -> Whitening | None:
    """The public whitening the server sent with a step (None before the moments step)."""
    if "whiten/a" not in arrays:
        return None
    radius = float(arrays["whiten/radius"][0])
    weighted = "whiten/weighted" in arrays and float(arrays["whiten/weighted"][0]) > 0
    return Whitening(np.asarray(arrays["whiten/a"]), np.asarray(arrays["whiten/b"]), radius if radius > 0 else math.inf,
                     weighted=weighted)


def step_contributions(kind: str, data: InstitutionData, items: Sequence[str], arrays: Mapping[str, np.ndarray], *,
                       estimator: str, trim: tuple[float, float] = TRIM, covariates: Sequence[str] | None = None,
                       derived: Sequence[str] = (), cache: dict | None = None) -> dict[str, Contribution]:
    """The blocks an institution releases for one protocol step (``moments``, ``propensity``,
    ``outcome``, ``influence``), each a per-person :class:`Contribution` with its bound.
    The client handler and the in-process benchmark both call this."""
    cache = {} if cache is None else cache
    if kind == "moments":
        arms = [item_arms(data, it) for it in items] if moments_carry_arms(arrays) else []
        return {"moments": covariate_moments_terms(people_design(data, covariates, derived), arms)}
    wh = whitening_from_arrays(arrays)
    blocks: dict[str, Contribution] = {}
    for it in items:
        key = (data.name, it, None if covariates is None else tuple(covariates), tuple(derived))
        if key not in cache:
            cache[key] = encode_item(data, it, covariates, derived)
        rows = cache[key] if wh is None else whiten_rows(cache[key], wh)
        if kind == "propensity":
            blocks[it] = propensity_newton_terms(rows, arrays[f"beta/{it}"], release_weight(arrays, "hessian-weight"))
        elif kind == "outcome":
            blocks[it] = outcome_gram_terms(rows, release_weight(arrays, "gram-weight"), outcome_map(arrays, it))
        elif kind == "outcome-range":
            blocks[it] = outcome_range_terms(rows, np.asarray(arrays["outcome-edges"]))
        elif kind == "scale":
            blocks[it] = influence_scale_terms(rows, estimator=estimator, edges=np.asarray(arrays["edges"]),
                                               prop_coef=arrays.get(f"beta/{it}"), coef1=arrays.get(f"mu1/{it}"),
                                               coef0=arrays.get(f"mu0/{it}"), trim=trim)
        elif kind == "influence":
            blocks[it] = influence_sum_terms(rows, estimator=estimator, clip=influence_clip(arrays, it),
                                             prop_coef=arrays.get(f"beta/{it}"), coef1=arrays.get(f"mu1/{it}"),
                                             coef0=arrays.get(f"mu0/{it}"), trim=trim,
                                             rel=influence_relative_weights(arrays))
        else:
            raise ValueError(f"unknown causal step {kind!r}")
    return blocks
