"""Refutations of a causal estimate (issue 32, deliverable 5): the data each one runs on, and
the verdict.

* **placebo treatment** — at each institution, each item's ``exposed`` column is replaced by a
  seeded random cyclic shift of itself (the institution's exposure rate per item is kept, its
  link to each person is broken). The whole causal run is repeated on it, **the propensity
  refit** on the placebo (DoWhy's placebo refuter kept the original propensity,
  py-why/dowhy#1728, which makes its placebo estimate meaningless for weighting estimators), and
  the logged ``propensity`` column is dropped (it belongs to the real exposure). A valid design
  gives a placebo effect of 0; a placebo CI that excludes 0 flags confounding the design does
  not remove — e.g. an unobserved institution-level common cause of exposure and outcome,
  which the within-institution permutation keeps and the pooled models cannot see.
* **random common cause** — a covariate drawn at random (N(0, 1) cut to its public bounds
  [-3, 3]) is added to the people and to the nuisance design; a valid estimator barely moves.

Both transforms draw their randomness from a keyed hash of (public seed, institution, item,
person id), never from row positions, so that adding or removing one person leaves every other
person's draw as it was (add/remove-one-person neighbours, docs/privacy-accounting.md).

Privacy — the per-person L2 sensitivity of a refutation's releases:

* random common cause: **unchanged**. A person's row is a function of their own data and their
  own keyed draw, and the new covariate is cut to its public bounds [-3, 3], which the study
  declares (:func:`random_common_cause_data`): the release's bound is computed from the declared
  bounds of the (one larger) design exactly as for any causal run.
* placebo: one person's exposures now sit in **another** person's row — per item, the row that
  follows theirs in the keyed order. Adding or removing one person changes their own row
  (at most C, the causal run's per-person bound of the release) and, per item, the placebo
  exposure of one other row (the follower's): that follower's item block moves by at most
  twice its bound, and over the items' disjoint blocks by at most 2C — **3C in all**
  (:data:`SENSITIVITY_FACTOR`). A placebo run is therefore charged as ``GaussianEvent(σ, 3C)``
  (noise std 3σC: the planned ε at three times the noise), and the server plans its σ three
  times larger (:func:`refutation_plan`) so that its noise bookkeeping (σ'C = 3σC) matches
  what the clients add — over Flower (client/causal_app.py, server/causal.estimate) and in
  process (simulations/refute.py) alike.

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from scipy.stats import norm

from fedrec.common.datasets import InstitutionData
from fedrec.common.schema import Covariate

__all__ = ["REFUTATIONS", "RANDOM_COVARIATE", "SENSITIVITY_FACTOR", "placebo_data", "random_common_cause_data",
           "refute_data", "refutation_design", "refutation_plan", "verdict"]

REFUTATIONS = ("placebo", "random-common-cause")
#: per-person L2 sensitivity of a refutation run's release, in units of the causal run's bound
#: for the same release (module doc): the random covariate's is the causal run's; the
#: placebo's is 3x (one person's exposure moves into one other row per item)
SENSITIVITY_FACTOR = {"placebo": 3.0, "random-common-cause": 1.0}
#: the random common cause's column name and public bounds
RANDOM_COVARIATE = "refute_random"
RANDOM_BOUNDS = (-3.0, 3.0)


def _keyed_uniform(seed: int, institution: str, item: str, people) -> np.ndarray:
    """Uniforms in (0, 1), one per person id: BLAKE2b of (public seed, institution, item, id).
    A person's draw depends on nothing but these (never on row positions or other people)."""
    import hashlib

    prefix = f"{int(seed)}|{institution}|{item}|".encode()
    h = np.array([int.from_bytes(hashlib.blake2b(prefix + str(p).encode(), digest_size=8).digest(), "big")
                  for p in people], dtype=np.float64)
    return (h + 0.5) / 2.0**64


