"""Strategy evaluation from logged data (server side): one DP release, then post-processing.

After a causal run (server/causal.py) the server holds public nuisances — the whitening, each
item's propensity and per-arm outcome models — and each item's CATE model. One more release
evaluates K recommendation strategies at once: the server sends the nuisances and the strategy
specs (client/ope_statistics.py), each institution releases the clipped, noised per-person
sums (``query.strategy_values``, client/strategy_app.py), and the server turns the secure sum
into every strategy's value by doubly robust estimation (the default release carries DR
alone; IPS, SNIPS, DM and switch-DR are an opt-in for comparison, ``OPEConfig.estimators``, that
costs noise on DR at the same ε), differences between strategies, all with CIs that carry the
DP noise (common/causal/ope.py). Post-processing of
the sum costs no budget; the release itself is charged at every institution like any other.

Several loggers: the propensity is the causal run's pooled model, i.e. the federation's
mixture of the institutions' logging policies given x — the "balanced" weighting of Agarwal et
al. (2017) for several loggers, which needs no institution-specific weights. DR stays
consistent when that pooled propensity is off but the outcome models are right.

:func:`run_strategies` is transport-free like :func:`fedrec.server.causal.run_protocol`: the
simulations add the releases in numpy (simulations/strategies.py), a Flower run sends one
SecAgg+ round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedrec.common.causal.ope import (PAIR_TERMS, Layout, OPEConfig, OPEResult, crossfit_partitions, evaluate_sums,
                                     in_sample_strategies, release_bound, release_noise_multiplier, strategy_bounds)
from fedrec.common.privacy.gaussian import summed_noise_var

__all__ = ["STEP", "MESSAGE_TYPE", "nuisance_arrays", "rank_strategy", "benefit_strategy", "crossfit_benefit_strategy",
           "random_strategy",
           "logging_strategy", "scorer_strategy", "noise_multiplier", "effective_clip", "run_strategies",
           "flower_specs", "read_run_config", "check_plan_at_nodes", "PLAN_MESSAGE_TYPE"]

STEP = "strategies"
MESSAGE_TYPE = "query.strategy_values"
#: the run's first message: every institution checks the run's whole plan before any charge
PLAN_MESSAGE_TYPE = "query.strategy_plan"

Send = Callable[[str, dict[str, np.ndarray], dict], tuple[dict[str, np.ndarray], int, dict]]


def nuisance_arrays(result) -> dict[str, np.ndarray]:
    """The public nuisances of a :class:`~fedrec.server.causal.CausalResult` as the arrays the
    clients read (the causal ``influence`` step's layout): whitening, ``beta/<item>``,
    ``mu1/<item>``, ``mu0/<item>``. Items without outcome models (ipw runs) are left out."""
    out: dict[str, np.ndarray] = {}
    for it, est in result.estimators.items():
        if est.arm1 is None or est.arm0 is None or est.prop_coef is None:
            continue
        wh = est.whitening
        if wh is not None and "whiten/a" not in out:
            out["whiten/a"] = np.asarray(wh.a)
            out["whiten/b"] = np.asarray(wh.b)
            out["whiten/radius"] = np.array([wh.radius if math.isfinite(wh.radius) else -1.0])
            out["whiten/weighted"] = np.array([1.0 if wh.weighted else 0.0])
        out[f"beta/{it}"] = np.asarray(est.prop_coef, dtype=np.float64)
        out[f"mu1/{it}"] = np.asarray(est.arm1.coef, dtype=np.float64)
        out[f"mu0/{it}"] = np.asarray(est.arm0.coef, dtype=np.float64)
    return out


def rank_strategy(name: str, coef: Mapping[str, Mapping[str, float]], better: str = "higher") -> dict:
    """Top-1 of the considered items by a public linear score on the bound-scaled design."""
    return {"name": name, "kind": "rank", "better": better,
            "coef": {it: {k: float(v) for k, v in c.items()} for it, c in coef.items()}}


def benefit_strategy(item_results: Mapping[str, dict], better: str, name: str = "benefit") -> dict:
    """Benefit ranking: each item's released CATE model (causal.json ``items.<item>.cate_coef``),
    oriented by the study's better direction. Marked ``in_sample``: the models were fitted on the
    people the release evaluates it on, so its value is reported without a CI
    (:data:`~fedrec.common.causal.ope.IN_SAMPLE_NOTE`; ``benefit-cf`` is the cross-fitted one)."""
    return {**rank_strategy(name, {it: r["cate_coef"] for it, r in item_results.items()}, better), "in_sample": True}


def crossfit_benefit_strategy(fold_items: Sequence[Mapping[str, dict]], better: str, salt: str,
                              name: str = "benefit-cf") -> dict:
    """Cross-fitted benefit ranking: ``fold_items[k]`` are the CATE models (causal.json ``items``)
    of a causal run on fold k's people only (:func:`~fedrec.common.causal.ope.person_fold` with
    ``salt``); a person of fold k is ranked by a model fitted on the **other** folds (with two
    folds: the other one), so the strategy's value is estimated on people its model never saw.
    More than two folds: the model of fold k+1 (mod K) — still fitted without fold k."""
    k = len(fold_items)
    if k < 2:
        raise ValueError("cross-fitting needs at least two folds")
    models = []
    for f in range(k):
        other = fold_items[(f + 1) % k]
        missing = [it for it, r in other.items() if "cate_coef" not in r]
        if missing:
            raise ValueError(f"fold {(f + 1) % k}'s causal run has no CATE model for {missing}")
        models.append({it: {c: float(v) for c, v in r["cate_coef"].items()} for it, r in other.items()})
    return {"name": name, "kind": "crossfit", "better": better, "salt": str(salt), "coef": models}


def random_strategy(name: str = "random") -> dict:
    return {"name": name, "kind": "random"}


def logging_strategy(name: str = "logging") -> dict:
    return {"name": name, "kind": "logging"}


def scorer_strategy(name: str, scorer: str) -> dict:
    """A strategy ranked by a scorer registered at each institution (MF, adapter, hybrid hooks)."""
    return {"name": name, "kind": "scorer", "scorer": scorer}


def noise_multiplier(cfg: OPEConfig) -> float:
    """σ of the one Gaussian release at the configured (ε, δ); 0 when ε = inf
    (:func:`~fedrec.common.causal.ope.release_noise_multiplier`, the institutions' rule too)."""
    return release_noise_multiplier(float(cfg.epsilon), float(cfg.delta), cfg.accountant) if cfg.dp else 0.0


def effective_clip(cfg: OPEConfig) -> float:
    """The weight clip the release uses: ``cfg.clip`` under DP (it sets the noise scale); without
    DP no noise depends on it, so at least ``1 / trim[0]``, which no top-1 or random strategy's
    weight exceeds (measured: education, ε = inf, λ = 8 biased benefit ranking's DR by +0.6 SE and
    IPS by +1.9 SE; λ = 30 by none)."""
    return cfg.clip if cfg.dp else max(cfg.clip, 1.0 / cfg.trim[0])


def run_strategies(send: Send, *, items: Sequence[str], columns: Sequence[str], specs: Sequence[Mapping],
                   nuisances: Mapping[str, np.ndarray], cfg: OPEConfig, scale: float,
                   covariates: Sequence[str] | None = None, derived: Sequence[str] = ()) -> tuple[OPEResult, dict]:
    """One strategy-evaluation release and its post-processing.

    Returns the :class:`OPEResult` (every strategy x estimator, differences on demand) and the
    release's public facts (σ, sensitivity, noise variance, contributors)."""
    sigma = noise_multiplier(cfg)
    clip = effective_clip(cfg)
    sens = release_bound(len(specs), cfg.second_moment_weight, cfg.layout)
    config = {"noise-multiplier": sigma, "strategies": json.dumps(list(specs), sort_keys=True),
              "items": json.dumps(list(items)), "columns": json.dumps(list(columns)), "clip": clip,
              "switch-tau": cfg.switch_tau, "square-clip": cfg.square_clip, "second-moment-weight": cfg.second_moment_weight,
              "trim": json.dumps(list(cfg.trim)),
              "covariates": json.dumps(None if covariates is None else list(covariates)),
              "derived": json.dumps(list(derived)), "estimators": json.dumps(list(cfg.estimators)),
              # the release's request (the institution's policy bounds it, like a run config's)
              "strategies.epsilon": cfg.epsilon if cfg.dp else -1.0, "strategies.delta": cfg.delta,
              "strategies.noise-mode": cfg.noise_mode, "strategies.n-min": cfg.n_min}
    totals, n_contrib, _ = send(STEP, dict(nuisances), config)
    nv = summed_noise_var(sensitivity=sens, noise_multiplier=sigma, noise_mode=cfg.noise_mode, n_min=cfg.n_min,
                          contributors=n_contrib)
    bounds = [strategy_bounds(s, clip, len(items)) for s in specs]  # the client's rule (common/causal/ope.py)
    res = evaluate_sums(np.asarray(totals[STEP], dtype=np.float64), [s["name"] for s in specs], bounds,
                        noise_var=nv, scale=scale, square_clip=cfg.square_clip, second_moment_weight=cfg.second_moment_weight,
                        alpha=cfg.alpha, layout=cfg.layout, crossfit=crossfit_partitions(specs),
                        in_sample=in_sample_strategies(specs))
    facts = {"noise_multiplier": sigma, "sensitivity": sens, "noise_var": nv, "contributors": n_contrib,
             "epsilon": cfg.epsilon if cfg.dp else "inf", "delta": cfg.delta, "noise_mode": cfg.noise_mode,
             "clip": clip, "switch_tau": cfg.switch_tau}
    return res, facts


# --------------------------------------------------------------------------- Flower transport
def flower_send(grid, nodes: list[int], protocol, cfg: OPEConfig, *, min_contributors: int, first_round: int = 1000,
                timeout: float = 600.0) -> Send:
    """A :data:`Send` running one :class:`~fedrec.server.aggregation.SumProtocol` round (SecAgg+
    by default) of ``query.strategy_values``; the SecAgg+ quantiser is sized from the release's
    public sensitivity and noise like the causal steps'."""
    from flwr.app import ConfigRecord, RecordDict

    from fedrec.common.privacy.gaussian import noise_std
    from fedrec.server.aggregation import RoundFailed, numpy_to_arrays
    from fedrec.server.causal import EXACT_LEVELS, cfg_max_people

    counter = {"round": first_round}

    def send(step: str, arrays: dict[str, np.ndarray], config: dict):
        counter["round"] += 1
        specs = json.loads(config["strategies"])
        sens = release_bound(len(specs), float(config["second-moment-weight"]), Layout(tuple(json.loads(config["estimators"]))))
        sigma = float(config["noise-multiplier"])
        clip = float(cfg_max_people(None) * sens)
        if sigma > 0:
            std = float(noise_std(sensitivity=sens, noise_multiplier=sigma, noise_mode=cfg.noise_mode,
                                  n_min=max(cfg.n_min, 1)))
        else:  # ε = inf: the finest grid a 64-bit sum holds (server/causal.secagg_sizing)
            std = 50.0 * clip / (min(EXACT_LEVELS, (1 << 61) // max(len(nodes), 1)) - 1000)
        rec = {"server-round": counter["round"], **config, "secagg.clip-range": clip, "secagg.noise-std": std}
        content = RecordDict({"config": ConfigRecord(rec),
                              "arrays": numpy_to_arrays({k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})})
        res = protocol.run_round(grid, nodes, message_type=MESSAGE_TYPE, content=content, server_round=counter["round"],
                                 min_contributors=min_contributors, timeout=timeout)
        if res.total is None:
            raise RoundFailed("strategy release: no contribution")
        return {k: np.asarray(v, dtype=np.float64) for k, v in res.total.items()}, len(res.contributors), res.metrics

    return send


def flower_specs(run, result, fold_results: Sequence, salt: str) -> list[dict]:
    """The strategy specs of a Flower strategy run, in ``run.names`` order
    (:class:`~fedrec.common.causal.ope.StrategyRun`): ``benefit`` from the causal run's CATE
    models, ``benefit-cf`` from the two fold runs' (``fold_results[k]``: the run on fold k's
    people, ``causal.expert.fold = k`` with ``salt``), ``random``, ``logging``."""
    better = result.config["study"]["better"]
    out = []
    for name in run.names:
        if name == "benefit":
            out.append(benefit_strategy(result.items, better))
        elif name == "benefit-cf":
            if len(fold_results) != 2:
                raise ValueError("benefit-cf needs the two fold runs' results")
            out.append(crossfit_benefit_strategy([r.items for r in fold_results], better, salt))
        elif name == "random":
            out.append(random_strategy())
        elif name == "logging":
            out.append(logging_strategy())
        else:  # StrategyRun.from_flat admits FLOWER_STRATEGIES only
            raise ValueError(f"strategy {name!r} is not available on Flower")
    return out


def check_plan_at_nodes(grid, nodes: list[int], run, ccfg, *, timeout: float = 300.0) -> None:
    """The run's first message (``query.strategy_plan``, client/strategy_app.py): each
    institution computes the run's whole plan — the causal run, the two fold runs of
    ``benefit-cf``, the strategy release — from the public run config and ``run``'s keys, and
    checks it against its remaining budget and ``max-run-epsilon`` before anything is charged.
    A refusal stops the run here with one line (RoundFailed: failure.json), nothing spent."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedrec.server.aggregation import RoundFailed, split_replies
    from fedrec.server.exchange import send_and_receive

    content = RecordDict({"config": ConfigRecord(dict(run.to_flat()))})
    msgs = [Message(content, dst_node_id=n, message_type=PLAN_MESSAGE_TYPE) for n in nodes]
    ok, refusals, failed = split_replies(send_and_receive(grid, msgs, timeout=timeout))
    if refusals:
        codes = sorted(set(refusals.values()))
        runs = 3 if run.crossfit else 1
        raise RoundFailed(
            f"{len(refusals)} of {len(nodes)} institution(s) refused the strategy run's privacy plan before any "
            f"charge (code {', '.join(codes)}): {runs} causal run(s) and the strategy release at causal.epsilon = "
            f"{ccfg.epsilon:g} do not fit their remaining budget or max-run-epsilon; fix: lower causal.epsilon"
            + (", drop benefit-cf from strategies.names (one causal run instead of three)" if run.crossfit else "")
            + " or have the institutions raise epsilon-cap / max-run-epsilon (nothing was spent)")
    if failed or len(ok) < len(nodes):
        raise RoundFailed(f"strategy plan check failed at nodes {sorted(set(nodes) - set(ok))}")


def read_run_config(flat: Mapping) -> tuple:
    """``(RunConfig, CausalConfig, StrategyRun)`` of a strategy run's run config; ConfigError
    (one line naming the key and the fix) for an unknown or unusable key, an unknown strategy
    or estimator, and a ``causal.expert.fold`` (the app runs its own folds for ``benefit-cf``).
    Called before anything is sent: nothing is released or charged for a bad config."""
    from fedrec.common.causal.config import CausalConfig
    from fedrec.common.causal.ope import StrategyRun
    from fedrec.common.config import ConfigError, RunConfig

    flat = dict(flat)
    run = StrategyRun.from_flat(flat)
    ccfg = CausalConfig.from_flat(flat)
    if ccfg.fold >= 0:
        raise ConfigError(f"causal.expert.fold {ccfg.fold}: the strategy app runs the whole study and, for "
                          "benefit-cf, its own two fold runs; fix: delete causal.expert.fold and fold-salt "
                          "(add benefit-cf to strategies.names for cross-fitting)")
    if ccfg.refute:
        raise ConfigError(f"causal.refute {','.join(ccfg.refute)}: the strategy app runs no refutations; fix: delete "
                          "causal.refute here and run them with `fedrec-server run causal --refute ...`")
    cfg = RunConfig.from_flat({k: v for k, v in flat.items()
                               if not k.startswith("causal.") and not k.startswith("strategies.")})
    return cfg, ccfg, run


def _main(grid, context) -> None:
    """Every institution first checks the run's whole plan (:func:`check_plan_at_nodes`; a
    refusal stops the run before any charge). Causal run (server/causal.py), for ``benefit-cf`` two more on the two halves of the
    people (``causal.expert.fold`` 0 and 1; each charged at every institution like any causal
    run), then one strategy release at the causal run's ε, δ and noise mode (charged again):
    the strategies of ``strategies.names`` by the estimators of ``strategies.estimators``
    (:class:`~fedrec.common.causal.ope.StrategyRun`). The run config is read before anything is
    sent. Writes ``strategies.json`` beside ``causal_raw.json`` (and ``causal_raw_fold<k>.json``)
    in ``results-dir``."""
    from dataclasses import replace
    from pathlib import Path

    from fedrec.common.causal.scaling import half_range
    from fedrec.server.aggregation import PlainSum
    from fedrec.server.app import reported_failure, wait_for_nodes
    from fedrec.server.causal import estimate

    cfg, ccfg, run = read_run_config(context.run_config)
    with reported_failure(cfg.data.results_dir):
        nodes = wait_for_nodes(grid, cfg.data.institutions)
        ccfg = ccfg.resolved(cfg.n_min)
        if cfg.secagg.enabled:
            from fedrec.server.secagg_workflow import SecAggPlusSum

            protocol = SecAggPlusSum.from_config(cfg, clip_range=1.0)
        else:
            protocol = PlainSum()
        check_plan_at_nodes(grid, nodes, run, ccfg)  # the whole run's plan, before its first charge
        result = estimate(grid, nodes, protocol, ccfg)
        salt = run.salt(cfg.data.seed) if run.crossfit else ""
        folds = [estimate(grid, nodes, protocol, replace(ccfg, fold=k, fold_salt=salt)) for k in (0, 1)] \
            if run.crossfit else []
        study = result.config["study"]
        specs = flower_specs(run, result, folds, salt)
        # the strategy release asks for the causal run's ε, δ and noise mode again (its own charge)
        ocfg = OPEConfig(epsilon=ccfg.epsilon, delta=ccfg.delta, noise_mode=ccfg.noise_mode,
                         n_min=ccfg.n_min or len(nodes), estimators=run.estimators, accountant=ccfg.accountant)
        nuis = nuisance_arrays(result)
        items = sorted(k[len("beta/"):] for k in nuis if k.startswith("beta/"))
        need = max(len(nodes) if ocfg.noise_mode == "local" else ocfg.n_min, 1)
        send = flower_send(grid, nodes, protocol, ocfg, min_contributors=need)
        res, facts = run_strategies(send, items=items, columns=study["columns"], specs=specs, nuisances=nuis,
                                    cfg=ocfg, scale=half_range(tuple(study["outcome_bounds"])),
                                    covariates=ccfg.covariates, derived=ccfg.derived)
        names = [s["name"] for s in specs]
        # differences by DR, else the first released estimator with paired squares (none: no differences)
        pair = next((t for t in ("dr", *PAIR_TERMS) if t in run.estimators), None)
        report = {"values": res.to_json(), "release": facts, "strategies": names,
                  "estimators": list(run.estimators), "causal_runs": 1 + len(folds),
                  "crossfit": {"salt": salt, "folds": 2} if folds else None, "difference_estimator": pair,
                  "differences": {f"{a}-{b}": res.difference(a, b, pair).to_json()
                                  for a in names for b in names if a < b} if pair else {}}
        if cfg.data.results_dir:
            out = Path(cfg.data.results_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "causal_raw.json").write_text(json.dumps(result.to_json(), indent=2, default=float))
            for k, r in enumerate(folds):
                (out / f"causal_raw_fold{k}.json").write_text(json.dumps(r.to_json(), indent=2, default=float))
            (out / "strategies.json").write_text(json.dumps(report, indent=2, default=float))


def _server_app():
    from flwr.serverapp import ServerApp

    server_app = ServerApp()
    server_app.main()(_main)
    return server_app


#: ``fedrec.server.strategies:app`` — the causal run followed by the strategy release
app = _server_app()
