"""Red-team audit: the coordinator lies, the institution's guarantee must hold anyway.

Each test plays a coordinator that sends a message an honest ServerApp never would, calls the
real handler in-process on a real institution folder with its own policy and SQLite ledger
(``fedrec-client init``), and checks the privacy contract: refused before any charge, or a
release that is exactly the charged Gaussian mechanism's. Defects found by this audit (each
test failed before its fix):

* non-finite public coefficients (``beta/``, ``mu1/``, ``mu0/<item>``) or a whitening whose
  finite but huge entries overflow on some people's covariates made NaN rows, which survive
  clipping: the released (noised) sum was NaN exactly when some person had such covariates —
  an un-noised, data-dependent bit (fix: check_public_arrays before the charge,
  statistics.clipped_sum zeroes non-finite rows);
* a public value the handler reads only after the charge (a missing or misshapen ``beta``, a
  whitening without its radius in a DP run, a strategy ``clip-factor`` whose clip overflows, a
  rank coefficient that is not a number) crashed the handler after the charge: budget spent,
  nothing released (fix: the same checks, before the charge);
* the ledger's task label of a causal release was the message's ``step``, whatever the
  release (fix: a step must name the handler's release).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.common.causal.config import CausalConfig
from fedrec.common.config import RunConfig
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import POLICY_FILE, load_policy
from fedrec.server.aggregation import numpy_to_arrays


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    """One deployed institution (education simulator, 120 people), its policy (cap 4, max-run 2)
    and ledger; its design columns and items."""
    from typer.testing import CliRunner

    from fedrec.client.cli import app as client_cli
    from fedrec.client.statistics import design_columns
    from fedrec.common.datasets import load_institution, write_institution
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("education", institutions=1, people=120, seed=2, skew=0.0)
    folder = write_institution(tmp_path_factory.mktemp("audit") / insts[0].name, insts[0])
    res = CliRunner().invoke(client_cli, ["init", str(folder), "--epsilon-cap", "4", "--max-run-epsilon", "2"])
    assert res.exit_code == 0, res.output
    data = load_institution(folder)
    cols = [c[0] for c in design_columns(data)]
    return folder, cols, sorted(data.items["item_id"].astype(str)), data


def _ledger(folder: Path) -> PrivacyLedger:
    return PrivacyLedger(load_policy(folder / POLICY_FILE).ledger)


def _refusal(reply: Message) -> str | None:
    rec = reply.content.config_records.get("refusal")
    return None if rec is None else str(rec["code"])


def _zeros(p: int, items, kinds=("beta", "mu1", "mu0")) -> dict:
    return {f"{k}/{it}": np.zeros(p) for it in items for k in kinds}


# ------------------------------------------------------------------ strategy release
def _strategy(inst, run_id: int, arrays: dict, *, specs=None, sigma: float = 20.0):
    from fedrec.client import strategy_app

    folder, cols, items, _ = inst
    specs = specs or [{"name": "random", "kind": "random"}, {"name": "logging", "kind": "logging"}]
    conf = ConfigRecord({"server-round": 1, "noise-multiplier": sigma, "strategies": json.dumps(specs),
                         "items": json.dumps(items), "columns": json.dumps(cols), "clip": 8.0, "switch-tau": 5.0,
                         "square-clip": 3.0, "second-moment-weight": 0.5, "trim": json.dumps([0.05, 0.95]),
                         "covariates": json.dumps(None), "derived": json.dumps([]),
                         "strategies.epsilon": 1.0, "strategies.delta": 1e-5,
                         "strategies.noise-mode": "local", "strategies.n-min": 0})
    msg = Message(RecordDict({"config": conf, "arrays": numpy_to_arrays(arrays)}), dst_node_id=7,
                  message_type="query.strategy_values")
    ctx = Context(run_id=run_id, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                  run_config=RunConfig().to_flat())
    return strategy_app.strategy_values(msg, ctx)


def _inf_on(p: int, column: int) -> np.ndarray:
    """Coefficients ``+inf`` on the intercept and on ``column``: ``x @ v`` is NaN exactly for
    the rows whose scaled covariate ``column`` is <= 0 (inf - inf, inf * 0) — a data-dependent NaN."""
    v = np.zeros(p)
    v[0] = v[column] = math.inf
    return v


@pytest.mark.parametrize("key", ["mu1", "beta"])
def test_strategy_release_refuses_non_finite_nuisances_before_any_charge(inst, key):
    """Defect: ``mu1/<item>`` (or ``beta``) = +inf on the intercept and one covariate made the
    released sum NaN iff someone considered for the item had that covariate <= 0 (released and
    marked released). Now refused ``policy`` before the charge. Mutant: drop the
    ``np.isfinite`` test on the coefficients in sensitivity.check_public_arrays."""
    folder, cols, items, _ = inst
    p = len(cols) + 1
    arrays = _zeros(p, items)
    arrays[f"{key}/{items[0]}"] = _inf_on(p, 1)
    before = len(_ledger(folder).rows(run_id="101"))
    assert _refusal(_strategy(inst, 101, arrays)) == "policy"
    assert len(_ledger(folder).rows(run_id="101")) == before


def test_strategy_release_stays_finite_when_finite_public_values_overflow(inst):
    """Defect (defence in depth): a whitening whose entries are finite (it passes every check)
    but huge overflows to inf on the people whose first two covariates are both +1 (or both
    -1), and the radius clip turns inf into NaN (inf x 0). The release must still be a finite
    Gaussian release: such a person's row counts as zero. Mutant: drop the zeroing of
    non-finite rows in client/statistics.clipped_sum."""
    folder, cols, items, data = inst
    q = len(cols)
    a = np.eye(q)
    a[0, 0] = a[0, 1] = 1e308
    arrays = {**_zeros(q + 1, items), "whiten/a": a, "whiten/b": np.zeros(q), "whiten/radius": np.array([3.0]),
              "whiten/weighted": np.array([0.0])}
    from fedrec.client.statistics import people_design

    x = people_design(data)
    assert np.any((x[:, 1] == x[:, 2]) & (np.abs(x[:, 1]) == 1)), "the attack needs such a person"
    reply = _strategy(inst, 102, arrays)
    assert _refusal(reply) is None
    out = reply.content.array_records["arrays"]["strategies"].numpy()
    assert np.all(np.isfinite(out))
    assert _ledger(folder).rows(run_id="102")[-1].status == "released"


def _spec(kind: str, inst) -> list:
    _, cols, items, _ = inst
    if kind == "clip-factor 1e308":
        return [{"name": "random", "kind": "random", "clip-factor": 1e308}]
    coef = {it: {c: 0.0 for c in ["intercept", *cols]} for it in items}
    coef[items[0]][cols[0]] = "x" if kind == "rank coefficient 'x'" else None
    return [{"name": "benefit", "kind": "rank", "coef": coef}]


@pytest.mark.parametrize("kind", ["clip-factor 1e308", "rank coefficient 'x'", "rank coefficient null"])
def test_strategy_specs_the_release_cannot_use_are_refused_before_any_charge(inst, kind):
    """Defects: ``clip-factor`` 1e308 passed check_strategies (which multiplies by 1), then
    8 x 1e308 = inf made component_bounds raise after the charge; a rank coefficient that is
    not a number passed the presence check and made exposure_probabilities raise after the
    charge: ε spent, nothing released. Mutants: drop the ``strategy_bounds`` loop in
    strategy_app's validation; drop the ``float(coef[it][c])`` check in
    ope_statistics.check_strategies."""
    folder, cols, items, _ = inst
    run_id = 110 + ["clip-factor 1e308", "rank coefficient 'x'", "rank coefficient null"].index(kind)
    assert _refusal(_strategy(inst, run_id, _zeros(len(cols) + 1, items), specs=_spec(kind, inst))) == "policy"
    assert _ledger(folder).rows(run_id=str(run_id)) == []


def test_a_noise_multiplier_below_the_declared_epsilon_is_charged_at_its_own_epsilon(inst):
    """Refused already (kept as a guard): the message declares ε = 1 but sends the σ of ε ≈ 2.6
    — above the policy's max-run-epsilon (2), within the cap (4) with this ledger's history. The
    guard charges the σ actually applied, computes its ε with the institution's accountant and
    refuses it (``policy``) before anything is computed. Mutant: in
    client/guard.ReleaseGuard._fits, skip the max-run-epsilon test (the ledger's own cap check
    would let it through)."""
    from fedrec.common.privacy.accountant import GaussianEvent, calibrate_for_events, epsilon_for

    folder, cols, items, _ = inst
    sigma = calibrate_for_events(lambda s: [GaussianEvent(noise_multiplier=s)], target_epsilon=2.6, delta=1e-5)
    history = [r.event for r in _ledger(folder).rows()]
    assert epsilon_for(history + [GaussianEvent(noise_multiplier=sigma)], delta=1e-5) < 4.0  # only max-run binds
    assert _refusal(_strategy(inst, 104, _zeros(len(cols) + 1, items), sigma=sigma)) == "policy"
    assert _ledger(folder).rows(run_id="104") == []


# ------------------------------------------------------------------ causal steps
def _step(inst, run_id: int, handler: str, arrays: dict, extra: dict | None = None):
    from fedrec.client import causal_app

    folder, _, items, _ = inst
    ctx = Context(run_id=run_id, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                  run_config={**RunConfig().to_flat(), **CausalConfig(epsilon=1.0).to_flat()})
    conf = {"server-round": 1, "step": handler, "items": json.dumps(items[:2]), "noise-multiplier": 20.0,
            **(extra or {})}
    content = {"config": ConfigRecord(conf)}
    if arrays:
        content["arrays"] = numpy_to_arrays(arrays)
    msg = Message(RecordDict(content), dst_node_id=7, message_type=f"query.causal_{handler}")
    return getattr(causal_app, f"causal_{handler}")(msg, ctx)


def _whitening(q: int, radius: float) -> dict:
    return {"whiten/a": np.eye(q), "whiten/b": np.zeros(q), "whiten/radius": np.array([radius]),
            "whiten/weighted": np.array([0.0])}


def _attacks(p: int, items) -> dict:
    two = items[:2]
    clips = {f"clip/{it}": np.array([5.0]) for it in two}
    inf_beta = {**_zeros(p, two), f"beta/{two[0]}": _inf_on(p, 1)}
    return {
        # defects (each failed before the fix): NaN rows in a released sum, or a crash after the charge
        "propensity: beta +inf": ("propensity", inf_beta),
        "influence: beta +inf": ("influence", {**inf_beta, **clips}),
        "influence: mu0 NaN": ("influence", {**_zeros(p, two), f"mu0/{two[1]}": np.full(p, np.nan), **clips}),
        "propensity: whitening without a radius under DP": ("propensity", {**_zeros(p, two), **_whitening(p - 1, -1.0)}),
        "propensity: a radius without its whitening": ("propensity", {**_zeros(p, two), "whiten/radius": np.array([0.01])}),
        "propensity: whitening b misshapen": ("propensity", {**_zeros(p, two), **_whitening(p - 1, 3.0),
                                                             "whiten/b": np.zeros(3)}),
        "propensity: beta missing": ("propensity", {}),
        "propensity: beta misshapen": ("propensity", _zeros(p + 3, two, ("beta",))),
        "influence: mu1 missing (aipw)": ("influence", {**_zeros(p, two, ("beta", "mu0")), **clips}),
        # refused already (kept: each must stay refused before the charge)
        "influence: psi clip NaN": ("influence", {**_zeros(p, two), **clips, f"clip/{two[0]}": np.array([np.nan])}),
    }


@pytest.mark.parametrize("attack", list(_attacks(3, ["a", "b"])))
def test_causal_steps_refuse_unusable_public_arrays_before_any_charge(inst, attack):
    """Each lie is refused with a code and **no ledger row** for the run: never NaN in a
    released sum, never a charge followed by a crash (budget spent, nothing released).
    Mutants: drop the ``check_public_arrays`` call in client/causal_app._step (the defects);
    drop the ``influence_clip`` / ``release_weight`` checks in common/causal/sensitivity.py
    (the already-refused ones)."""
    folder, cols, items, _ = inst
    handler, arrays = _attacks(len(cols) + 1, items)[attack]
    run_id = 200 + list(_attacks(3, ["a", "b"])).index(attack)
    reply = _step(inst, run_id, handler, arrays)
    assert _refusal(reply) in ("policy", "internal"), attack
    assert _ledger(folder).rows(run_id=str(run_id)) == [], f"{attack}: charged, then nothing released"


def test_a_step_sent_under_another_steps_name_is_refused_before_any_charge(inst):
    """Defect (audit trail): a ``moments`` release sent with ``step = influence:1`` was charged
    and recorded as ``causal-influence``: the coordinator wrote the ledger's task label. Now
    refused; the honest ``moments:1`` is recorded as ``causal-moments:1``. Mutant: drop the
    ``step.split(":")[0] != kind`` refusal in client/causal_app._step."""
    folder = inst[0]
    assert _refusal(_step(inst, 250, "moments", {}, {"step": "influence:1"})) == "policy"
    assert _ledger(folder).rows(run_id="250") == []
    assert _refusal(_step(inst, 251, "moments", {}, {"step": "moments:1"})) is None
    assert [r.task for r in _ledger(folder).rows(run_id="251")] == ["causal-moments:1"]


def test_honest_causal_step_with_whitening_still_releases(inst):
    """The checks refuse only lies: an honest propensity step (zeros, a whitening with its
    radius) and an honest influence step are charged, released, finite."""
    folder, cols, items, _ = inst
    p = len(cols) + 1
    two = items[:2]
    for run_id, handler, arrays in ((230, "propensity", {**_zeros(p, two, ("beta",)), **_whitening(p - 1, 3.0)}),
                                    (231, "influence", {**_zeros(p, two), **{f"clip/{it}": np.array([5.0]) for it in two}})):
        reply = _step(inst, run_id, handler, arrays)
        assert _refusal(reply) is None, handler
        assert all(np.all(np.isfinite(v.numpy())) for v in reply.content.array_records["arrays"].values())
        assert [r.status for r in _ledger(folder).rows(run_id=str(run_id))] == ["released"]


def test_a_placebo_refutation_step_is_charged_at_three_times_the_bound(inst):
    """Refused already (kept as a guard): a step message that names ``causal.expert.refute-kind
    = placebo`` (one person's exposure moves into another's row: 3x the per-person bound) is
    charged as ``GaussianEvent(σ/3, 3 C)``, C the moments bound ``sqrt((p² + p)/2)`` written out
    here — never at the causal run's C. Mutant: in client/causal_app._step drop
    ``sens * SENSITIVITY_FACTOR[rkind]``."""
    folder, cols, _, _ = inst
    p = len(cols) + 1
    reply = _step(inst, 240, "moments", {}, {"causal.expert.refute-kind": "placebo"})
    assert _refusal(reply) is None
    (row,) = _ledger(folder).rows(run_id="240")
    assert row.event.sensitivity == pytest.approx(3 * math.sqrt((p * p + p) / 2))
    assert row.event.noise_multiplier == pytest.approx(20.0 / 3)


# ------------------------------------------------------------------ the release itself
def test_a_non_finite_row_counts_as_a_zero_row_in_the_release():
    """client/statistics.release with a NaN row and an inf row: the same output (same noise
    draw) as the release of the other people alone — the bad rows add nothing, and the noise is
    the charged event's. Mutant: drop the zeroing in clipped_sum (output NaN)."""
    from fedrec.client.statistics import Contribution, release
    from fedrec.common.privacy.accountant import GaussianEvent

    rng = np.random.default_rng(5)
    good = rng.normal(size=(6, 3))
    bad = np.array([[np.nan, 0.0, 0.0], [np.inf, 1.0, 0.0]])
    event = GaussianEvent(noise_multiplier=2.0, sensitivity=1.5)
    with_bad = release({"b": Contribution(np.vstack([good[:3], bad, good[3:]]), 1.5)}, event=event,
                       generator=np.random.default_rng(9))["b"]
    without = release({"b": Contribution(good, 1.5)}, event=event, generator=np.random.default_rng(9))["b"]
    assert np.all(np.isfinite(with_bad))
    np.testing.assert_array_equal(with_bad, without)
    # the independent check of "without": each row clipped to 1.5 by hand, plus the seeded noise
    norms = np.sqrt((good**2).sum(axis=1))
    by_hand = (good * np.minimum(1.0, 1.5 / norms)[:, None]).sum(axis=0)
    noise = np.random.default_rng(9).normal(0.0, 2.0 * 1.5, size=3)
    np.testing.assert_allclose(without, by_hand + noise, rtol=1e-12, atol=1e-12)


