"""Third red-team pass: for every training release, does the mechanism that runs match the event
the institution charged, whatever schedule the coordinator's run config describes?

The handler recomputes the plan from each message's run config, charges the round's event and
hands that event to the trainer, so a config that changes mid-run (rounds, ε, local-steps,
sample-rate, clip-norm, noise mode) is charged at what it asks and capped by the institution's
ceilings. Two defects were in the numbers themselves (each test below failed before its fix):

* **sample rate below float32's resolution**: Opacus' DPDataLoader masks persons with a float32
  ``torch.rand`` (a multiple of 2^-24) ``< q``, so it includes each person with probability
  ``ceil(q·2^24)/2^24``, not the charged q. Measured: a run config with sample-rate 1e-8,
  20 rounds x 50 local steps, count-budget-share 1e-6 was charged ε = 1.995 (under a
  max-run-epsilon of 2) and ran at q = 6e-8: ε = 45.7 (PRV) / 58.7 (RDP). Fix: sample-rate
  >= 2^-24 before any charge, and the sampler is handed the largest multiple of 2^-24 not
  above the charged q (common/privacy/release.realizable_rate; the adapter's float64 sampler
  the same at 2^-53);
* **clip norm outside float32's range**: MF's DP-SGD runs in float32. At clip-norm 1e-44 a
  person's clipped contribution lives on the subnormal lattice and rounding moved one person
  (50 ratings) by 1.37·C while the ledger charged sensitivity C; at 1e38 the noise overflowed
  (charged, the release was all ±inf); at 1e300 the handler crashed after the charge. Fix:
  privacy.clip-norm in [1e-6, 1e6] before any charge (common/privacy/release.CLIP_NORM_RANGE).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from fedrec.client import app as client_app
from fedrec.client import train as mf_train
from fedrec.client.train import MFTrainer, plan_dp
from fedrec.common.config import RunConfig
from fedrec.common.models.mf import PersonRatings
from fedrec.common.privacy.accountant import DPSGDEvent, epsilon_for
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import load_policy

from test_adapter_flower import CFG as ADAPTER_CFG
from test_adapter_flower import folder as adapter_folder  # noqa: F401 - fixture
from test_adapter_flower import train_msg as adapter_train_msg
from test_institution_policy import (  # noqa: F401 - fixtures
    BASE, _task_identity, counts_msg, ctx_for, ledger_rows, mf_folder, node, refusal_code, train_msg)

GRID = 2.0**-24  # torch.rand's float32 resolution


@pytest.fixture
def ran(monkeypatch):
    """What actually runs in the MF trainer: each Opacus noise addition (σ handed to Opacus, clip)
    and the rate each DPDataLoader is built with — spied on Opacus' side, not ours."""
    seen: dict[str, list] = {"noise": [], "loader": []}
    add_noise = DPOptimizerFastGradientClipping.add_noise

    def spy_noise(self):
        seen["noise"].append((self.noise_multiplier, self.max_grad_norm))
        return add_noise(self)

    class SpyLoader(mf_train.DPDataLoader):
        def __init__(self, *args, sample_rate, **kwargs):
            seen["loader"].append(sample_rate)
            super().__init__(*args, sample_rate=sample_rate, **kwargs)

    monkeypatch.setattr(DPOptimizerFastGradientClipping, "add_noise", spy_noise)
    monkeypatch.setattr(mf_train, "DPDataLoader", SpyLoader)
    return seen


def _rows(folder):
    return PrivacyLedger(load_policy(folder / "privacy.toml").ledger).rows()


def _shared(folder, **overrides):
    """One run's contexts share their state (the node's pinned ledger head), like Flower's."""
    ctx = ctx_for(folder, **overrides)
    return lambda **o: type(ctx)(run_id=ctx.run_id, node_id=ctx.node_id, node_config=ctx.node_config,
                                 state=ctx.state, run_config={**ctx.run_config, **o})


# ------------------------------------------------------------------------------- defects
@pytest.mark.parametrize("rate", [1e-8, 2.0**-25])
def test_a_sample_rate_below_the_samplers_resolution_is_refused_before_any_charge(node, rate):
    for msg, handler in ((counts_msg(), client_app.counts), (train_msg(node), client_app.train)):
        assert refusal_code(handler(msg, ctx_for(node, **{"sample-rate": rate}))) is not None
    assert ledger_rows(node) == 0


