"""Person-level DP for matrix factorization: clipping, accounting, what leaves the institution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.client.train import DPSchedule, MFTrainer, plan_dp
from fedrec.common.config import ConfigError, RunConfig
from fedrec.common.models.mf import (
    ItemSide,
    PersonRatings,
    UserSide,
    fit_user_side,
    person_losses_and_norms,
    person_residuals,
    weighted_item_counts,
)
from fedrec.common.privacy.accountant import DPSGDEvent, GaussianEvent, epsilon_for
from fedrec.common.privacy.person_clipping import clipped_sum_backward


def _toy(n_persons=12, n_items=40, dim=3, seed=0, heavy=None):
    rng = np.random.default_rng(seed)
    person, item, rating = [], [], []
    for u in range(n_persons):
        k = heavy if (heavy is not None and u == 0) else int(rng.integers(2, 15))
        items = rng.choice(n_items, size=k, replace=False)
        person += [u] * k
        item += items.tolist()
        rating += rng.uniform(0.5, 5.0, size=k).round(1).tolist()
    pr = PersonRatings.from_arrays(np.array(person), np.array(item), np.array(rating, np.float32), n_persons)
    side = ItemSide(n_items, dim, global_bias=3.0, init_scale=0.5, seed=seed)
    user = UserSide.zeros(n_persons, dim)
    fit_user_side(side, pr, user, reg=1.0)
    return pr, side, user


@pytest.mark.parametrize("dim", [0, 4])
def test_fast_clipping_matches_one_person_at_a_time_reference(dim):
    pr, side, user = _toy(dim=dim)
    persons = torch.arange(pr.n_persons)
    clip = 0.3
    params = side.released_parameters()
    # fast: one backward of the coefficient-weighted loss
    for p in params:
        p.grad = None
    losses, norms = person_losses_and_norms(side, user, pr, persons)
    clipped_sum_backward(losses, norms, clip)
    fast = [p.grad.clone() for p in params]
    # slow reference: autograd per person, clip, sum
    ref = [torch.zeros_like(p) for p in params]
    for u in range(pr.n_persons):
        one = torch.tensor([u])
        seg, item, rating = pr.gather(one)
        e = person_residuals(side, user, seg, one, item, rating)
        w = 1.0 / np.sqrt(len(item))
        grads = torch.autograd.grad((0.5 * w * e * e).sum(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        # the analytic norm is the exact autograd norm
        assert norms[u].item() == pytest.approx(norm.item(), rel=1e-5, abs=1e-7)
        scale = min(1.0, clip / (norm.item() + 1e-12))
        for r, g in zip(ref, grads):
            r += scale * g
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_clipping_is_per_person_not_per_rating():
    """A heavy rater's whole contribution is bounded by C (per-rating clipping would give ~C·√n)."""
    pr, side, user = _toy(n_persons=1, n_items=400, dim=0, heavy=300)
    cfg = RunConfig().override(**{"privacy.clip-norm": 0.5, "lr": 1.0, "item-reg": 0.0, "institutions": 1})
    trainer = MFTrainer(pr, side.n_items, cfg, global_bias=0.0, seed=0)  # offset 0: big residuals
    schedule = DPSchedule(noise_multiplier=1.0, local_noise_multiplier=0.0, sample_rate=1.0,
                          steps_per_round=1, rounds=1, clip_norm=0.5)
    ones = np.ones(side.n_items, np.float32)
    delta, stats = trainer.train_round(trainer.item_side.to_numpy(), schedule, ones)
    total = np.sqrt(sum((v**2).sum() for v in delta.values()))
    assert stats["clipped_fraction"] == 1.0
    assert total == pytest.approx(0.5, rel=1e-4)  # exactly C: the person was clipped as a whole
    # each single rating's gradient is far below C, so per-rating clipping would not clip at all
    seg, item, rating = pr.gather(torch.tensor([0]))
    e = person_residuals(trainer.item_side, trainer.user, seg, torch.tensor([0]), item, rating).detach()
    per_rating = (e.abs() / np.sqrt(len(item))).max().item()
    assert per_rating < 0.5 and per_rating * np.sqrt(len(item)) > 2 * 0.5