def placebo_data(d: InstitutionData, seed: int) -> InstitutionData:
    """``d`` with each item's ``exposed`` shifted cyclically, one step, among the institution's
    rows of that item in the order of a keyed hash of the person id (:func:`_keyed_uniform`;
    a uniformly random cycle: no row keeps its own exposure, the item's exposure rate is kept);
    engagement kept consistent with the contract (empty where not exposed, the public lower
    bound where a placebo exposure has none); the logged propensity dropped. Sensitivity: see
    the module doc (one person's exposure moves into one other row per item)."""
    inter = d.interactions.copy()
    exposed = inter["exposed"].to_numpy().copy()
    pid = inter["person_id"].astype(str).to_numpy()
    for item, idx in sorted(inter.groupby(inter["item_id"].astype(str)).indices.items()):
        order = idx[np.argsort(_keyed_uniform(seed, d.name, f"placebo/{item}", pid[idx]), kind="stable")]
        exposed[order] = exposed[np.roll(order, 1)]
    eng = inter["engagement"].to_numpy(np.float64)
    lo = float(d.study.engagement_bounds[0])
    inter["exposed"] = exposed
    inter["engagement"] = np.where(exposed == 1, np.where(np.isnan(eng), lo, eng), np.nan)
    if "propensity" in inter.columns:
        inter = inter.drop(columns=["propensity"])
    return replace(d, interactions=inter)


def random_common_cause_data(d: InstitutionData, seed: int) -> InstitutionData:
    """``d`` with a random covariate :data:`RANDOM_COVARIATE` (N(0, 1) from each person's keyed
    uniform, cut to :data:`RANDOM_BOUNDS`, 4 decimals) declared in its study with those public
    bounds and added to ``[causal] covariates`` when the study lists them. A person's value
    depends on the public seed and their own id only: the per-person bound is unchanged."""
    lo, hi = RANDOM_BOUNDS
    u = _keyed_uniform(seed, d.name, "random-common-cause", d.people["person_id"].astype(str).to_numpy())
    value = np.round(np.clip(norm.ppf(u), lo, hi), 4)
    people = d.people.assign(**{RANDOM_COVARIATE: value})
    st = d.study
    cov = Covariate(RANDOM_COVARIATE, "number", lo, hi, description="random common cause (refutation)")
    study = replace(st, covariates=st.covariates + (cov,),
                    causal_covariates=None if st.causal_covariates is None
                    else st.causal_covariates + (RANDOM_COVARIATE,))
    return replace(d, people=people, study=study)


def refute_data(kind: str, d: InstitutionData, seed: int) -> InstitutionData:
    """The refutation ``kind``'s data at institution ``d``, done at the institution (client/
    causal_app.py over Flower, simulations/refute.py in process: the same function, so both
    agree). Seeded by the public ``seed``, the institution's name and each person's id, so every
    institution draws differently, a rerun draws the same, and no draw depends on another person."""
    if kind == "placebo":
        return placebo_data(d, seed)
    if kind == "random-common-cause":
        return random_common_cause_data(d, seed)
    raise ValueError(f"unknown refutation {kind!r}; use one of {', '.join(REFUTATIONS)}")


def refutation_design(cfg, kind: str):
    """The nuisance design a refutation ``kind`` run estimates with: for random common cause, the
    run's explicit covariate list (a :class:`~fedrec.common.causal.config.CausalConfig`'s
    ``covariates``) plus :data:`RANDOM_COVARIATE` (once, however often it is applied); otherwise,
    and when the study's own covariate list is used (``None``), ``cfg`` itself. The one rule the
    server (server/causal.refute), the institutions (client/causal_app.py) and the in-process
    path (simulations/refute.py) share. Public configuration only."""
    from dataclasses import replace as _replace

    if kind == "random-common-cause" and cfg.covariates is not None and RANDOM_COVARIATE not in cfg.covariates:
        return _replace(cfg, covariates=tuple(cfg.covariates) + (RANDOM_COVARIATE,))
    return cfg


def refutation_plan(plan, kind: str):
    """The budget plan the server runs refutation ``kind`` with: ``plan`` (a
    :class:`~fedrec.common.causal.config.BudgetPlan`) with every noise multiplier times
    :data:`SENSITIVITY_FACTOR` ``[kind]``. The clients charge ``GaussianEvent(σ' / f, f C)``
    for a message's σ' (the planned ε) and add noise of std ``σ' C``, which is the noise the
    server's bookkeeping computes from σ' and the causal run's bound C. Post-processing of
    public values; the plan's ``epsilon`` is the run's (its events are the charged ones, not
    ``GaussianEvent(σ')``)."""
    from dataclasses import replace as _replace

    f = SENSITIVITY_FACTOR[kind]
    return plan if f == 1.0 else _replace(plan, sigma={k: s * f for k, s in plan.sigma.items()})


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