def test_the_mf_sampler_never_includes_a_person_above_the_charged_rate(node, ran):
    """The premise (torch.rand is a multiple of 2^-24), then: the rate the loader is handed is on
    that grid and not above the charged q — so each person's inclusion probability is exactly
    that rate. Before the fix the loader got q = 3.5·2^-24 and sampled at 4·2^-24 (+14%)."""
    u = torch.rand(1 << 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))
    for q in (3.5 * GRID, 0.3):
        ran["loader"].clear()
        ctx = ctx_for(node, **{"sample-rate": q, "privacy.accountant": "rdp"})  # rdp: PRV on q < 1 costs seconds
        assert refusal_code(client_app.train(train_msg(node), ctx)) is None
        charged = _rows(node)[-1].event
        assert charged.sample_rate == q  # the charge is the run config's q ...
        (rate,) = ran["loader"]
        assert rate / GRID == math.floor(rate / GRID) and q - GRID < rate <= q  # ... the sampler at most q


@pytest.mark.parametrize("clip", [1e-44, 1e38, 1e300])
def test_a_clip_norm_outside_float32s_exact_range_is_refused_before_any_charge(node, clip):
    for msg, handler in ((counts_msg(), client_app.counts), (train_msg(node), client_app.train)):
        assert refusal_code(handler(msg, ctx_for(node, **{"privacy.clip-norm": clip}))) is not None
    assert ledger_rows(node) == 0


def test_one_person_moves_the_mf_release_by_at_most_c_at_the_smallest_accepted_clip():
    """A person with 50 ratings, the release's noise negligible (σ = 1e-9): the delta is their
    clipped gradient. At the range's low end (1e-6) its norm is C to float32 precision; at 1e-44
    (measured 1.37·C before the fix) the trainer refuses."""
    rng = np.random.default_rng(0)
    k, n_items = 50, 500
    ratings = PersonRatings.from_arrays(np.zeros(k, int), rng.choice(n_items, k, replace=False),
                                        rng.uniform(0.5, 5.0, k).astype(np.float32), 1)
    quiet = DPSGDEvent(noise_multiplier=1e-9, sample_rate=1.0, steps=1)
    for clip in (1e-6, 1e-44):
        cfg = RunConfig().override(**{"lr": 1.0, "item-reg": 0.0, "institutions": 1})
        cfg = RunConfig.from_flat({**cfg.to_flat(), "privacy.clip-norm": clip})
        trainer = MFTrainer(ratings, n_items, cfg, seed=1)
        run = lambda: trainer.train_round(trainer.item_side.to_numpy(), np.ones(n_items, np.float32), event=quiet)
        if clip < 1e-6:
            with pytest.raises(ValueError, match="privacy.clip-norm"):
                run()
        else:
            norm = float(np.linalg.norm(run()["item_bias"].astype(np.float64)))
            assert norm == pytest.approx(clip, rel=1e-5)


# ------------------------------------------------------------------------------ defended
def test_the_mechanism_that_runs_is_the_charged_event_when_the_schedule_changes_mid_run(node, ran):
    """One run whose config changes every message (local-steps, clip-norm, noise mode): each
    round, Opacus adds noise exactly event.steps times with σ·√share and the message's clip, the
    sampler runs at the event's q, and the reply's noise-var says the same.
    Fails if train_round stops looping over event.steps (client/train.py ``for _ in
    range(event.steps)``), drops the noise share (release.dp_sgd_optimizer ``local_sigma``) or
    hands the loader another rate."""
    ctx = _shared(node)
    assert refusal_code(client_app.counts(counts_msg(), ctx())) is None
    asks = [({"local-steps": 3}, None, 1.0),  # q < 1: the two tests below (PRV on q < 1 costs seconds)
            ({"privacy.clip-norm": 0.25, "privacy.noise-mode": "distributed", "privacy.n-min": 3}, [1, 2, 3], 1 / 3)]
    for overrides, active, share in asks:
        ran["noise"].clear(), ran["loader"].clear()
        reply = client_app.train(train_msg(node, active=active), ctx(**overrides))
        assert refusal_code(reply) is None
        event = _rows(node)[-1].event
        clip = overrides.get("privacy.clip-norm", BASE.privacy.clip_norm)
        assert event == plan_dp(BASE.override(**overrides)).round_event()
        assert len(ran["noise"]) == event.steps
        for sigma, c in ran["noise"]:
            assert sigma == pytest.approx(event.noise_multiplier * math.sqrt(share), rel=1e-12) and c == clip
        assert ran["loader"] == [event.sample_rate]  # both on the 2^-24 grid: exact
        noise_var = reply.content.metric_records["metrics"]["noise-var"]
        assert noise_var == pytest.approx((event.noise_multiplier * clip) ** 2 * share, rel=1e-12)


