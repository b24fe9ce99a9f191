"""The causal estimation protocol, step by step (server side).

One run estimates, for each requested item, the effect of ``exposed`` on the outcome:

0. ``moments`` — DP sum of ``vech(x x')`` over people (each once): the server derives a public
   whitening of the bound-scaled design (per-covariate DP mean/sd; bounded by a radius through
   fit weights, or by clipping the features).
   With the LDA start (default) it also carries each item's per-arm covariate sums, from which
   the server computes where Newton starts (linear discriminant analysis).
1. ``propensity:k`` (k = 1..newton_steps) — the server sends the current logistic
   coefficients; each institution releases the DP sum of ``[(T - e) w, vech(e(1-e) w w')]``
   per item; the server takes a Newton step.
2a. ``outcome-range`` (aipw/ra under DP) — a DP histogram of the scaled outcome on a public
   signed grid; per item the server picks the interval (centre, half) the outcome models fit
   (all but ``outcome_range_tail`` each side, widened ``outcome_range_margin`` times).
2. ``outcome`` — DP sums of per-arm ``vech(W'W), W'y', y''y'`` with ``y'`` the outcome mapped
   to that interval and clipped to it; the server fits the per-arm ridge models, maps them back
   (CATE = their difference) with their DP residual variances.
3. ``scale`` — a DP histogram of |psi| per item on a public grid; the server picks each item's
   psi clip.
4. ``influence`` — the server sends the nuisances and the clips; institutions release DP sums
   of ``[1, psi, psi^2]`` (weighted, psi over its item's clip); the server forms ATE, SE (with the DP noise variance of
   these sums and of the nuisance fits, the latter tracked through the Newton steps and the
   ridge fits and propagated by the delta method) and CI.

Every step is one round of a :class:`~fedrec.server.aggregation.SumProtocol` (SecAgg+ by
default): the server sees only sums, and only noised ones. The driver
:func:`run_protocol` is transport-free: :func:`estimate` plugs in Flower rounds, the benchmark
plugs in numpy sums of the very same client functions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrec.common.causal.clipping import (
    PSI_SQUARE_GRID, auto_gram_weight, outcome_grid, outcome_range_from_histogram, clip_from_histogram,
    noise_limited_clip, histogram_sum_squares, psi_square_weight, psi_grid,
)
from fedrec.common.causal.config import BudgetPlan, CausalConfig, plan_budget
from fedrec.common.causal.estimator import FederatedCausalEstimator
from fedrec.common.causal.influence import cross_fit_variance, weighted_gram_scale
from fedrec.common.causal.linalg import vech_len
from fedrec.common.causal.nuisance import (
    arm_from_mapped, lda_start, newton_update, newton_noise_cov, ridge_fit,
)
from fedrec.common.causal.scaling import half_range
from fedrec.common.causal.sensitivity import (
    INFLUENCE_WEIGHTS, psi_worst_case, influence_weights, influence_bound, release_sensitivity,
)
from fedrec.common.causal.whitening import whitening_from_moments
from fedrec.common.causal.recommend import ate_verdict, effect_limit
from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.gaussian import noise_std, summed_noise_var
from fedrec.server.aggregation import RoundFailed, SumProtocol, numpy_to_arrays, split_replies
from fedrec.server.exchange import send_and_receive

log = logging.getLogger(__name__)

__all__ = ["CausalResult", "StudyInfo", "run_protocol", "estimate", "app", "MESSAGE_TYPES"]

#: message type of each step (client handlers: client/causal_app.py)
MESSAGE_TYPES = {"study": "query.causal_study", "moments": "query.causal_moments", "propensity": "query.causal_propensity",
                 "scale": "query.causal_scale",
                 "outcome-range": "query.causal_outcome_range",
                 "outcome": "query.causal_outcome", "influence": "query.causal_influence"}


@dataclass(frozen=True)
class StudyInfo:
    """What the server knows of the study: public declarations only."""

    columns: list[tuple[str, float, float]]
    outcome_bounds: tuple[float, float]
    better: str
    items: list[str]

    @property
    def p(self) -> int:
        return len(self.columns) + 1


@dataclass
class CausalResult:
    """Per item: ATE, SE, CI (outcome units) and the CATE model; the run's budget plan."""

    items: dict[str, dict] = field(default_factory=dict)
    estimators: dict[str, FederatedCausalEstimator] = field(default_factory=dict)
    plan: BudgetPlan | None = None
    epsilon: dict[str, float] = field(default_factory=dict)
    contributors: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        plan = self.plan
        return {
            "items": self.items,
            "budget": None if plan is None else {
                "epsilon": _num(plan.epsilon), "delta": plan.delta,
                "steps": {k: {"share": plan.shares[k], "noise_multiplier": plan.sigma[k]} for k in plan.sigma},
            },
            "epsilon_per_institution": {k: _num(v) for k, v in self.epsilon.items()},
            "contributors": self.contributors,
            "config": self.config,
        }


