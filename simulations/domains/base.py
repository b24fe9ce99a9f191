"""The Domain contract: what a simulated domain declares, and the one engine that draws from it.

A domain declares (see docs/simulate.md for each one's story):

- its **real covariate source** (a PyPI-shipped data set, cleaned to the study's covariates)
  and how each column is jittered when resampled;
- **features**: standardised numbers computed from covariates, which every model below reads;
- **items** with a text description, and per item three linear models on the features:
  ``effect`` (true CATE on the outcome), ``appeal`` (engagement: rating latent) and
  ``policy`` (logit of the confounded logging policy's exposure probability);
- the outcome's ``baseline`` model, noise and public bounds; a ``case_mix`` score that tilts
  institutions apart.

The engine (:func:`simulate`) is vectorised numpy: people are resampled with institution-
specific weights (skew), jittered, considered for a random subset of items, exposed by the
logging policy, rate what they were shown, and their outcome is baseline + the sum of the
true effects of the items they were exposed to + noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional

import numpy as np
import pandas as pd
from scipy.special import expit, ndtr

from fedrec.common.datasets import GroundTruth, InstitutionData
from fedrec.common.errors import FedrecInputError
from fedrec.common.schema import Covariate, Study

__all__ = ["Linear", "ItemSpec", "Domain", "Simulation", "simulate", "POLICIES"]

POLICIES = ("confounded", "randomized")
#: Exposure probability of the randomized logging policy (independent of covariates).
RANDOMIZED_P = 0.4
#: Propensities of the confounded policy are kept within [P_MIN, 1 - P_MIN] (overlap).
P_MIN = 0.05
#: Rating model: latent = appeal + person effect (sd RATING_PERSON_SD) + noise (sd RATING_NOISE_SD).
RATING_PERSON_SD = 0.5
RATING_NOISE_SD = 0.7
#: Jitter: additive noise of this fraction of the source column's sd (or multiplicative).
JITTER_FRACTION = 0.1
STUDY_START = np.datetime64("2024-01-01T00:00:00")


@dataclass(frozen=True)
class Linear:
    """``intercept + sum(coef[f] * features[f])`` — a linear model on named features."""

    intercept: float = 0.0
    coef: Mapping[str, float] = field(default_factory=dict)

    def __call__(self, feats: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        out = np.full(n, float(self.intercept))
        for name, c in self.coef.items():
            out += c * feats[name]
        return out


@dataclass(frozen=True)
class ItemSpec:
    """One item of a domain's catalogue with its true effect, appeal and logging-policy models."""

    item_id: str
    name: str
    category: str
    description: str
    effect: Linear
    appeal: Linear
    policy: Linear


@dataclass(frozen=True)
class Domain:
    """A simulated domain. ``covariates`` are the study's declared covariates with public
    bounds; ``jitter`` maps a covariate to ``"add"`` (Gaussian, sd a fraction of the source
    sd), ``"mul"`` (log-normal, zeros stay zero) or ``"none"``; ``decimals`` rounds numbers."""

    name: str
    title: str
    person_unit: str
    source: str
    covariates: tuple[Covariate, ...]
    load_source: Callable[[], pd.DataFrame]
    features: Callable[[pd.DataFrame], dict[str, np.ndarray]]
    items: tuple[ItemSpec, ...]
    baseline: Linear
    outcome_name: str
    outcome_unit: str
    outcome_bounds: tuple[float, float]
    outcome_better: Literal["higher", "lower"]
    noise_sd: float
    case_mix: Linear
    jitter: Mapping[str, str] = field(default_factory=dict)
    decimals: int = 2
    items_per_person: int = 6
    engagement_bounds: tuple[float, float] = (1.0, 5.0)
    #: the study's declared causal design (study.toml ``[causal]``): what an analyst who knows
    #: the field would give the nuisance models (e.g. BMI rather than weight and height)
    causal_covariates: Optional[tuple[str, ...]] = None
    causal_derived: tuple[str, ...] = ()

    def study(self) -> Study:
        """The ``study.toml`` every institution of this domain declares."""
        return Study(
            domain=self.name, covariates=self.covariates, outcome_name=self.outcome_name,
            outcome_unit=self.outcome_unit, outcome_bounds=self.outcome_bounds,
            outcome_better=self.outcome_better, engagement_kind="rating",
            engagement_bounds=self.engagement_bounds, title=self.title, person_unit=self.person_unit,
            causal_covariates=self.causal_covariates, causal_derived=self.causal_derived,
        )

    def items_frame(self) -> pd.DataFrame:
        """The public item catalogue (items table of the contract)."""
        return pd.DataFrame({
            "item_id": [i.item_id for i in self.items],
            "name": [i.name for i in self.items],
            "description": [i.description for i in self.items],
            "category": [i.category for i in self.items],
        })


@dataclass(frozen=True)
class Simulation:
    """A simulated federation: institutions in the contract, and the ground truth."""

    institutions: list[InstitutionData]
    truth: GroundTruth


