"""Strategy evaluation end to end: the ClientApp handler (policy, charge, noise of the charged
event) and the in-process pipeline (causal run -> strategy release -> values) on a simulator
with ground truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.client.cli import app as client_cli
from fedrec.common.causal.config import CausalConfig
from fedrec.common.causal.ope import DEFAULT_ESTIMATORS, ESTIMATORS, Layout, OPEConfig, release_bound
from fedrec.common.config import RunConfig
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import load_policy
from fedrec.server.aggregation import numpy_to_arrays

INF = math.inf


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from fedrec.common.datasets import write_institution
    from fedrec.simulations.domains import domain_federation

    root = tmp_path_factory.mktemp("edu")
    insts, _ = domain_federation("education", institutions=1, people=300, seed=2, skew=0.0)
    f = write_institution(root / insts[0].name, insts[0])
    res = CliRunner().invoke(client_cli, ["init", str(f), "--epsilon-cap", "4", "--max-run-epsilon", "2"])
    assert res.exit_code == 0, res.output
    return f


def _design(folder: Path):
    from fedrec.client.statistics import design_columns
    from fedrec.common.datasets import load_institution

    d = load_institution(folder)
    return d, [c[0] for c in design_columns(d)], sorted(d.items["item_id"].astype(str))


def _msg(folder: Path, *, sigma: float, specs=None, k: float = 0.5, epsilon: float = 1.0) -> Message:
    d, cols, items = _design(folder)
    p = len(cols) + 1
    arrays = {f"{kind}/{it}": np.zeros(p) for it in items for kind in ("beta", "mu1", "mu0")}
    specs = specs if specs is not None else [{"name": "random", "kind": "random"}, {"name": "logging", "kind": "logging"}]
    conf = ConfigRecord({"server-round": 1, "noise-multiplier": sigma, "strategies": json.dumps(specs),
                         "items": json.dumps(items), "columns": json.dumps(cols), "clip": 8.0, "switch-tau": 5.0,
                         "square-clip": 3.0, "second-moment-weight": k, "trim": json.dumps([0.05, 0.95]),
                         "covariates": json.dumps(None), "derived": json.dumps([]),
                         "strategies.epsilon": epsilon, "strategies.delta": 1e-5,
                         "strategies.noise-mode": "local", "strategies.n-min": 0})
    return Message(RecordDict({"config": conf, "arrays": numpy_to_arrays(arrays)}), dst_node_id=7,
                   message_type="query.strategy_values")


def _ctx(folder: Path) -> Context:
    flat = RunConfig().to_flat()
    return Context(run_id=31, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(), run_config=flat)


def _rows(folder: Path):
    return list(PrivacyLedger(load_policy(folder / "privacy.toml").ledger).rows(run_id="31"))


def _refusal(reply: Message) -> str | None:
    rec = reply.content.config_records.get("refusal")
    return None if rec is None else str(rec["code"])


def test_the_handler_charges_the_public_bound_and_adds_the_charged_noise(folder):
    from fedrec.client import strategy_app

    draws = []
    for _ in range(6):
        reply = strategy_app.strategy_values(_msg(folder, sigma=20.0), _ctx(folder))
        assert _refusal(reply) is None
        draws.append(reply.content.array_records["arrays"]["strategies"].numpy())
    rows = _rows(folder)
    # the request names no estimators: the default release (DR only) and its bound
    bound = release_bound(2, 0.5, Layout(DEFAULT_ESTIMATORS))
    assert DEFAULT_ESTIMATORS == ("dr",) and bound < release_bound(2, 0.5, Layout(ESTIMATORS))
    assert len(rows) == 6 and all(r.event.sensitivity == pytest.approx(bound) for r in rows)
    assert rows[-1].task == "strategy-values"
    assert draws[0].size == 1 + 2 * 2 + 2 * 1 + 1  # [1, (D, G) x 2 strategies, DR squares x 2, the pair's]
    charged = 20.0 * bound
    spread = np.std(np.asarray(draws), axis=0, ddof=1)
    measured = float(np.sqrt(np.mean(spread**2)))
    dof = 5 * spread.size
    assert measured == pytest.approx(charged, rel=5 / math.sqrt(2 * dof))


@pytest.mark.parametrize(("sigma", "specs", "epsilon"), [
    (0.0, None, 1.0),                                          # no noise while DP
    (20.0, [{"name": "x", "kind": "oracle"}], 1.0),             # a strategy the client cannot evaluate
    (20.0, [{"name": "r", "kind": "rank", "coef": {}}], 1.0),   # no score model
    (20.0, None, 3.0),                                          # above the policy's per-run ε
])
def test_bad_requests_are_refused_before_any_charge(folder, sigma, specs, epsilon):
    from fedrec.client import strategy_app

    before = len(_rows(folder))
    reply = strategy_app.strategy_values(_msg(folder, sigma=sigma, specs=specs, epsilon=epsilon), _ctx(folder))
    assert _refusal(reply) == "policy"
    assert len(_rows(folder)) == before


def _causal_msg(folder: Path, conf: dict) -> Message:
    _, _, items = _design(folder)
    base = {"server-round": 1, "step": "moments", "items": json.dumps(items), "noise-multiplier": 20.0}
    return Message(RecordDict({"config": ConfigRecord({**base, **conf})}), dst_node_id=7,
                   message_type="query.causal_moments")


def test_the_causal_handler_restricts_a_fold_run_to_that_halfs_people_and_charges_it(folder, monkeypatch):
    """``causal.expert.fold`` / ``fold-salt`` in a causal step's message: the handler computes on
    the people whose salted SHA-256 (written out here, independently of person_fold) puts them
    in that half, and charges the release as the fold run's own ledger row
    (``causal-fold<k>-<step>``); an unusable fold is refused before any charge."""
    import hashlib

    from fedrec.client import causal_app
    from fedrec.common.datasets import load_institution

    seen = []
    real = causal_app.step_contributions
    monkeypatch.setattr(causal_app, "step_contributions",
                        lambda kind, data, *a, **kw: seen.append(data) or real(kind, data, *a, **kw))
    ctx = Context(run_id=33, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                  run_config={**RunConfig().to_flat(), **CausalConfig(epsilon=1.0).to_flat()})
    people = load_institution(folder).people["person_id"].astype(str).tolist()
    for fold in (0, 1):
        reply = causal_app.causal_moments(_causal_msg(folder, {"causal.expert.fold": fold,
                                                               "causal.expert.fold-salt": "s-1"}), ctx)
        assert _refusal(reply) is None
        want = {p for p in people
                if int.from_bytes(hashlib.sha256(f"s-1\x1f{p}".encode()).digest()[:8], "big") % 2 == fold}
        got = set(seen[-1].people["person_id"].astype(str))
        assert got == want and 0 < len(want) < len(people)
        assert set(seen[-1].interactions["person_id"].astype(str)) <= want
        assert _rows_of(folder, 33)[-1].task == f"causal-fold{fold}-moments"
    reply = causal_app.causal_moments(_causal_msg(folder, {}), ctx)  # no fold: every person
    assert _refusal(reply) is None and len(seen[-1].people) == len(people)
    assert _rows_of(folder, 33)[-1].task == "causal-moments"
    before = len(_rows_of(folder, 33))
    for bad in ({"causal.expert.fold": 2, "causal.expert.fold-salt": "s"}, {"causal.expert.fold": 0},
                {"causal.expert.fold": -1, "causal.expert.fold-salt": "s"}):
        assert _refusal(causal_app.causal_moments(_causal_msg(folder, bad), ctx)) == "policy", bad
    assert len(_rows_of(folder, 33)) == before


def _rows_of(folder: Path, run_id: int):
    return list(PrivacyLedger(load_policy(folder / "privacy.toml").ledger).rows(run_id=str(run_id)))


@pytest.fixture(scope="module")
def education_run():
    """One in-process federation with several loggers: causal run + strategy release, ε = inf."""
    from fedrec.simulations.strategies import one_run, reference_population

    ref = reference_population("education", people=30_000)
    return one_run("education", seed=11, epsilon=INF, noise_mode="local", institutions=4, people=8000,
                   reference=ref, ope=OPEConfig(clip=20.0, estimators=ESTIMATORS))  # every estimator: opt-in


def test_non_private_dr_recovers_each_strategy_and_the_benefit_engagement_gap(education_run):
    rows = {(r["strategy"], r["estimator"]): r for r in education_run["rows"]}
    for strat in ("benefit-cf", "engagement", "random", "logging"):
        r = rows[(strat, "dr")]
        assert not r["in_sample"]
        assert r["ci_low"] - 0.5 * r["se"] <= r["truth"] <= r["ci_high"] + 0.5 * r["se"], (strat, r)
    # in-sample benefit ranking (its models fitted on these people): a value, no CI, nor for its difference
    for key in ("benefit", "benefit-engagement"):
        r = rows[(key, "dr")]
        assert r["in_sample"] and math.isnan(r["ci_low"]) and math.isnan(r["ci_high"]), r
        assert r["naive_ci_low"] < r["value"] < r["naive_ci_high"]
    assert abs(rows[("benefit", "dr")]["value"] - rows[("benefit", "dr")]["truth"]) < 4 * rows[("benefit", "dr")]["se"]
    gap = rows[("benefit-cf-engagement", "dr")]
    assert gap["truth"] > 0 and gap["ci_low"] > 0  # benefit ranking beats engagement ranking, with its CI
    # IPS agrees with DR within their CIs; the DM is the outcome model's value (no weights)
    assert abs(rows[("random", "ips")]["value"] - rows[("random", "dr")]["value"]) < 2 * rows[("random", "ips")]["se"]


def test_the_yardstick_summary_has_the_benchmark_fields(education_run):
    from fedrec.simulations.strategies import summarize

    out = summarize([education_run])
    row = next(r for r in out if r["strategy"] == "benefit-cf" and r["estimator"] == "dr")
    for key in ("kind", "domain", "strategy", "estimator", "epsilon", "noise_mode", "bias", "coverage",
                "naive_coverage", "ci_width_ratio"):
        assert key in row
    assert row["kind"] == "policy_value" and row["ci_width_ratio"] == pytest.approx(1.0)
    assert not row["in_sample"] and row["coverage"] == row["naive_coverage"]
    own = next(r for r in out if r["strategy"] == "benefit" and r["estimator"] == "dr")
    assert own["in_sample"] and math.isnan(own["coverage"]) and math.isnan(own["ci_width"])
    assert own["naive_coverage"] in (0.0, 1.0)


def test_mediation_on_a_simulator_direct_plus_indirect_is_total_and_matches_statsmodels():
    """ε = inf: one Gram per institution, summed: direct + indirect = total to numerical
    precision; the total is statsmodels' OLS coefficient of exposure on the pooled rows; the
    simulators' outcome does not depend on engagement given exposure, so the indirect effect's
    CI covers 0. A graph with an open back-door path is refused before anything is released."""
    import statsmodels.api as sm

    from fedrec.client.ope_statistics import mediation_rows
    from fedrec.common.causal.scaling import half_range
    from fedrec.common.causal.graph import parse_graph
    from fedrec.common.errors import FedrecInputError
    from fedrec.simulations.domains import domain_federation
    from fedrec.simulations.strategies import mediation_inprocess

    insts, truth = domain_federation("health", institutions=2, people=3000, seed=5, skew=0.3)
    item = truth.item_ids[0]
    r = mediation_inprocess(insts, item, epsilon=INF)
    assert r["direct"]["estimate"] + r["indirect"]["estimate"] == pytest.approx(r["total"]["estimate"], abs=1e-9)
    v = np.vstack([mediation_rows(d, item)[0] for d in insts])
    ols = sm.OLS(v[:, -1], np.column_stack([v[:, :-3], v[:, -3]])).fit()
    scale = half_range(insts[0].study.outcome_bounds)
    assert r["total"]["estimate"] == pytest.approx(scale * ols.params[-1], rel=1e-8)
    assert r["total"]["se"] == pytest.approx(scale * ols.bse[-1], rel=1e-8)
    assert abs(r["indirect"]["estimate"]) < 2.5 * r["indirect"]["se"]
    bad = parse_graph({"edges": ["age -> exposed", "age -> outcome", "u -> exposed", "u -> outcome",
                                 "exposed -> outcome"], "latent": ["u"]})
    with pytest.raises(FedrecInputError, match="exposed <- u -> outcome"):
        mediation_inprocess(insts, item, epsilon=1.0, graph=bad)
    good = parse_graph({"edges": ["age -> exposed", "age -> outcome", "exposed -> engagement",
                                  "engagement -> outcome", "exposed -> outcome"], "mediators": ["engagement"]})
    assert mediation_inprocess(insts, item, epsilon=INF, graph=good)["adjust"] == ["age"]


@pytest.mark.slow
def test_the_flower_path_gives_the_in_process_values(tmp_path):
    """fedrec.server.strategies:app on Flower's simulation engine behind SecAgg+: the causal
    run, the two fold runs of ``benefit-cf`` (the clients filter their people by
    ``causal.expert.fold``) and the strategy release with a non-default estimator list
    (``dr,ips``). At ε = inf every value, SE and difference equals the in-process path's
    (simulations/strategies.py: ``crossfit_runs`` filters the same people in numpy) to 1e-6, and
    every institution's ledger has each fold run's releases as its own rows, as many as the
    whole-study run's, and the strategy release."""
    from fedrec.common.causal.ope import StrategyRun
    from fedrec.common.datasets import write_institution
    from fedrec.server.strategies import (benefit_strategy, crossfit_benefit_strategy, logging_strategy,
                                          random_strategy)
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config
    from fedrec.simulations.domains import domain_federation
    from fedrec.simulations.provision import provision_institutions
    from fedrec.simulations.run import launch_flower
    from fedrec.simulations.strategies import crossfit_runs, evaluate_inprocess

    insts, _ = domain_federation("health", institutions=3, people=600, seed=9, skew=0.3)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)
    ccfg, _ = resolve_config(insts, epsilon=INF)
    out = tmp_path / "out"
    policy_dir = provision_institutions([d.name for d in insts], out, epsilon=ccfg.epsilon, delta=ccfg.delta,
                                        allow_non_private=True)
    cfg = RunConfig().override(**{"institutions": 3, "seed": 0, "data-dir": str(data.resolve()),
                                  "results-dir": str(out.resolve()), "sim.policy-dir": str(policy_dir),
                                  "privacy.delta": ccfg.delta, "secagg.enabled": True})
    run = StrategyRun.from_flat({"strategies.names": "benefit,benefit-cf,random,logging",
                                 "strategies.estimators": "dr,ips", "strategies.crossfit-salt": "cf-9"})
    flat = {**ccfg.to_flat(), **run.to_flat()}
    launch_flower({**cfg.to_flat(), **flat}, tmp_path / "work", num_supernodes=3,
                  server_app="fedrec.server.strategies:app", client_app="fedrec.client.strategy_app:app",
                  extra_config=flat, quiet=True)
    assert not (out / "failure.json").exists(), (out / "failure.json").read_text()
    report = json.loads((out / "strategies.json").read_text())
    better = insts[0].study.outcome_better
    causal = estimate_inprocess(insts, ccfg)
    specs = [benefit_strategy(causal.items, better), crossfit_benefit_strategy(crossfit_runs(insts, ccfg, salt="cf-9"),
                                                                               better, "cf-9"),
             random_strategy(), logging_strategy()]
    res, _ = evaluate_inprocess(insts, causal, specs, OPEConfig(epsilon=INF, estimators=("dr", "ips")),
                                covariates=ccfg.covariates, derived=ccfg.derived)
    assert report["strategies"] == ["benefit", "benefit-cf", "random", "logging"] and report["causal_runs"] == 3
    assert all(set(v) == {"dr", "ips"} for v in report["values"].values())  # the asked estimators, no more
    for s in report["strategies"]:
        for est in ("dr", "ips"):
            want, got = res.estimate(s, est), report["values"][s][est]
            assert got["value"] == pytest.approx(want.value, rel=1e-6, abs=1e-9), (s, est)
            assert got["se"] == pytest.approx(want.se, rel=1e-6), (s, est)
    want = res.difference("benefit", "benefit-cf", "dr")
    assert report["differences"]["benefit-benefit-cf"]["value"] == pytest.approx(want.value, rel=1e-6, abs=1e-9)
    # the in-sample benefit ranking has no CI on the Flower path either (its value and SE it has)
    assert report["values"]["benefit"]["dr"]["ci_low"] is None and report["values"]["benefit"]["dr"]["in_sample"]
    assert report["differences"]["benefit-benefit-cf"]["ci_low"] is None
    assert report["values"]["benefit-cf"]["dr"]["ci_low"] is not None
    # cross-fitting changed the ranking (a different strategy), so the check above is not vacuous
    assert abs(want.value) > 1e-6
    for d in insts:
        tasks = [r.task for r in PrivacyLedger(out / "ledgers" / f"{d.name}.db").rows()]
        whole = [t for t in tasks if t.startswith("causal-") and not t.startswith("causal-fold")]
        for k in (0, 1):
            assert sorted(t.replace(f"causal-fold{k}-", "causal-") for t in tasks
                          if t.startswith(f"causal-fold{k}-")) == sorted(whole), (d.name, k)
        assert tasks.count("strategy-values") == 1


