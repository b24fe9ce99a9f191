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


@pytest.fixture(scope="module")
def education_run():
    """One in-process federation with several loggers: causal run + strategy release, ε = inf."""
    from fedrec.simulations.strategies import one_run, reference_population

    ref = reference_population("education", people=30_000)
    return one_run("education", seed=11, epsilon=INF, noise_mode="local", institutions=4, people=8000,
                   reference=ref, ope=OPEConfig(clip=20.0, estimators=ESTIMATORS))  # every estimator: opt-in


def test_non_private_dr_recovers_each_strategy_and_the_benefit_engagement_gap(education_run):
    rows = {(r["strategy"], r["estimator"]): r for r in education_run["rows"]}
    for strat in ("benefit", "benefit-cf", "engagement", "random", "logging"):
        r = rows[(strat, "dr")]
        assert r["ci_low"] - 0.5 * r["se"] <= r["truth"] <= r["ci_high"] + 0.5 * r["se"], (strat, r)
    gap = rows[("benefit-engagement", "dr")]
    assert gap["truth"] > 0 and gap["ci_low"] > 0  # benefit ranking beats engagement ranking, with its CI
    # IPS agrees with DR within their CIs; the DM is the outcome model's value (no weights)
    assert abs(rows[("random", "ips")]["value"] - rows[("random", "dr")]["value"]) < 2 * rows[("random", "ips")]["se"]


def test_the_yardstick_summary_has_the_benchmark_fields(education_run):
    from fedrec.simulations.strategies import summarize

    out = summarize([education_run])
    row = next(r for r in out if r["strategy"] == "benefit" and r["estimator"] == "dr")
    for key in ("kind", "domain", "strategy", "estimator", "epsilon", "noise_mode", "bias", "coverage",
                "ci_width_ratio"):
        assert key in row
    assert row["kind"] == "policy_value" and row["ci_width_ratio"] == pytest.approx(1.0)


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
    """fedrec.server.strategies:app on Flower's simulation engine (causal run, then the strategy
    release through client/strategy_app.py): at ε = inf the strategy values equal the in-process
    path's on the same institutions, and every ledger has the release. Plain sums to keep the
    suite's time: behind SecAgg+ (four stages a round) the same check passed by hand, 101 s."""
    from fedrec.common.datasets import write_institution
    from fedrec.server.strategies import benefit_strategy, logging_strategy, random_strategy
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config
    from fedrec.simulations.domains import domain_federation
    from fedrec.simulations.provision import provision_institutions
    from fedrec.simulations.run import launch_flower
    from fedrec.simulations.strategies import evaluate_inprocess

    insts, _ = domain_federation("health", institutions=3, people=900, seed=9, skew=0.3)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)
    ccfg, _ = resolve_config(insts, epsilon=INF)
    out = tmp_path / "out"
    policy_dir = provision_institutions([d.name for d in insts], out, epsilon=ccfg.epsilon, delta=ccfg.delta,
                                        allow_non_private=True)
    cfg = RunConfig().override(**{"institutions": 3, "seed": 0, "data-dir": str(data.resolve()),
                                  "results-dir": str(out.resolve()), "sim.policy-dir": str(policy_dir),
                                  "privacy.delta": ccfg.delta, "secagg.enabled": False})
    flat = ccfg.to_flat()
    launch_flower({**cfg.to_flat(), **flat}, tmp_path / "work", num_supernodes=3,
                  server_app="fedrec.server.strategies:app", client_app="fedrec.client.strategy_app:app",
                  extra_config=flat, quiet=True)
    report = json.loads((out / "strategies.json").read_text())
    causal = estimate_inprocess(insts, ccfg)
    specs = [benefit_strategy(causal.items, insts[0].study.outcome_better), random_strategy(), logging_strategy()]
    res, _ = evaluate_inprocess(insts, causal, specs, OPEConfig(epsilon=INF), covariates=ccfg.covariates,
                                derived=ccfg.derived)
    assert set(report["values"]["random"]) == {"dr"}  # the default release: DR only
    for s in ("benefit", "random", "logging"):
        for est in ("dr",):
            want = res.estimate(s, est)
            got = report["values"][s][est]
            assert got["value"] == pytest.approx(want.value, rel=1e-6, abs=1e-9), (s, est)
            assert got["se"] == pytest.approx(want.se, rel=1e-6), (s, est)
    for d in insts:
        rows = list(PrivacyLedger(out / "ledgers" / f"{d.name}.db").rows())
        assert any(r.task == "strategy-values" for r in rows)


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