def test_a_plan_checked_for_many_rounds_cannot_then_be_spent_one_cheap_round_at_a_time(node, ran):
    """The counts query checks a 20-round plan; the coordinator then sends rounds claiming
    ``rounds = 1`` (each round's σ calibrated to spend the whole ε). Each is charged at the σ
    that runs, and the run stops at the institution's max-run-epsilon (2): refused, nothing
    charged. Fails without the per-charge run ceiling (client/guard.py ``_fits`` run_eps and
    common/privacy/ledger.py's ``run_ceiling`` check inside the write)."""
    ctx = _shared(node)
    assert refusal_code(client_app.counts(counts_msg(), ctx(rounds=20))) is None
    codes = []
    for _ in range(6):
        ran["noise"].clear()
        before = len(_rows(node))
        codes.append(refusal_code(client_app.train(train_msg(node), ctx(rounds=1))))
        new = _rows(node)[before:]
        if codes[-1] is None:
            assert [r.event for r in new] == [plan_dp(BASE.override(rounds=1)).round_event()]
            assert [s for s, _ in ran["noise"]] == [new[0].event.noise_multiplier]
        else:
            assert new == [] and ran["noise"] == []
    assert codes[0] is None and "policy" in codes
    spent = epsilon_for([r.event for r in _rows(node)], delta=load_policy(node / "privacy.toml").delta_cap)
    assert spent <= 2.0 * (1 + 1e-9)


def test_an_empty_poisson_batch_still_releases_the_charged_noise(node, ran):
    """At q = 2^-20 the institution's few hundred persons almost never join a step: the release
    must still be the charged noise, std σ·C per coordinate (scaled by lr/q and the public step
    size). Fails if the empty-batch branch of client/train.py (``p.grad = torch.zeros_like(p)``
    then ``optimizer.step()``) skipped the step: the delta would be 0."""
    q = 2.0**-20
    reply = client_app.train(train_msg(node), ctx_for(node, **{"sample-rate": q}))
    assert refusal_code(reply) is None
    event = _rows(node)[-1].event
    assert len(ran["noise"]) == event.steps == 1
    delta = reply.content.array_records["arrays"]["item_bias"].numpy().astype(np.float64)
    noise = delta / (BASE.train.lr / q * 0.1)  # train_msg's public step size is 0.1
    n = noise.size
    assert float(np.std(noise)) == pytest.approx(event.noise_multiplier * BASE.privacy.clip_norm,
                                                 rel=5 / math.sqrt(2 * n))


def test_a_deployed_adapter_node_draws_fresh_noise_per_step_at_the_charged_event(adapter_folder, monkeypatch):
    """The adapter at a deployed node, asked for sim.noise-seed = 5 and 2 local steps: each
    round adds the charged σ with the message's clip once per event step, and two identical
    messages give different deltas (a coordinator that could fix the noise could subtract it).
    Fails if the adapter seeded its noise from the run config at a deployed node (client/app.py
    ``_adapter_train``: ``simulation_seed``) or ran another number of steps than the event's
    (client/train_adapter.py ``q, n_steps = event.sample_rate, event.steps``)."""
    from flwr.app import Context, RecordDict

    import fedrec.common.models.adapter as adapter_model
    from fedrec.server.app import initial_adapter_arrays

    seen = []
    release = adapter_model.gaussian_release

    def spy(value, *, event, noise_share, generator=None):
        seen.append((event.noise_multiplier, event.sensitivity, noise_share))
        return release(value, event=event, noise_share=noise_share, generator=generator)

    monkeypatch.setattr(adapter_model, "gaussian_release", spy)
    cfg = {**ADAPTER_CFG.to_flat(), "sim.noise-seed": 5, "local-steps": 2, "privacy.clip-norm": 0.5}
    ctx = Context(run_id=9, node_id=7, node_config={"data-dir": str(adapter_folder)}, state=RecordDict(),
                  run_config=cfg)
    start = initial_adapter_arrays(seed=0)
    replies = [client_app.train(adapter_train_msg(start), ctx) for _ in range(2)]
    assert all(refusal_code(r) is None for r in replies)
    rows = _rows(adapter_folder)
    assert len(rows) == 2 and rows[0].event == rows[1].event and rows[0].event.steps == 2
    assert seen == [(rows[0].event.noise_multiplier, 0.5, 1.0)] * 4
    a, b = ([r.content.array_records["arrays"][k].numpy() for k in sorted(start)] for r in replies)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))