def _num(x: float):
    return x if math.isfinite(x) else "inf"


# Send(step, arrays_for_clients, config) -> (totals {item: summed array}, n_contributors, metrics)
Send = Callable[[str, dict[str, np.ndarray], dict], tuple[dict[str, np.ndarray], int, dict]]


def _noise_var(cfg: CausalConfig, sigma: float, sens: float, n_contrib: int) -> float:
    """Public noise variance per coordinate of a summed release."""
    return summed_noise_var(sensitivity=sens, noise_multiplier=sigma, noise_mode=cfg.noise_mode, n_min=cfg.n_min,
                            contributors=n_contrib)


def _ridge(cfg: CausalConfig, nv: float, p: int) -> float:
    """Ridge penalty: the config's, else 0 (the eigenvalue floor alone keeps noisy Grams PD:
    a ridge on the bound-scaled design shrinks the large coefficients that narrow covariate
    ranges need, and biased the nuisances more than the noise did in our measurements)."""
    if cfg.ridge is not None:
        return cfg.ridge
    return 0.0


def _floor(nv: float, p: int, k: float = 2.0) -> float:
    """Eigenvalue floor of a noisy Gram/Hessian: ``k`` x about the spectral norm of its noise
    (``k`` = ``floor_k`` of the config)."""
    return k * math.sqrt(nv * p) if nv > 0 and k > 0 else 1e-8


def _clip_and_weights(cfg: CausalConfig, plan: BudgetPlan, counts: dict[str, np.ndarray], edges: np.ndarray,
                      items: list[str], *, contributors: int) -> tuple[dict[str, float], tuple[float, float]]:
    """Each item's psi clip and the influence release's relative weights, from the ``scale``
    step's DP |psi| histograms (``counts`` per item). Public post-processing; releases nothing.

    An item's clip is its tail-rule edge (:func:`clip_from_histogram` at ``clip_tail``, times
    ``clip_margin``: both by noise mode unless set), raised where the budget allows
    (:func:`noise_limited_clip`) and cut to the worst case. The release carries ``psi / clip``
    per item (:func:`influence_weights`), so its bound is the same whatever the clips and each
    item's noise scales with its own clip:
    one item's wide tail does not widen the others' CIs. The noise-limited rule needs the
    influence sum's noise per unit of clip, which depends on the release's psi^2 weight ``k``
    (:func:`influence_bound`), while ``k`` (:func:`psi_square_weight`, the most demanding
    item's: one ``k`` for the release) depends on the clips. The pair is the smallest ``k`` on
    psi_square_weight's grid that is enough at the clips it implies (a larger k lowers those
    clips and the k they need, so the scan stops at the fixed point).
    """
    j = len(items)
    sigma = plan.sigma["influence"]
    a = cfg.influence_count_weight
    # sum(psi^2) from the bins below the psi_tail edge; the clip from the clip_tail edge (the same
    # edge with distributed noise; with local noise a lower, resolvable one, CausalConfig.clip_tail)
    tail_edge = {it: clip_from_histogram(counts[it], edges, tail=cfg.psi_tail) for it in items}
    sum_sq = {it: histogram_sum_squares(counts[it], edges, upto=tail_edge[it]) for it in items}
    clip_edge = {it: clip_from_histogram(counts[it], edges, tail=cfg.clip_tail) for it in items}
    worst = psi_worst_case(cfg.estimator, cfg.trim)

    def clips_at(k: float) -> dict[str, float]:
        # noise SD of an item's released psi sum per unit of its clip, with weights (a, k)
        unit_sd = math.sqrt(_noise_var(cfg, sigma, influence_bound((a, k)) * math.sqrt(j), contributors))
        return {it: min(max(cfg.clip_margin * clip_edge[it],
                            noise_limited_clip(sum_sq[it], noise_sd_per_clip=unit_sd, ratio=cfg.psi_noise_ratio)),
                        worst) for it in items}

    def k_needed(clips: dict[str, float]) -> float:  # on PSI_SQUARE_GRID, psi_square_weight's grid
        return max(psi_square_weight(sum_sq[it], _noise_var(cfg, sigma, clips[it] * math.sqrt(j), contributors),
                                     clips[it], count_weight=a, target=cfg.psi_square_error) for it in items)

    if not cfg.psi_square_error > 0:
        k = INFLUENCE_WEIGHTS[1]
        return clips_at(k), (a, k)
    for k in PSI_SQUARE_GRID:
        clips = clips_at(float(k))
        if k_needed(clips) <= k:
            return clips, (a, float(k))
    k = float(PSI_SQUARE_GRID[-1])
    return clips_at(k), (a, k)