# --------------------------------------------------------------------------- the engine


def _sizes(rng: np.random.Generator, people: int, k: int, skew: float) -> np.ndarray:
    w = np.exp(1.2 * skew * rng.standard_normal(k))
    floor = max(1, min(10, people // k))
    sizes = floor + np.floor((people - floor * k) * w / w.sum()).astype(np.int64)
    sizes[np.argmax(w)] += people - sizes.sum()
    return sizes


def _resample(domain: Domain, rng: np.random.Generator, src: pd.DataFrame, idx: np.ndarray) -> pd.DataFrame:
    """Rows ``idx`` of the source, jittered per covariate and clipped to the public bounds."""
    out: dict[str, np.ndarray] = {}
    for cov in domain.covariates:
        col = src[cov.name].to_numpy()[idx]
        mode = domain.jitter.get(cov.name, "add" if cov.kind in ("number", "integer") else "none")
        if cov.kind == "category" or mode == "none":
            out[cov.name] = col
            continue
        x = col.astype(float)
        if mode == "mul":
            x = x * np.exp(JITTER_FRACTION * 2 * rng.standard_normal(len(x)))
        else:
            x = x + JITTER_FRACTION * float(src[cov.name].std()) * rng.standard_normal(len(x))
        x = np.clip(x, cov.lower, cov.upper)
        out[cov.name] = np.round(x).astype(np.int64) if cov.kind == "integer" else np.round(x, domain.decimals)
    return _nudge_copies(domain, pd.DataFrame(out), src)


def _nudge_copies(domain: Domain, x: pd.DataFrame, src: pd.DataFrame, rounds: int = 12) -> pd.DataFrame:
    """Never copy a source record verbatim: a drawn row equal to *any* source row (jitter can
    leave zero earnings and small integers as they were) gets one additively-jittered numeric
    covariate moved by one unit, cycling through them until no row matches."""
    cols = [c.name for c in domain.covariates]
    movable = [c for c in domain.covariates
               if c.kind in ("number", "integer") and domain.jitter.get(c.name, "add") == "add"]
    if not movable:
        return x
    known = set(pd.util.hash_pandas_object(src[cols], index=False).to_numpy().tolist())
    for r in range(rounds):
        h = pd.util.hash_pandas_object(x[cols], index=False).to_numpy()
        same = np.fromiter((v in known for v in h.tolist()), dtype=bool, count=len(h))
        if not same.any():
            break
        cov = movable[r % len(movable)]
        step = 1.0 if cov.kind == "integer" else 10.0 ** -domain.decimals
        v = x[cov.name].to_numpy().astype(float)
        v[same] = np.where(v[same] + step <= cov.upper, v[same] + step, v[same] - step)
        x[cov.name] = v.astype(np.int64) if cov.kind == "integer" else np.round(v, domain.decimals)
    return x


def _expected_rating(mean: np.ndarray, sd: float, lo: float, hi: float) -> np.ndarray:
    """E[clip(round(3 + L), lo, hi)] for L ~ N(mean, sd²), elementwise."""
    levels = np.arange(lo, hi + 1)
    edges = np.concatenate([[-np.inf], levels[:-1] + 0.5, [np.inf]])
    cdf = ndtr((edges[None, None, :] - 3.0 - mean[..., None]) / sd)
    return (np.diff(cdf, axis=-1) * levels).sum(axis=-1)


def simulate(domain: Domain, *, institutions: int, people: int, seed: int, skew: float,
             policy: str = "confounded", progress: Callable[[str], None] | None = None,
             hidden_confounder: float = 0.0) -> Simulation:
    """Draw a federation of ``institutions`` holding ``people`` in all, deterministically from
    ``seed``. ``skew`` in [0, 1] sets how much institutions differ in size and case-mix;
    ``policy`` is ``"confounded"`` (exposure depends on covariates) or ``"randomized"``.

    ``hidden_confounder`` (default 0: off, the draw is unchanged) plants an **unobserved common
    cause**: institution k gets ``u_k`` evenly spaced in [-1, 1], which shifts every item's
    logging logit by ``hidden_confounder * u_k`` and the outcome by ``hidden_confounder * u_k *
    noise_sd``; u is in no table, so no adjustment set removes it (the refutations' test bed)."""
    if policy not in POLICIES:
        raise FedrecInputError(f"--policy {policy!r}: unknown logging policy; fix: use one of {', '.join(POLICIES)}")
    if not 0.0 <= skew <= 1.0:
        raise FedrecInputError(f"--skew {skew}: outside [0, 1]; fix: give 0 (IID) to 1 (strong case-mix skew)")
    if institutions < 1 or people < 2 * institutions:
        raise FedrecInputError(f"--people {people} for --institutions {institutions}: too few; "
                               "fix: give at least 2 people per institution")
    step = progress or (lambda _msg: None)
    ss = np.random.SeedSequence([seed, 0x5EED])
    rng_inst, rng_people, rng_rows, rng_out = (np.random.default_rng(s) for s in ss.spawn(4))

    src = domain.load_source().reset_index(drop=True)
    src_feats = domain.features(src)
    score = domain.case_mix(src_feats, len(src))
    score = (score - score.mean()) / (score.std() or 1.0)
    sizes = _sizes(rng_inst, people, institutions, skew)
    tilts = rng_inst.permutation(np.linspace(-1.0, 1.0, institutions)) if institutions > 1 else np.zeros(1)
    idx_parts, inst_parts = [], []
    for k in range(institutions):
        logits = 2.0 * skew * tilts[k] * score
        w = np.exp(logits - logits.max())
        idx_parts.append(rng_inst.choice(len(src), size=int(sizes[k]), replace=True, p=w / w.sum()))
        inst_parts.append(np.full(int(sizes[k]), k, dtype=np.int64))
    idx, inst = np.concatenate(idx_parts), np.concatenate(inst_parts)
    X = _resample(domain, rng_people, src, idx)
    n, J = len(X), len(domain.items)
    person_ids = np.array([f"P{i:06d}" for i in range(n)], dtype=object)
    step("people drawn")

    f = domain.features(X)
    tau = np.column_stack([it.effect(f, n) for it in domain.items])
    appeal = np.column_stack([it.appeal(f, n) for it in domain.items])
    if policy == "confounded":
        prop = np.clip(expit(np.column_stack([it.policy(f, n) for it in domain.items])), P_MIN, 1 - P_MIN)
    else:
        prop = np.full((n, J), RANDOMIZED_P)
    u_hidden = np.zeros(n)
    if hidden_confounder:
        u_hidden = (np.linspace(-1.0, 1.0, institutions) if institutions > 1 else np.zeros(1))[inst]
        logit = np.log(prop / (1 - prop)) + hidden_confounder * u_hidden[:, None]
        prop = np.clip(expit(logit), P_MIN, 1 - P_MIN)
    lo_e, hi_e = domain.engagement_bounds
    rating_sd = float(np.hypot(RATING_PERSON_SD, RATING_NOISE_SD))
    expected = _expected_rating(appeal, rating_sd, lo_e, hi_e)

    m = min(domain.items_per_person, J)
    considered_items = np.argsort(rng_rows.random((n, J)), axis=1)[:, :m]
    considered_items.sort(axis=1)
    rows_person = np.repeat(np.arange(n), m)
    rows_item = considered_items.ravel()
    p_rows = prop[rows_person, rows_item]
    exposed = (rng_rows.random(n * m) < p_rows).astype(np.int64)
    latent = (appeal[rows_person, rows_item] + RATING_PERSON_SD * rng_rows.standard_normal(n)[rows_person]
              + RATING_NOISE_SD * rng_rows.standard_normal(n * m))
    rating = np.clip(np.round(3.0 + latent), lo_e, hi_e)
    engagement = np.where(exposed == 1, rating, np.nan)
    step("exposure and engagement drawn")

    received = np.zeros(n)
    np.add.at(received, rows_person, exposed * tau[rows_person, rows_item])
    y = domain.baseline(f, n) + received + domain.noise_sd * rng_out.standard_normal(n)
    if hidden_confounder:
        y = y + hidden_confounder * domain.noise_sd * u_hidden
    y = np.round(np.clip(y, *domain.outcome_bounds), 2)
    days = rng_out.integers(0, 365, size=n * m).astype("timedelta64[D]")
    seconds = rng_out.integers(8 * 3600, 18 * 3600, size=n * m).astype("timedelta64[s]")
    stamps = (STUDY_START + days + seconds).astype("datetime64[ns]")
    step("outcomes drawn")

    study = domain.study()
    items = domain.items_frame()
    item_ids = np.asarray([i.item_id for i in domain.items], dtype=object)
    inter_all = pd.DataFrame({
        "person_id": pd.Series(person_ids[rows_person], dtype="str"),
        "item_id": pd.Series(item_ids[rows_item], dtype="str"),
        "exposed": exposed,
        "engagement": engagement,
        "outcome": y[rows_person],
        "timestamp": stamps,
    })
    people_all = pd.concat([pd.DataFrame({"person_id": pd.Series(person_ids, dtype="str")}), X], axis=1)
    out: list[InstitutionData] = []
    row_inst = inst[rows_person]
    for k in range(institutions):
        out.append(InstitutionData(
            name=f"institution_{k:02d}",
            people=people_all[inst == k].reset_index(drop=True),
            items=items.copy(),
            interactions=inter_all[row_inst == k].reset_index(drop=True),
            study=study,
        ))
    truth = GroundTruth(
        domain=domain.name, policy=policy, better=domain.outcome_better,
        item_ids=tuple(str(i) for i in item_ids), person_ids=person_ids.astype(str), institution=inst,
        cate=tau, propensity=prop, expected_engagement=expected,
    )
    return Simulation(out, truth)
