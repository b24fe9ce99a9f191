"""Refutations of a causal estimate (issue 32, deliverable 5): the data each one runs on, and
the verdict.

* **placebo treatment** — at each institution, each item's ``exposed`` column is replaced by a
  seeded random permutation of itself (the institution's exposure rate per item is kept, its
  link to each person is broken). The whole causal run is repeated on it, **the propensity
  refit** on the placebo (DoWhy's placebo refuter kept the original propensity,
  py-why/dowhy#1728, which makes its placebo estimate meaningless for weighting estimators), and
  the logged ``propensity`` column is dropped (it belongs to the real exposure). A valid design
  gives a placebo effect of 0; a placebo CI that excludes 0 flags confounding the design does
  not remove — e.g. an unobserved institution-level common cause of exposure and outcome,
  which the within-institution permutation keeps and the pooled models cannot see.
* **random common cause** — a covariate drawn at random (N(0, 1) cut to its public bounds
  [-3, 3]) is added to the people and to the nuisance design; a valid estimator barely moves.

Both are charged releases (a refutation is a causal run on institution data): the caller runs
them through the guard like any causal run (simulations/refute.py). Everything here is either a
transformation of one institution's own data (done at the institution) or post-processing of
released estimates (no budget).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from scipy.stats import norm

from fedrec.common.datasets import InstitutionData
from fedrec.common.schema import Covariate

__all__ = ["REFUTATIONS", "RANDOM_COVARIATE", "placebo_data", "random_common_cause_data", "refute_data", "verdict"]

REFUTATIONS = ("placebo", "random-common-cause")
#: the random common cause's column name and public bounds
RANDOM_COVARIATE = "refute_random"
RANDOM_BOUNDS = (-3.0, 3.0)


def placebo_data(d: InstitutionData, rng: np.random.Generator) -> InstitutionData:
    """``d`` with each item's ``exposed`` permuted among the institution's rows of that item
    (seeded); engagement kept consistent with the contract (empty where not exposed, the
    public lower bound where a placebo exposure has none); the logged propensity dropped."""
    inter = d.interactions.copy()
    exposed = inter["exposed"].to_numpy().copy()
    for _, idx in sorted(inter.groupby(inter["item_id"].astype(str)).indices.items()):
        exposed[idx] = rng.permutation(exposed[idx])
    eng = inter["engagement"].to_numpy(np.float64)
    lo = float(d.study.engagement_bounds[0])
    inter["exposed"] = exposed
    inter["engagement"] = np.where(exposed == 1, np.where(np.isnan(eng), lo, eng), np.nan)
    if "propensity" in inter.columns:
        inter = inter.drop(columns=["propensity"])
    return replace(d, interactions=inter)


def random_common_cause_data(d: InstitutionData, rng: np.random.Generator) -> InstitutionData:
    """``d`` with a random covariate :data:`RANDOM_COVARIATE` (N(0, 1) cut to
    :data:`RANDOM_BOUNDS`) declared in its study and added to ``[causal] covariates`` when the
    study lists them."""
    lo, hi = RANDOM_BOUNDS
    value = np.round(np.clip(rng.standard_normal(len(d.people)), lo, hi), 4)
    people = d.people.assign(**{RANDOM_COVARIATE: value})
    st = d.study
    cov = Covariate(RANDOM_COVARIATE, "number", lo, hi, description="random common cause (refutation)")
    study = replace(st, covariates=st.covariates + (cov,),
                    causal_covariates=None if st.causal_covariates is None
                    else st.causal_covariates + (RANDOM_COVARIATE,))
    return replace(d, people=people, study=study)


def refute_data(kind: str, d: InstitutionData, seed: int) -> InstitutionData:
    """The refutation ``kind``'s data at institution ``d`` (seeded by ``seed`` and the
    institution's name, so every institution draws differently and a rerun draws the same)."""
    import zlib

    rng = np.random.default_rng([int(seed), zlib.crc32(d.name.encode()), REFUTATIONS.index(kind)])
    if kind == "placebo":
        return placebo_data(d, rng)
    if kind == "random-common-cause":
        return random_common_cause_data(d, rng)
    raise ValueError(f"unknown refutation {kind!r}; use one of {', '.join(REFUTATIONS)}")


def verdict(kind: str, original: Mapping[str, Mapping], refuted: Mapping[str, Mapping], *,
            alpha: float = 0.05) -> dict:
    """Post-processing of released estimates (``{item: {"ate", "se", "ci_low", "ci_high"}}``).

    Per item: the refuted estimate and its CI, and — random common cause — whether it **moved
    beyond the original's CI**; placebo — whether the placebo CI excludes 0 (a valid design's
    placebo effect). ``flagged``:
    the study-level verdict, Bonferroni over the items — placebo: some item's placebo estimate
    is more than ``z_{1-α/2m}`` placebo SEs from 0; random common cause: some item moved by more
    than ``z_{1-α/2m} sqrt(se² + se'²)`` (two runs' noise, so that DP noise alone rarely flags)."""
    items = [it for it in original if it in refuted]
    m = max(len(items), 1)
    zb = float(norm.ppf(1 - alpha / (2 * m)))
    rows, flagged = {}, False
    for it in items:
        o, r = original[it], refuted[it]
        row = {"estimate": float(r["ate"]), "se": float(r["se"]), "ci_low": float(r["ci_low"]),
               "ci_high": float(r["ci_high"]), "original": float(o["ate"])}
        if kind == "placebo":
            row["ci_excludes_zero"] = bool(r["ci_low"] > 0 or r["ci_high"] < 0)
            hit = abs(float(r["ate"])) > zb * float(r["se"])
        else:
            row["moved_beyond_ci"] = bool(not (o["ci_low"] <= r["ate"] <= o["ci_high"]))
            hit = abs(float(r["ate"]) - float(o["ate"])) > zb * math.hypot(float(o["se"]), float(r["se"]))
        row["flag"] = bool(hit)
        flagged |= hit
        rows[it] = row
    what = ("a placebo treatment has a non-zero effect: confounding the design does not remove (e.g. an "
            "unobserved common cause)" if kind == "placebo"
            else "adding a random covariate moved the estimate: the estimator is unstable")
    return {"refutation": kind, "items": rows, "flagged": bool(flagged), "alpha": alpha, "bonferroni_z": zb,
            "message": what if flagged else "not refuted"}