def run_protocol(send: Send, study: StudyInfo, cfg: CausalConfig, *, plan: BudgetPlan | None = None) -> CausalResult:
    """The estimation protocol over any transport (see module doc).

    Everything here is post-processing of released sums; ``send(step, arrays, config)``
    performs one release round and returns (sums by block name, contributors, per-node metrics).
    """
    plan = plan or plan_budget(cfg)
    items = list(cfg.items) or list(study.items)
    p = study.p
    scale = half_range(study.outcome_bounds)
    j = len(items)
    result = CausalResult(plan=plan, config=dict(cfg.to_flat()))

    def record(step: str, n: int, metrics: dict) -> None:
        result.contributors[step] = n
        for node, m in metrics.items():
            if "epsilon" in m:
                result.epsilon[str(node)] = float(m["epsilon"])

    # 0. covariate moments of all people (each once) -> public whitening of the design; with
    # the LDA start, also each item's per-arm covariate sums -> where Newton starts
    sigma = plan.sigma["moments"]
    lda = cfg.propensity_start == "lda" and cfg.estimator in ("aipw", "ipw")
    marrays = {"moments/arms": np.array([1.0 if lda else 0.0])}
    totals, n, metrics = send("moments", marrays, {"noise-multiplier": sigma})
    record("moments", n, metrics)
    nv = _noise_var(cfg, sigma, release_sensitivity("moments", p, marrays, j), n)
    moments_sum = totals["moments"][:vech_len(p)]
    wh = whitening_from_moments(moments_sum, p, noise_var=nv, radius_factor=cfg.radius_factor,
                                mode=cfg.whiten_mode, weighted=cfg.weighted_fits)
    r2 = wh.r2
    warrays = {"whiten/a": wh.a, "whiten/b": wh.b, "whiten/radius": np.array([wh.radius if math.isfinite(wh.radius) else -1.0]),
               "whiten/weighted": np.array([1.0 if wh.weighted else 0.0])}

    # 1. propensity: Newton steps on the whitened design, from the LDA start (or zero)
    if lda:
        arm_sums = totals["moments"][vech_len(p):]
        beta = {it: lda_start(moments_sum, arm_sums[k * 2 * p:(k + 1) * 2 * p], p, wh, noise_var=nv)
                for k, it in enumerate(items)}
    else:
        beta = {it: np.zeros(p) for it in items}
    beta_cov = {it: np.zeros((p, p)) for it in items}  # covariance of the DP noise beta carries
    arm_scale = math.inf  # smallest fitted-propensity Hessian intercept entry (automatic Gram weight)
    if cfg.estimator in ("aipw", "ipw"):
        hw = cfg.hessian_weight
        for k in range(1, cfg.newton_count + 1):
            step = f"propensity:{k}"
            sigma = plan.sigma[step]
            arrays = {**warrays, **{f"beta/{it}": beta[it] for it in items}, "hessian-weight": np.array([hw])}
            totals, n, metrics = send(step, arrays, {"noise-multiplier": sigma})
            record(step, n, metrics)
            nv = _noise_var(cfg, sigma, release_sensitivity(step, p, arrays, j), n)  # per gradient coordinate
            nv_h = nv / hw**2  # per Hessian coordinate, after dividing the weight out
            lam = _ridge(cfg, nv, p)
            for it in items:
                tot = totals[it]
                hess = tot[p:] / hw
                floor = _floor(nv_h, p, cfg.newton_floor_k)
                beta[it] = newton_update(beta[it], tot[:p], hess, ridge=lam, floor=floor)
                beta_cov[it] = newton_noise_cov(beta_cov[it], hess, nv, ridge=lam, floor=floor)
                if k == cfg.newton_count:
                    arm_scale = min(arm_scale, float(hess[0]))
    # 2. outcome models per arm
    arms: dict[str, tuple] = {}
    out_noise = 0.0
    gw = 1.0
    ymap = {it: (0.0, 1.0) for it in items}  # (centre, half) of the interval each item's models fit
    if "outcome-range" in plan.sigma:
        # a DP histogram of the scaled outcome -> per item, the interval holding all but the
        # tails: declared bounds are often far wider than the outcome's spread (finance:
        # +-100,000 USD around a few thousand), and X'y's noise scales with the interval
        edges = outcome_grid(cfg.outcome_grid_factor)
        rarrays = {"outcome-edges": edges}
        sigma = plan.sigma["outcome-range"]
        totals, n, metrics = send("outcome-range", rarrays, {"noise-multiplier": sigma})
        record("outcome-range", n, metrics)
        count_sd = math.sqrt(_noise_var(cfg, sigma, release_sensitivity("outcome-range", p, rarrays, j), n))
        ymap = {it: outcome_range_from_histogram(totals[it], edges, tail=cfg.outcome_range_tail,
                                                 margin=cfg.outcome_range_margin, noise_sd=count_sd) for it in items}
    if cfg.estimator in ("aipw", "ra"):
        sigma = plan.sigma["outcome"]
        gw = cfg.gram_weight
        if gw is None:
            gw = 1.0 if not math.isfinite(arm_scale) else auto_gram_weight(
                arm_scale=arm_scale, noise_multiplier=sigma, r2=r2, p=p, n_items=j, contributors=n,
                noise_mode=cfg.noise_mode, n_min=cfg.n_min, floor_k=cfg.floor_k, lowest=cfg.gram_weight_min,
                max_ratio=cfg.gram_floor_ratio)
        arrays = {**warrays, "gram-weight": np.array([gw]), **{f"outcome-map/{it}": np.array(ymap[it]) for it in items}}
        totals, n, metrics = send("outcome", arrays, {"noise-multiplier": sigma})
        record("outcome", n, metrics)
        xy_noise = _noise_var(cfg, sigma, release_sensitivity("outcome", p, arrays, j), n)  # X'y, y'y
        out_noise = xy_noise / gw**2  # per Gram coordinate, after dividing the weight out
        # whitened design: the ridge shrinks slopes isotropically towards "no covariate effect";
        # at about the spectral norm of X'y's noise (which carries most of the coefficients'
        # noise) it trades a little bias for much less noise. Not the Gram's: a Gram weight < 1
        # raises the Gram's noise, and a ridge following it shrank the models more than their
        # noise called for (health ε = 2 local bias -0.30 -> -0.15 SE, docs/causal.md). The
        # eigenvalue floor, which keeps the noisy Gram PD, still follows the Gram's noise.
        lam = cfg.ridge if cfg.ridge is not None else cfg.outcome_ridge_k * _floor(xy_noise, p)
        m = vech_len(p) + p + 1
        fit_kw = dict(ridge=lam, noise_var=xy_noise, gram_noise_var=out_noise, floor=_floor(out_noise, p, cfg.floor_k))
        for it in items:
            blks = [totals[it][a * m:(a + 1) * m] for a in (0, 1)]
            parts = ([b[:vech_len(p)] / gw for b in blks], [b[vech_len(p):vech_len(p) + p] for b in blks],
                     [float(b[-1]) for b in blks])
            fits = [ridge_fit(g, xy, yy, **fit_kw) for g, xy, yy in zip(*parts)]
            arms[it] = (arm_from_mapped(fits[0], *ymap[it]), arm_from_mapped(fits[1], *ymap[it]))
    # 3. influence terms (aipw/ipw): first each item's psi clip, then the clipped sums
    clips: dict[str, float] = {}
    rel = (cfg.influence_count_weight, INFLUENCE_WEIGHTS[1])  # the influence release's relative weights
    if cfg.estimator in ("aipw", "ipw"):
        nuis = dict(warrays)
        for it in items:
            nuis[f"beta/{it}"] = beta[it]
            if it in arms:
                nuis[f"mu0/{it}"] = arms[it][0].coef
                nuis[f"mu1/{it}"] = arms[it][1].coef
        if cfg.psi_clip is not None:
            clips = {it: cfg.psi_clip for it in items}
        elif not cfg.dp:  # no noise: no reason to clip below the worst case
            clips = {it: psi_worst_case(cfg.estimator, cfg.trim) for it in items}
        else:
            # a DP histogram of |psi| on a public grid; an item's clip is the grid edge above
            # which at most clip_tail of its people lie (CausalConfig.clip_tail: by noise mode)
            # (the grid shrinks with the outcome models' interval: psi's spread follows y's)
            edges = psi_grid(cfg.estimator, cfg.trim, factor=cfg.psi_grid_factor) * max(h for _, h in ymap.values())
            sigma = plan.sigma["scale"]
            totals, n, metrics = send("scale", {**nuis, "edges": edges}, {"noise-multiplier": sigma})
            record("scale", n, metrics)
            clips, rel = _clip_and_weights(cfg, plan, totals, edges, items, contributors=n)
        # one release, one bound (the clips do not enter it: each item sends psi / its clip)
        arrays = {**nuis, **{f"clip/{it}": np.array([clips[it]]) for it in items}, "influence-weights": np.array(rel)}
        sigma = plan.sigma["influence"]
        totals, n, metrics = send("influence", arrays, {"noise-multiplier": sigma})
        record("influence", n, metrics)
        influence_nv = _noise_var(cfg, sigma, release_sensitivity("influence", p, arrays, j, items), n)
    for it in items:
        est = FederatedCausalEstimator(covariate_bounds=[(lo, hi) for _, lo, hi in study.columns],
                                       outcome_bounds=study.outcome_bounds, estimator=cfg.estimator, trim=cfg.trim,
                                       whitening=wh)
        a0, a1 = arms.get(it, (None, None))
        if cfg.estimator == "ra":
            est.fit(prop_coef=None, arm1=a1, arm0=a0, noise={"gram": out_noise})
        else:
            w_n, w_psi, w_2 = influence_weights(clips[it], rel)
            nv = influence_nv  # per released coordinate
            tot = totals[it]
            sums = {"n": tot[0] / w_n, "psi": tot[1] / w_psi, "psi2": tot[2] / w_2}
            noise = {"n": nv / w_n**2, "psi": nv / w_psi**2, "psi2": nv / w_2**2}
            # DP noise in the nuisances -> ATE variance (delta method, see docs/causal.md)
            cross = 0.0
            if a1 is not None and cfg.dp:
                ks = weighted_gram_scale(moments_sum, p, wh, sums["n"], float(np.trace(a1.gram) + np.trace(a0.gram)))
                cross = cross_fit_variance(beta_cov[it], a1, a0, sums["n"], k_scale=ks)
            if cfg.nuisance_variance:
                noise["nuisance"] = cross
            est.fit(prop_coef=beta[it], arm1=a1, arm0=a0, sums=sums, noise=noise)
            est.extra["psi_clip"] = clips[it]
            est.extra["influence_weights"] = rel
        lo, hi = est.ate_interval(cfg.alpha)
        r = est.result
        assert r is not None
        # an effect beyond ±(max - min) of the declared outcome is impossible: the estimate and its
        # interval are cut to that range (post-processing), and the row says so
        limit = effect_limit(study.outcome_bounds)
        ate = min(max(r.ate, -limit), limit)
        cut = (ate != r.ate) or lo < -limit or hi > limit
        lo, hi = max(lo, -limit), min(hi, limit)
        row = {"ate": ate, "se": r.se, "ci_low": lo, "ci_high": hi, "n": r.n,
               "verdict": ate_verdict(lo, hi, study.better), "cut_to_possible_range": cut,
               "uninformative": bool(hi - lo >= limit),
               "sampling_se": math.sqrt(r.sampling_var), "noise_se": math.sqrt(r.noise_var),
               "nuisance_se": math.sqrt(r.nuisance_var), "sampling_var_noise_sd": r.sampling_var_noise_sd,
               "estimator": cfg.estimator}
        if "outcome-range" in plan.sigma:  # the step ran (its interval may still be the whole range)
            c, h = ymap[it]
            mid = (study.outcome_bounds[0] + study.outcome_bounds[1]) / 2.0
            row["outcome_range"] = [mid + (c - h) * scale, mid + (c + h) * scale]
        if "psi_clip" in est.extra:
            row["psi_clip_outcome_units"] = est.extra["psi_clip"] * scale
            row["psi_square_weight"] = est.extra["influence_weights"][1]
        if a1 is not None:
            row["gram_weight"] = gw
            row["cate_coef"] = dict(zip(["intercept"] + [c[0] for c in study.columns],
                                        [float(v) for v in est.cate_coef()]))
            # its covariance, rows and columns in cate_coef's order (pointwise CATE CIs)
            row["cate_cov"] = [[float(v) for v in r] for r in est.cate_cov()]
            row["cate_shrinkage"] = est.cate_shrinkage()
        result.items[it] = row
        result.estimators[it] = est
    return result