def test_two_folders_of_one_institution_name_in_one_process_do_not_share_encoded_rows(inst, tmp_path):
    """Found by CI (test order): the strategy and causal handlers cached each institution's encoded
    rows under its *name*, so a long-lived process (a simulation's actor) that served another
    folder of the same name indexed this folder's people with the other's rows (IndexError after
    the charge, or silently wrong rows). Keyed by the folder now: the 120-person folder, then a
    same-named one with 60 people, both release."""
    from typer.testing import CliRunner

    from fedrec.client.cli import app as client_cli
    from fedrec.common.datasets import write_institution
    from fedrec.simulations.domains import domain_federation

    folder, cols, items, data = inst
    small, _ = domain_federation("education", institutions=1, people=60, seed=5, skew=0.0)
    assert small[0].name == data.name and len(small[0].people) < len(data.people)
    other = write_institution(tmp_path / small[0].name, small[0])
    assert CliRunner().invoke(client_cli, ["init", str(other), "--epsilon-cap", "4"]).exit_code == 0
    arrays = _zeros(len(cols) + 1, items)
    assert _refusal(_strategy(inst, 300, arrays)) is None  # the 120-person folder's rows are cached
    reply = _strategy((other, cols, items, small[0]), 301, arrays)
    assert _refusal(reply) is None  # was 'internal': the 120-person rows indexed 60 people
    assert _ledger(other).rows(run_id="301")[-1].status == "released"
