"""``fedrec-sim evaluate-strategies``: off-policy strategy values on the simulators, graded
against a simulated randomized A/B reference.

One run: a federation whose institutions log with **different** policies (each institution is
drawn with its own shift of the domain's logging-policy logits: several loggers), a causal run
(server/causal.py, in process) for the nuisances and the CATE models, then one strategy
release (client/ope_statistics.py, server/strategies.py) evaluating

* ``benefit`` — top-1 of the considered items by the released CATE models,
* ``engagement`` — top-1 by a public engagement model (the simulator's appeal projected on the
  design: the best linear engagement-trained recommender),
* ``random`` — a considered item at random,
* ``logging`` — exposure with the pooled propensity model (the federation's mixed logger),

by DR (the default release; IPS, SNIPS, DM and switch-DR for comparison with
``OPEConfig(estimators=ESTIMATORS)``, ``--estimators all``). The **reference** is the strategy applied to a fresh
population of the same domain (100,000 people by default): its mean true effect
``Σ_j p_j τ_j`` — the expected result of a randomized A/B test of the strategy against
exposing nobody, without the test's sampling noise. Bias and 95% CI coverage per estimator are
measured against it; the difference benefit − engagement is graded on sign and coverage.

:func:`inprocess_send` adds the institutions' releases in numpy with the same client and
server code as a Flower run (like ``fedrec.simulations.causal_cli.inprocess_send``).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from fedrec.common.causal.ope import ESTIMATORS, PAIR_TERMS, OPEConfig, OPEResult
from fedrec.common.datasets import InstitutionData
from fedrec.common.errors import FedrecInputError

__all__ = ["inprocess_send", "evaluate_inprocess", "several_loggers", "reference_population", "engagement_model",
           "reference_values", "one_run", "evaluate_strategies", "summarize"]

STRATEGIES = ("benefit", "engagement", "random", "logging")


# --------------------------------------------------------------------------- in-process path
def inprocess_send(institutions: Sequence[InstitutionData], cfg: OPEConfig, *, rng: np.random.Generator | None = None,
                   cache: dict | None = None):
    """A transport for :func:`fedrec.server.strategies.run_strategies`: each institution computes
    its release with client/ope_statistics.py (clip + the charged event's noise), the sums are
    added in numpy."""
    from fedrec.client.ope_statistics import ope_contribution
    from fedrec.client.statistics import release
    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.release import noise_share

    cache = {} if cache is None else cache
    share = noise_share(cfg.noise_mode, cfg.n_min or len(institutions))

    def send(step: str, arrays: dict, config: dict):
        sigma = float(config["noise-multiplier"])
        specs = json.loads(config["strategies"])
        items, columns = json.loads(config["items"]), json.loads(config["columns"])
        cov = json.loads(config["covariates"])
        total = None
        for d in institutions:
            c = ope_contribution(d, specs, items, arrays, columns=columns, clip=float(config["clip"]),
                                 switch_tau=float(config["switch-tau"]),
                                 square_clip=float(config["square-clip"]),
                                 second_moment_weight=float(config["second-moment-weight"]),
                                 estimators=tuple(json.loads(config["estimators"])),
                                 trim=tuple(json.loads(config["trim"])), covariates=None if cov is None else tuple(cov),
                                 derived=tuple(json.loads(config["derived"])), cache=cache)
            event = GaussianEvent(noise_multiplier=sigma, sensitivity=c.bound) if sigma > 0 else None
            s = release({step: c}, event=event, noise_share=share, generator=rng)[step]
            total = s if total is None else total + s
        return {step: total}, len(institutions), {}

    return send


def evaluate_inprocess(institutions: Sequence[InstitutionData], causal_result, specs: Sequence[dict], cfg: OPEConfig,
                       *, covariates: Sequence[str] | None = None, derived: Sequence[str] = (),
                       rng: np.random.Generator | None = None, cache: dict | None = None) -> tuple[OPEResult, dict]:
    """Strategy values from the causal run ``causal_result``'s public nuisances (in process)."""
    from fedrec.client.statistics import design_columns
    from fedrec.common.causal.scaling import half_range
    from fedrec.server.strategies import nuisance_arrays, run_strategies

    cfg = replace(cfg, n_min=cfg.n_min or len(institutions))  # in process: no dropouts
    nuis = nuisance_arrays(causal_result)
    items = sorted(k[len("beta/"):] for k in nuis if k.startswith("beta/"))
    columns = [c[0] for c in design_columns(institutions[0], covariates, derived)]
    scale = half_range(institutions[0].study.outcome_bounds)
    return run_strategies(inprocess_send(institutions, cfg, rng=rng, cache=cache), items=items, columns=columns,
                          specs=specs, nuisances=nuis, cfg=cfg, scale=scale, covariates=covariates, derived=derived)


# --------------------------------------------------------------------------- the simulated world
def several_loggers(domain: str, *, institutions: int, people: int, seed: int, logger_shift: float = 1.0
                    ) -> tuple[list[InstitutionData], list]:
    """A federation whose institutions log with different policies: institution k is drawn from
    the domain with every item's logging logit shifted by ``s_k`` (evenly spaced in
    ``[-logger_shift, logger_shift]``) and its covariate slopes scaled by ``1 + s_k / 2``."""
    from fedrec.simulations.domains import get_domain, simulate
    from fedrec.simulations.domains.base import Linear

    base = get_domain(domain)
    shifts = np.linspace(-logger_shift, logger_shift, institutions) if institutions > 1 else np.zeros(1)
    sizes = np.full(institutions, people // institutions)
    out, truths = [], []
    for k, s in enumerate(shifts):
        items = tuple(replace(it, policy=Linear(it.policy.intercept + float(s),
                                                {f: c * (1.0 + float(s) / 2) for f, c in it.policy.coef.items()}))
                      for it in base.items)
        sim = simulate(replace(base, items=items), institutions=1, people=int(sizes[k]), seed=seed * 1000 + k, skew=0.0)
        d = sim.institutions[0]
        inter = d.interactions
        pos = {p: i for i, p in enumerate(sim.truth.person_ids.astype(str))}
        col = {it: j for j, it in enumerate(sim.truth.item_ids)}
        logged = sim.truth.propensity[inter["person_id"].map(pos).to_numpy(), inter["item_id"].map(col).to_numpy()]
        out.append(replace(d, name=f"institution_{k:02d}", interactions=inter.assign(propensity=logged)))
        truths.append(sim.truth)
    return out, truths


def reference_population(domain: str, *, people: int = 100_000, seed: int = 987_654):
    """A fresh population of the domain (one institution, the base logging policy): the A/B
    reference's people, their considered items and their true effects."""
    from fedrec.simulations.domains import domain_federation

    insts, truth = domain_federation(domain, institutions=1, people=people, seed=seed, skew=0.0)
    return insts[0], truth


def engagement_model(domain: str, population: InstitutionData, *, covariates=None, derived=()) -> dict:
    """A public linear engagement model per item on the bound-scaled design: the simulator's
    appeal (engagement latent) projected on the design by least squares over the reference
    population — the best linear engagement-trained recommender (public simulator knowledge,
    nothing from the institutions)."""
    from fedrec.client.statistics import design_columns, people_design
    from fedrec.simulations.domains import get_domain

    dom = get_domain(domain)
    x = people_design(population, covariates, derived)
    f = dom.features(population.people)
    names = ["intercept"] + [c[0] for c in design_columns(population, covariates, derived)]
    out = {}
    for it in dom.items:
        coef, *_ = np.linalg.lstsq(x, it.appeal(f, len(x)), rcond=None)
        out[it.item_id] = dict(zip(names, [float(v) for v in coef]))
    return out


def reference_values(population: InstitutionData, truth, specs: Sequence[dict], nuisances: dict, items: Sequence[str],
                     columns: Sequence[str], *, covariates=None, derived=(), trim=(0.05, 0.95)) -> dict[str, float]:
    """Each strategy's mean true effect ``Σ_j p_j τ_j`` over the reference population (outcome
    units): the strategy computed by the very client code, graded with the true CATE."""
    from fedrec.client.ope_statistics import exposure_probabilities, strategy_rows

    rows = strategy_rows(population, items, nuisances, covariates=covariates, derived=derived, trim=trim)
    pos = {p: i for i, p in enumerate(truth.person_ids.astype(str))}
    people = population.people["person_id"].astype(str).to_numpy()
    gt_rows = np.array([pos[p] for p in people])[rows["person"]]
    gt_cols = np.array([list(truth.item_ids).index(it) for it in items])[rows["item"]]
    tau = truth.cate[gt_rows, gt_cols]
    n = len(people)
    return {s["name"]: float(np.sum(exposure_probabilities(s, rows, items, columns, population) * tau) / n)
            for s in specs}


def logging_value(institutions: Sequence[InstitutionData], truths: Sequence) -> float:
    """Mean true effect of the institutions' own loggers over the federation's people:
    ``Σ_j e_j τ_j`` with each institution's true logging propensity (the logging strategy's
    reference; a sample mean, as the loggers exist only in the federation)."""
    total, n = 0.0, 0
    for d, tr in zip(institutions, truths):
        inter = d.interactions
        pos = {p: i for i, p in enumerate(tr.person_ids.astype(str))}
        col = {it: j for j, it in enumerate(tr.item_ids)}
        r, c = inter["person_id"].map(pos).to_numpy(), inter["item_id"].map(col).to_numpy()
        total += float(np.sum(tr.propensity[r, c] * tr.cate[r, c]))
        n += len(d.people)
    return total / n


# --------------------------------------------------------------------------- one run, many runs
def crossfit_runs(institutions: Sequence[InstitutionData], ccfg, *, salt: str, folds: int = 2,
                  rng: np.random.Generator | None = None) -> list[dict]:
    """One causal run per fold on that fold's people at every institution (in process); returns
    each run's ``items`` (CATE models). Privacy: one more causal run per person — each person is
    in one fold only (parallel composition over the folds), so cross-fitting costs each person the
    causal run's ε once more; an institution's ledger records each fold's run."""
    from fedrec.simulations.causal_cli import estimate_inprocess

    if folds != 2:
        raise ValueError(f"cross-fitting uses two folds (causal.expert.fold is 0 or 1), got {folds}")
    # the fold travels in the config, and estimate_inprocess keeps that fold's people with the
    # Flower client's own filter (client/statistics.fold_subset)
    return [estimate_inprocess(institutions, replace(ccfg, fold=k, fold_salt=str(salt)), rng=rng).items
            for k in range(folds)]


def one_run(domain: str, *, seed: int, epsilon: float, noise_mode: str, institutions: int = 8, people: int = 20_000,
            logger_shift: float = 1.0, ope: OPEConfig | None = None, reference=None, engagement=None,
            crossfit: bool = True) -> dict:
    """One federation: causal run + strategy release at ``epsilon`` each; rows of estimates
    with the reference values. ``crossfit``: also the cross-fitted benefit ranking
    (``benefit-cf``: two more causal runs, one per half of the people — :func:`crossfit_runs`)."""
    from fedrec.client.statistics import design_columns
    from fedrec.server.strategies import (benefit_strategy, crossfit_benefit_strategy, logging_strategy,
                                          nuisance_arrays, random_strategy, rank_strategy)
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config

    insts, truths = several_loggers(domain, institutions=institutions, people=people, seed=seed,
                                    logger_shift=logger_shift)
    ccfg, _ = resolve_config(insts, epsilon=epsilon)
    ccfg = replace(ccfg, noise_mode=noise_mode)
    rng = np.random.default_rng([seed, 77])
    causal = estimate_inprocess(insts, ccfg, rng=rng)
    study = insts[0].study
    cov, der = ccfg.covariates, ccfg.derived
    if reference is None:
        reference = reference_population(domain)
    if engagement is None:
        engagement = engagement_model(domain, reference[0], covariates=cov, derived=der)
    specs = [benefit_strategy(causal.items, study.outcome_better), rank_strategy("engagement", engagement, "higher"),
             random_strategy(), logging_strategy()]
    if crossfit:
        salt = f"crossfit-{seed}"
        specs.insert(1, crossfit_benefit_strategy(crossfit_runs(insts, ccfg, salt=salt, rng=np.random.default_rng([seed, 78])), study.outcome_better,
                                                  salt))
    cfg = replace(ope or OPEConfig(), epsilon=epsilon, noise_mode=noise_mode)
    res, facts = evaluate_inprocess(insts, causal, specs, cfg, covariates=cov, derived=der, rng=rng)
    nuis = nuisance_arrays(causal)
    items = sorted(k[len("beta/"):] for k in nuis if k.startswith("beta/"))
    columns = [c[0] for c in design_columns(insts[0], cov, der)]
    truth = reference_values(reference[0], reference[1], specs, nuis, items, columns, covariates=cov, derived=der,
                             trim=cfg.trim)
    # the logging strategy is each institution's own logger: graded on the federation itself
    truth["logging"] = logging_value(insts, truths)
    rows = []
    for s in specs:
        for est in cfg.estimators:
            rows.append(_row(s["name"], est, res.estimate(s["name"], est), truth[s["name"]]))
    for est in [t for t in PAIR_TERMS if t in cfg.estimators]:
        for a in [s["name"] for s in specs if s["name"].startswith("benefit")]:
            rows.append(_row(f"{a}-engagement", est, res.difference(a, "engagement", est),
                             truth[a] - truth["engagement"]))
    return {"domain": domain, "seed": seed, "epsilon": epsilon if math.isfinite(epsilon) else "inf",
            "noise_mode": noise_mode, "rows": rows, "release": facts}


def _row(strategy: str, estimator: str, e, truth: float) -> dict:
    """One graded row: the estimate, its CI (NaN for an in-sample one, which has none) and, for
    the yardstick, ``value ± z·SE`` as ``naive_ci_*`` (how far an in-sample CI would miss)."""
    lo, hi = e.ci
    nlo, nhi = e.naive_ci
    return {"strategy": strategy, "estimator": estimator, "value": e.value, "se": e.se, "ci_low": lo, "ci_high": hi,
            "naive_ci_low": nlo, "naive_ci_high": nhi, "in_sample": e.in_sample, "truth": truth}


def _binomial_se(hits: np.ndarray) -> float:
    """Binomial standard error ``sqrt(p (1 - p) / n)`` of a share of runs."""
    p = float(np.mean(hits))
    return float(math.sqrt(p * (1.0 - p) / len(hits)))


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Per (domain, ε, noise mode, strategy, estimator): bias, RMSE, coverage, mean CI width,
    ``error_sd_to_se`` (the SD of estimate − truth across runs over the mean reported SE: about 1
    when the SE is right, above 1 when it is too small) and, for the difference, the share of
    runs with the right sign (coverage and sign with their binomial SEs). In-sample estimates
    have no CI: their ``coverage`` and ``ci_width`` are NaN and ``naive_coverage`` says how often
    ``value ± z·SE`` would have covered (rows of older runs without ``naive_ci_*`` use the CI)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        for row in r["rows"]:
            groups.setdefault((r["domain"], r["epsilon"], r["noise_mode"], row["strategy"], row["estimator"]),
                              []).append(row)
    out = []
    for (dom, eps, mode, strat, est), rows in groups.items():
        err = np.array([x["value"] - x["truth"] for x in rows])
        own = any(x.get("in_sample") for x in rows)
        naive = np.array([x.get("naive_ci_low", x["ci_low"]) <= x["truth"] <= x.get("naive_ci_high", x["ci_high"])
                          for x in rows])
        cover = np.array([x["ci_low"] <= x["truth"] <= x["ci_high"] for x in rows])
        width = np.array([x["ci_high"] - x["ci_low"] for x in rows])
        sign = np.array([np.sign(x["value"]) == np.sign(x["truth"]) for x in rows])
        se = np.array([x["se"] for x in rows])
        out.append({"kind": "policy_value", "domain": dom, "epsilon": eps, "noise_mode": mode, "strategy": strat,
                    "estimator": est, "runs": len(rows), "truth": float(np.mean([x["truth"] for x in rows])),
                    "bias": float(err.mean()), "bias_se_units": float(err.mean() / max(se.mean(), 1e-300)),
                    "rmse": float(np.sqrt(np.mean(err**2))),
                    "error_sd_to_se": float(err.std(ddof=1) / max(se.mean(), 1e-300)) if len(err) > 1 else float("nan"),
                    "coverage": math.nan if own else float(cover.mean()),
                    "coverage_se": math.nan if own else _binomial_se(cover),
                    "naive_coverage": float(naive.mean()), "in_sample": own,
                    "ci_width": math.nan if own else float(width.mean()),
                    "sign_correct": float(sign.mean()), "sign_correct_se": _binomial_se(sign)})
    # CI width ratio to the non-private estimate of the same cell, where both were run
    base = {(r["domain"], r["strategy"], r["estimator"]): r["ci_width"] for r in out if r["epsilon"] == "inf"}
    for r in out:
        b = base.get((r["domain"], r["strategy"], r["estimator"]))
        r["ci_width_ratio"] = float(r["ci_width"] / b) if b else float("nan")
    return out


def evaluate_strategies(domains: Sequence[str], *, seeds: Sequence[int], epsilons: Sequence[float],
                        noise_modes: Sequence[str], institutions: int = 8, people: int = 20_000,
                        logger_shift: float = 1.0, ope: OPEConfig | None = None, progress=None,
                        crossfit: bool = True) -> dict:
    """Many runs -> ``{"meta", "runs", "rows"}`` (rows: :func:`summarize`); ``crossfit``: also
    the cross-fitted benefit ranking (:func:`one_run`)."""
    if not seeds:
        raise FedrecInputError("--seeds: no seed given; fix: e.g. --seeds 5")
    runs = []
    for dom in domains:
        ref = reference_population(dom)
        for eps in epsilons:
            for mode in (noise_modes if math.isfinite(eps) else ["local"]):
                for seed in seeds:
                    run = one_run(dom, seed=seed, epsilon=eps, noise_mode=mode, institutions=institutions,
                                  people=people, logger_shift=logger_shift, ope=ope, reference=ref,
                                  crossfit=crossfit)
                    runs.append(run)
                    if progress:
                        progress(f"{dom} ε={eps} {mode} seed {seed} done")
    meta = {"domains": list(domains), "seeds": list(seeds), "epsilons": [e if math.isfinite(e) else "inf" for e in epsilons],
            "noise_modes": list(noise_modes), "institutions": institutions, "people": people,
            "logger_shift": logger_shift, "reference": "mean true effect of the strategy over 100,000 fresh people",
            "crossfit": crossfit,
            "epsilon_note": "the causal run and the strategy release each spend ε (total per institution: both composed); "
                            "benefit-cf: one more causal run per person (each person is in one of two halves)"}
    return {"meta": meta, "runs": runs, "rows": summarize(runs)}


# --------------------------------------------------------------------------- mediation (in process)
def mediation_inprocess(institutions: Sequence[InstitutionData], item: str, *, epsilon: float,
                        noise_mode: str = "local", delta: float = 1e-5, graph=None,
                        covariates: Sequence[str] | None = None, derived: Sequence[str] = (),
                        rng: np.random.Generator | None = None) -> dict:
    """Direct and indirect (through engagement) effect of exposure to ``item`` on the outcome from
    one DP Gram release (client/ope_statistics.mediation_contribution, summed in numpy), in
    outcome units with SEs carrying the noise. ``graph``: a declared :class:`CausalGraph`; its
    back-door set (refused with the open path when there is none, before anything is released)
    chooses the adjustment covariates, else every design column."""
    from fedrec.client.ope_statistics import mediation_contribution, mediation_rows
    from fedrec.client.statistics import release
    from fedrec.common.causal.scaling import half_range
    from fedrec.common.causal.graph import _unvech, check_identifiable, mediation
    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.gaussian import summed_noise_var
    from fedrec.common.privacy.release import noise_share
    from fedrec.server.strategies import noise_multiplier

    study = institutions[0].study
    _, names = mediation_rows(institutions[0], item, covariates=covariates, derived=derived)
    design = names[1:-3]
    if graph is not None:
        keep = set(check_identifiable(graph, study.covariate_names))  # before any release
        adjust = [c for c in design if c.split("=", 1)[0] in keep]
    else:
        adjust = design
    cfg = OPEConfig(epsilon=epsilon, delta=delta, noise_mode=noise_mode, n_min=len(institutions))
    sigma = noise_multiplier(cfg)
    share = noise_share(noise_mode, len(institutions))
    total, bound = None, None
    for d in institutions:
        c = mediation_contribution(d, item, covariates=covariates, derived=derived)
        bound = c.bound
        event = GaussianEvent(noise_multiplier=sigma, sensitivity=c.bound) if sigma > 0 else None
        s = release({"gram": c}, event=event, noise_share=share, generator=rng)["gram"]
        total = s if total is None else total + s
    nv = summed_noise_var(sensitivity=bound, noise_multiplier=sigma, noise_mode=noise_mode, n_min=len(institutions),
                          contributors=len(institutions))
    med = mediation(_unvech(total, len(names)), names, treatment="exposed", mediator="engagement",
                    outcome="outcome", adjust=adjust, noise_var=nv)
    sy = half_range(study.outcome_bounds)
    lo, hi = study.engagement_bounds
    out = {k: {"estimate": v[0] * sy, "se": v[1] * sy} for k, v in
           (("total", med.total), ("direct", med.direct), ("indirect", med.indirect))}
    out.update({"a_engagement_per_exposure": med.a * (hi - lo), "b_outcome_per_engagement": med.b * sy / (hi - lo),
                "adjust": adjust, "epsilon": epsilon if math.isfinite(epsilon) else "inf", "noise_var": nv})
    return out