# --------------------------------------------------------------------------- Flower transport
def query_study(grid: Grid, nodes: list[int], cfg: CausalConfig, *, timeout: float = 300.0) -> StudyInfo:
    """Ask every institution for its public study declaration; they must agree. Unknown
    covariates or items raise :class:`FedrecInputError` before any budget is spent."""
    content = RecordDict({"config": ConfigRecord({"covariates": json.dumps(
        None if cfg.covariates is None else list(cfg.covariates)),
        **({"causal.expert.refute-kind": cfg.refute_kind, "causal.expert.refute-seed": int(cfg.refute_seed)}
           if cfg.refute_kind else {})})})  # a refutation run: the clients declare its transformed design
    msgs = [Message(content, dst_node_id=n, message_type=MESSAGE_TYPES["study"]) for n in nodes]
    ok, refusals, failed = split_replies(send_and_receive(grid, msgs, timeout=timeout))
    if refusals:
        codes = sorted(set(refusals.values()))
        if set(codes) <= {"budget", "policy"}:  # client/causal_app.causal_study: the run's whole plan
            raise RoundFailed(f"{len(refusals)} of {len(nodes)} institution(s) refused the causal run's privacy plan "
                              f"before any charge (code {', '.join(codes)}): its steps at causal.epsilon = "
                              f"{cfg.epsilon:g}" + (f", {1 + len(cfg.refute)} causal runs with the refutations"
                                                     if cfg.refute else "")
                              + " do not fit their remaining budget or max-run-epsilon (or their policy); "
                              "fix: lower causal.epsilon" + (" or drop refutations" if cfg.refute else "")
                              + " or have the institutions raise epsilon-cap / "
                              "max-run-epsilon (nothing was spent; the detail is in each institution's log)")
        node, code = next(iter(refusals.items()))
        raise RoundFailed(f"{len(refusals)} institution(s) refused the study query (node {node}: {code}); "
                          "the reason is in that institution's log (e.g. run `fedrec-client check-data` there)")
    if failed or len(ok) < len(nodes):
        raise RoundFailed(f"study query failed at nodes {sorted(set(nodes) - set(ok))}")
    seen = {str(m.content["study"]["declaration"]) for m in ok.values()}
    if len(seen) != 1:
        raise FedrecInputError("institutions declare different studies; fix: every institution of a "
                               "federation declares the same study.toml")
    d = json.loads(seen.pop())
    info = StudyInfo(columns=[tuple(c) for c in d["columns"]], outcome_bounds=tuple(d["outcome_bounds"]),
                     better=d["better"], items=list(d["items"]))
    unknown = [it for it in cfg.items if it not in info.items]
    if unknown:
        raise FedrecInputError(f"item(s) {unknown} are not in the catalogue ({', '.join(info.items)}); "
                               "fix: give an item_id from items.csv")
    if d.get("graph") is not None:  # declared graph: not identifiable -> refused before any budget is spent
        from fedrec.common.causal.graph import check_study_graph

        check_study_graph(d["graph"], d["declared"], design=[c[0] for c in info.columns])
    return info