def test_noise_is_added_with_the_calibrated_std():
    """Zero data signal: the released delta is pure noise with std σ·C (no missing noise term)."""
    pr, side, _ = _toy(n_persons=3, n_items=2000, dim=0)
    cfg = RunConfig().override(**{"lr": 1.0, "item-reg": 0.0, "institutions": 1})
    trainer = MFTrainer(pr, side.n_items, cfg, seed=1)
    sched = DPSchedule(noise_multiplier=2.0, local_noise_multiplier=2.0, sample_rate=1.0,
                       steps_per_round=1, rounds=1, clip_norm=0.25)
    delta, _ = trainer.train_round(trainer.item_side.to_numpy(), sched, np.ones(side.n_items, np.float32))
    unrated = np.setdiff1d(np.arange(side.n_items), pr.item.numpy())
    sd = delta["item_bias"][unrated].std()
    assert sd == pytest.approx(2.0 * 0.25, rel=0.06)


def test_item_counts_have_sensitivity_one():
    pr, side, _ = _toy()
    for u in range(pr.n_persons):
        keep = pr.person_of_rows() != u
        without = PersonRatings.from_arrays(
            pr.person_of_rows()[keep].numpy(), pr.item[keep].numpy(), pr.rating[keep].numpy(), pr.n_persons
        )
        diff = weighted_item_counts(pr, side.n_items) - weighted_item_counts(without, side.n_items)
        assert diff.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_run_is_calibrated_as_a_whole_and_composes_without_reset():
    cfg = RunConfig().override(**{"privacy.epsilon": 4.0, "rounds": 5, "persons-per-step": 20, "local-steps": 3})
    sched = plan_dp(cfg, n_persons=100)
    assert sched is not None and sched.sample_rate == pytest.approx(0.2)
    events = sched.run_events()
    eps = epsilon_for(events, delta=cfg.privacy.delta, accountant="prv")
    assert 3.9 <= eps <= 4.0 + 1e-9
    # per-round events compose like one accountant over all steps (no per-round reset)
    one_run = [GaussianEvent(noise_multiplier=sched.count_noise_factor * sched.noise_multiplier),
               DPSGDEvent(noise_multiplier=sched.noise_multiplier, sample_rate=0.2, steps=15)]
    assert epsilon_for(one_run, delta=1e-5, accountant="rdp") == pytest.approx(
        epsilon_for(events, delta=1e-5, accountant="rdp"), rel=1e-9)
    # ... and a per-round reset would under-report
    assert epsilon_for([sched.round_event()], delta=1e-5) < 0.6 * eps


def test_dp_off_and_distributed_mode_plans():
    assert plan_dp(RunConfig().override(**{"privacy.epsilon": float("inf")}), 50) is None
    cfg = RunConfig().override(**{"privacy.noise-mode": "distributed", "privacy.n-min": 4, "institutions": 10})
    s = plan_dp(cfg, 50)
    assert s.local_noise_multiplier == pytest.approx(s.noise_multiplier / 2)
    with pytest.raises(ConfigError, match="local-steps=1"):
        plan_dp(cfg.override(**{"local-steps": 2}), 50)


def test_count_release_takes_its_budget_share_and_the_run_composes_to_epsilon():
    for rounds in (2, 20):
        cfg = RunConfig().override(**{"privacy.epsilon": 8.0, "rounds": rounds, "privacy.count-budget-share": 0.2})
        s = plan_dp(cfg, 60)
        eps = epsilon_for(s.run_events(), delta=cfg.privacy.delta, accountant="prv")
        assert 7.9 <= eps <= 8.0 + 1e-6
        # full batch: the counts' share of 1/σ_eff² is exactly the configured share
        inv_count = 1.0 / s.count_event().noise_multiplier ** 2
        inv_total = inv_count + rounds / s.noise_multiplier**2
        assert inv_count / inv_total == pytest.approx(0.2)
    # a fixed share keeps the counts' noise fixed as rounds grow (a fixed σ multiple would not)
    two = plan_dp(RunConfig().override(**{"rounds": 2}), 60).count_event().noise_multiplier
    twenty = plan_dp(RunConfig().override(**{"rounds": 20}), 60).count_event().noise_multiplier
    assert twenty == pytest.approx(two, rel=1e-9)
    # a smaller share moves budget from the counts to the training steps
    small = plan_dp(RunConfig().override(**{"privacy.count-budget-share": 0.05}), 60)
    assert small.noise_multiplier < plan_dp(RunConfig(), 60).noise_multiplier