def test_a_bad_strategy_run_config_is_one_line_before_anything_is_sent(tmp_path):
    """An unknown strategy, estimator or ``strategies.*`` key is one line naming the key and the
    fix at the ServerApp (before it touches the grid: none is given here) and at every client
    (split_config), and no results folder or ledger is created."""
    from fedrec.client.causal_app import split_config
    from fedrec.common.config import ConfigError
    from fedrec.server import strategies

    base = {**RunConfig().override(**{"results-dir": str(tmp_path / "out")}).to_flat(),
            **CausalConfig(epsilon=INF).to_flat()}
    for bad, msg in ((("strategies.names", "benefit,oracle"), r"^strategies.names 'benefit,oracle': unknown "
                                                                r"strategy 'oracle'; fix: a comma list of benefit"),
                     (("strategies.estimators", "dr,ipz"), r"^strategies.estimators 'dr,ipz': unknown estimator"),
                     (("strategies.estimator", "dr"), r"^strategies.estimator: unknown strategy key; fix:"),
                     (("causal.expert.fold", 0), r"^causal.expert.fold 0: the strategy app runs"),
                     (("strategies.crossfit-salt", "s"), r"^strategies.crossfit-salt 's': set without benefit-cf")):
        flat = {**base, bad[0]: bad[1]}
        if bad[0] == "causal.expert.fold":
            flat["causal.expert.fold-salt"] = "s"
        ctx = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=flat)
        with pytest.raises(ConfigError, match=msg) as err:
            strategies._main(None, ctx)
        assert "\n" not in str(err.value)
        if bad[0].startswith("strategies."):
            with pytest.raises(ConfigError, match=msg):
                split_config(flat)
    assert not (tmp_path / "out").exists()
    # the defaults parse, and a good list round-trips
    from fedrec.common.causal.ope import StrategyRun

    assert StrategyRun.from_flat(base) == StrategyRun()
    good = StrategyRun(names=("benefit-cf", "random"), estimators=("ips", "dr"), crossfit_salt="x")
    assert StrategyRun.from_flat(good.to_flat()) == good


@pytest.mark.parametrize(("flag", "want"), [([], ("dr",)), (["--estimators", "all"], None),
                                            (["--estimators", "dr,ips"], ("dr", "ips"))])
def test_evaluate_strategies_releases_dr_alone_unless_the_comparison_is_asked_for(monkeypatch, flag, want):
    """The command's wiring (the runs themselves are measured by benchmarks/strategy_values.py):
    without --estimators the release carries DR alone; the comparison estimators are an opt-in."""
    from fedrec.simulations import strategies
    from fedrec.simulations.cli import app as sim_cli

    seen = {}

    def fake(domains, *, ope, **kw):
        seen["ope"] = ope
        return {"rows": []}

    monkeypatch.setattr(strategies, "evaluate_strategies", fake)
    res = CliRunner().invoke(sim_cli, ["evaluate-strategies", "--domains", "health", "--seeds", "1", *flag])
    assert res.exit_code == 0, res.output
    assert seen["ope"].estimators == (want or ESTIMATORS)
    assert OPEConfig().estimators == ("dr",)