def flower_send(grid: Grid, nodes: list[int], protocol: SumProtocol, cfg: CausalConfig, study: StudyInfo,
                *, min_contributors: int, timeout: float = 600.0) -> Send:
    """A :data:`Send` that runs one SumProtocol round per step."""
    items = list(cfg.items) or list(study.items)
    flat = {k: (v if not isinstance(v, float) or math.isfinite(v) else 1e308) for k, v in cfg.to_flat().items()}
    counter = {"round": 0}

    def send(step: str, arrays: dict[str, np.ndarray], config: dict):
        counter["round"] += 1
        kind = step.split(":")[0]
        sigma = float(config["noise-multiplier"])
        p = study.p
        sens = release_sensitivity(step, p, arrays, len(items), items)
        rec = {"server-round": counter["round"], "step": step, "items": json.dumps(items),
               "noise-multiplier": sigma, **{k: v for k, v in flat.items()}}
        rec.update(secagg_sizing(cfg, sens, sigma, len(nodes)))
        content = RecordDict({"config": ConfigRecord(rec)})
        if arrays:
            content["arrays"] = numpy_to_arrays({k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
        res = protocol.run_round(grid, nodes, message_type=MESSAGE_TYPES[kind], content=content,
                                 server_round=counter["round"], min_contributors=min_contributors, timeout=timeout)
        if res.total is None:
            raise RoundFailed(f"causal step {step}: no contribution")
        totals = {k: np.asarray(v, dtype=np.float64) for k, v in res.total.items()}
        return totals, len(res.contributors), res.metrics

    return send


def cfg_max_people(cfg: CausalConfig) -> int:
    """Public bound on people per institution used to size SecAgg+ quantisation."""
    return 1_000_000


#: levels of the exact (ε = ∞) SecAgg+ grid: float64 holds every integer up to 2^53, and a
#: sum of n contributions in [0, 2L] must stay below 2^63 (common/secagg/_quantize.py)
EXACT_LEVELS = 1 << 52


def secagg_sizing(cfg: CausalConfig, sens: float, sigma: float, n_clients: int) -> dict[str, float]:
    """The SecAgg+ quantisation request of one causal release (``secagg.*`` config keys).

    The clip range is the bound on a coordinate of one institution's noiseless sum:
    (people, at most :func:`cfg_max_people`) x the release's per-person bound ``sens``.

    With DP the quantiser's step is 2% of the per-client noise std (what the client adds).
    Without DP (ε = ∞) there is no noise to hide the rounding in, and the quantiser's own no-noise
    grid (32-bit, ~2^28 levels over a million people's range) rounded the sums by up to 0.7% of an
    ATE and 30% of its SE. We ask for the finest grid a 64-bit sum holds instead: the quantiser
    sizes its step as 2% of ``secagg.noise-std``, so a *resolution* std ``s = 50 c / (L - 1000)``
    gives ``L`` ~ min(2^52, 2^61 / n) levels, a step of ``c / L`` (2e-10 of a person's bound at a
    million people) and the 64-bit modulus. Nothing is noised by it: clients take their noise from
    the charged event, never from this key (client/statistics.py). The quantiser deserves an
    explicit ``exact`` option for this (docs/causal.md, "Guarantees you can act on").
    """
    clip = float(cfg_max_people(cfg) * sens)
    if sigma > 0:
        std = float(noise_std(sensitivity=sens, noise_multiplier=sigma, noise_mode=cfg.noise_mode,
                              n_min=max(cfg.n_min, 1)))
        return {"secagg.clip-range": clip, "secagg.noise-std": std}
    levels = min(EXACT_LEVELS, (1 << 61) // max(int(n_clients), 1))
    return {"secagg.clip-range": clip, "secagg.noise-std": 50.0 * clip / (levels - 1000)}


def estimate(grid: Grid, nodes: list[int], protocol: SumProtocol, causal_cfg: CausalConfig, *,
             min_contributors: int | None = None) -> CausalResult:
    """Run the whole protocol inside a ServerApp main: study check (free, public), then the
    DP steps through ``protocol``. Returns the :class:`CausalResult`."""
    study = query_study(grid, nodes, causal_cfg)
    need = len(nodes) if min_contributors is None else min_contributors
    if causal_cfg.noise_mode == "distributed":
        need = max(need, causal_cfg.n_min)
    send = flower_send(grid, nodes, protocol, causal_cfg, study, min_contributors=need)
    plan = None
    if causal_cfg.refute_kind:  # a refutation's per-person bound is f x the run's: σ planned f x (refute.py)
        from fedrec.common.causal.refute import refutation_plan

        plan = refutation_plan(plan_budget(causal_cfg), causal_cfg.refute_kind)
    result = run_protocol(send, study, causal_cfg, plan=plan)
    result.config["study"] = {"columns": [c[0] for c in study.columns], "outcome_bounds": list(study.outcome_bounds),
                              "better": study.better, "items": study.items}
    return result


# --------------------------------------------------------------------------- ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Causal run: reads ``causal.*`` knobs and the usual run config; writes causal.json to
    ``results-dir`` (the CLI adds recommendations and the pooled comparison)."""
    from pathlib import Path

    from fedrec.common.config import RunConfig
    from fedrec.server.app import make_sum_protocol, reported_failure, wait_for_nodes

    flat = dict(context.run_config)
    ccfg = CausalConfig.from_flat(flat)
    cfg = RunConfig.from_flat({k: v for k, v in flat.items() if not k.startswith("causal.")})
    with reported_failure(cfg.data.results_dir):
        nodes = wait_for_nodes(grid, cfg.data.institutions)
        ccfg = ccfg.resolved(cfg.n_min)  # the same automatic n_min every client resolves
        protocol = make_sum_protocol(cfg, clip_range=1.0)
        result = estimate(grid, nodes, protocol, ccfg)
        report = result.to_json()
        if ccfg.refute:
            report["refutations"] = refute(grid, nodes, protocol, ccfg, result, seed=cfg.data.seed)
            report["epsilon_per_institution"] = {k: _num(v) for k, v in result.epsilon.items()}
        if cfg.data.results_dir:
            out = Path(cfg.data.results_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "causal_raw.json").write_text(json.dumps(report, indent=2, default=float))


def refute(grid: Grid, nodes: list[int], protocol: SumProtocol, ccfg: CausalConfig, result: CausalResult, *,
           seed: int) -> dict:
    """The refutations ``ccfg.refute`` (``causal.refute``) of a finished causal run ``result``:
    one more causal run each, on the same Flower run and protocol (SecAgg+), whose step messages
    carry ``causal.expert.refute-kind`` / ``refute-seed`` (``seed``: the run config's public
    seed), so each institution transforms its own data (common/causal/refute.refute_data; the
    propensity refit) and charges each release to its ledger (task
    ``causal-refute-<kind>-<step>``). The verdict is :func:`~fedrec.common.causal.refute.verdict`,
    as ``fedrec-sim causal --refute`` computes it. ``result.epsilon`` is updated to the
    ledgers' totals after the refutations.

    Privacy: each refutation costs the causal run's ε again at every institution (the clients
    check the run's whole plan, refutations included, before its first charge:
    client/causal_app.causal_plan_events). Only noised sums leave; the verdict is
    post-processing."""
    from dataclasses import replace

    from fedrec.common.causal.refute import SENSITIVITY_FACTOR, refutation_design, verdict

    out: dict = {}
    for kind in ccfg.refute:
        rcfg = refutation_design(replace(ccfg, refute=(), refute_kind=kind, refute_seed=int(seed)), kind)
        res = estimate(grid, nodes, protocol, rcfg)
        out[kind] = {**verdict(kind, result.items, res.items, alpha=ccfg.alpha), "seed": int(seed),
                     "sensitivity_factor": SENSITIVITY_FACTOR[kind], "budget": res.to_json()["budget"]}
        result.epsilon.update(res.epsilon)
    return out
