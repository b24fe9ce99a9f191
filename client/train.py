"""Local DP-SGD for the matrix-factorization recommender, on Opacus.

One DP sample is **one person with all their training ratings**. Per step, persons are
Poisson-sampled by Opacus' ``DPDataLoader``; each person's item-side gradient is clipped to
``privacy.clip-norm`` exactly (``common/privacy/person_clipping.py``); Opacus'
``DPOptimizerFastGradientClipping`` adds Gaussian noise and scales; the accountant history
records every step. The user side is refitted in closed form before each step (and by
:meth:`MFTrainer.refit` before evaluation), and never leaves.

Privacy contract. :meth:`MFTrainer.item_counts` is a Gaussian release with sensitivity 1;
:meth:`MFTrainer.train_round` returns an item-side delta that is post-processing (with the
public preconditioner) of ``steps_per_round`` subsampled-Gaussian steps with sampling rate
``event.sample_rate``, per-person sensitivity ``clip_norm`` and noise std
``σ · clip_norm · √noise_share`` with σ the **charged** event's noise multiplier
(``common/privacy/release.py``: the noise cannot drift from the ledger). In ``local`` noise
mode the share is 1; in ``distributed`` mode it is 1/n_min and the guarantee holds for the
securely aggregated sum of at least n_min institutions (the guard verified the round's size;
one local step, so the delta stays linear in the noise — enforced in :func:`plan_dp`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import TensorDataset

from fedrec.common.config import ConfigError, RunConfig
from fedrec.common.models.mf import (
    ItemSide,
    PersonRatings,
    UserSide,
    fit_user_side,
    PreconditionedSGD,
    person_losses_and_norms,
    public_offset,
    weighted_item_counts,
)
from fedrec.common.privacy.accountant import (
    DPSGDEvent,
    Event,
    GaussianEvent,
    calibrate_for_events,
    calibrate_noise_multiplier,
)
from fedrec.common.privacy.person_clipping import clipped_sum_backward
from fedrec.common.ratings import RATING_BOUNDS
from fedrec.common.privacy.release import (check_clip_norm, check_sample_rate, dp_sgd_optimizer, gaussian_release,
                                         realizable_rate)

__all__ = ["DPSchedule", "plan_dp", "MFTrainer", "evaluation_sums"]


@dataclass(frozen=True)
class DPSchedule:
    """The whole run's DP plan for one institution, calibrated once (not per round).

    A run releases one item-count vector (a Gaussian release, sensitivity 1) and then, per
    round, ``steps_per_round`` DP-SGD steps. All share the noise multiplier σ, calibrated so
    that their composition spends exactly the run's ε.
    """

    #: σ of the released aggregate (what the accountant composes and the ledger is charged)
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    clip_norm: float
    #: the item counts carry this many times σ (they only set step sizes: coarse is enough)
    count_noise_factor: float = 1.0

    def count_noise_std(self, noise_share: float) -> float:
        """Std of the noise this institution adds to each item count (sensitivity 1): public."""
        return self.count_noise_factor * self.noise_multiplier * math.sqrt(noise_share)

    def noise_std(self, noise_share: float) -> float:
        """Std of the gradient noise this institution adds per coordinate and step: public."""
        return self.noise_multiplier * self.clip_norm * math.sqrt(noise_share)

    def count_event(self) -> GaussianEvent:
        """The item-count release (sensitivity 1: each person's count vector has norm 1)."""
        return GaussianEvent(noise_multiplier=self.count_noise_factor * self.noise_multiplier, count=1, sensitivity=1.0)

    def round_event(self) -> DPSGDEvent:
        """The mechanism event one round releases (charged to the ledger before training)."""
        return DPSGDEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps_per_round,
        )

    def run_events(self) -> list[Event]:
        return [self.count_event()] + [self.round_event()] * self.rounds


def plan_dp(cfg: RunConfig) -> DPSchedule | None:
    """Calibrate σ so that the whole run (count release + rounds × local steps) spends
    ``privacy.epsilon``. Returns None when DP is off (ε = inf).

    Privacy contract: a function of the public run config only — σ, the sample rate and the
    events charged never depend on the institution's data or its number of persons.

    Memoised per process (:func:`_calibrated_schedule`) on exactly the public fields it reads:
    the calibration costs ~1 s of accountant work, and a simulation's 1,000 institutions in one
    process share one run config. A changed field is a new key, never a stale σ."""
    if not cfg.dp_enabled:
        return None
    t, p = cfg.train, cfg.privacy
    if p.noise_mode == "distributed" and t.local_steps != 1:
        raise ConfigError(
            "privacy.noise-mode=distributed needs local-steps=1: a second local step would "
            "build on an update that carries only σ²/n_min of the noise"
        )
    try:  # before any charge: float32 DP-SGD is exact only inside these ranges (common/privacy/release.py)
        check_clip_norm(float(p.clip_norm))
        check_sample_rate(float(t.sample_rate))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return _calibrated_schedule(
        epsilon=float(p.epsilon), delta=float(p.delta), accountant=str(p.accountant),
        sample_rate=float(t.sample_rate), rounds=int(t.rounds), local_steps=int(t.local_steps),
        count_budget_share=float(p.count_budget_share), clip_norm=float(p.clip_norm),
    )


@lru_cache(maxsize=128)
def _calibrated_schedule(*, epsilon: float, delta: float, accountant: str, sample_rate: float, rounds: int,
                         local_steps: int, count_budget_share: float, clip_norm: float) -> DPSchedule:
    """The DP plan as a pure function of the public fields it depends on (see :func:`plan_dp`).

    The result is a frozen dataclass, so a cached plan cannot be altered by a caller."""
    q = sample_rate  # public: never a function of the institution's person count
    # the count release's noise as a multiple of the round σ, from its budget share s: with
    # 1/σ_c² = s/σ_eff² and R·L/σ² = (1 − s)/σ_eff², k = σ_c/σ = √((1 − s) / (s·R·L))
    k = math.sqrt((1.0 - count_budget_share) / (count_budget_share * rounds * local_steps))
    if q == 1.0:
        # all releases are full-batch Gaussians, whose composition is exactly one Gaussian with
        # 1/σ_eff² = Σ 1/σ_i² = (rounds·steps + 1/k²)/σ²: calibrate σ_eff, scale back
        sigma_eff = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1, accountant=accountant,
        )
        sigma = sigma_eff * math.sqrt(rounds * local_steps + 1.0 / k**2)
    else:
        def events(s: float) -> list[Event]:
            return [GaussianEvent(noise_multiplier=k * s)] + [DPSGDEvent(noise_multiplier=s, sample_rate=q, steps=local_steps)] * rounds

        sigma = calibrate_for_events(events, target_epsilon=epsilon, delta=delta, accountant=accountant)
    return DPSchedule(
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=local_steps,
        rounds=rounds,
        clip_norm=clip_norm,
        count_noise_factor=k,
    )


class MFTrainer:
    """An institution's MF state: its ratings, its private user side, its noise generator."""

    def __init__(self, ratings: PersonRatings, n_items: int, cfg: RunConfig, *,
                 bounds: tuple[float, float] = RATING_BOUNDS, global_bias: float | None = None,
                 seed: int | None = None):
        """``bounds``: the institution's declared (public) rating scale — MovieLens' by default;
        a data-contract institution passes its study's engagement bounds.

        Privacy contract: the MF global offset enters every person's residual, so it must not
        depend on any person's data (an institution mean would let one person move every other
        person's clipped gradient, pushing their influence on the release past the clip C). It
        is the midpoint of the public ``bounds`` (:func:`~fedrec.common.models.mf.public_offset`),
        or ``global_bias`` — a public constant a caller fixes (tests), never a statistic of the
        ratings. The private user side absorbs the rest, at no privacy cost.
        """
        self.ratings = ratings
        self.cfg = cfg
        offset = public_offset(bounds) if global_bias is None else float(global_bias)
        if not np.isfinite(offset):
            raise ValueError(f"the MF global offset must be a finite public constant, got {global_bias}")
        self.item_side = ItemSide(n_items, cfg.train.mf_dim, global_bias=offset)
        self.user = UserSide.zeros(ratings.n_persons, cfg.train.mf_dim)
        # DP noise must be unpredictable to the server: seed from the OS unless a test or a
        # simulation pins it (client/app.py simulation_seed: simulated nodes only).
        self.noise_generator = torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else seed
        )
        self.sampling_generator = torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else seed + 1
        )

    # ---------------------------------------------------------------- releases
    @property
    def numpy_generator(self) -> np.random.Generator:
        """A numpy generator drawn from the (OS-seeded, or test-pinned) noise generator."""
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=self.noise_generator)))

    def item_counts(self, event: GaussianEvent | None, *, noise_share: float = 1.0) -> np.ndarray:
        """Weighted item counts N_i = Σ_u w_u 1[u rated i], noised with the charged ``event``.

        Privacy contract: each person's count vector has L2 norm exactly 1 (w_u = 1/√n_u),
        so this is the Gaussian mechanism with sensitivity 1 (checked against the event) and
        noise std ``σ_event · √noise_share`` (``common/privacy/release.py``). ``event=None``
        only in a non-private run the institution's policy allowed (simulations).
        """
        counts = weighted_item_counts(self.ratings, self.item_side.n_items).numpy().astype(np.float64)
        if event is None:
            return counts
        if event.sensitivity < 1.0:
            raise ValueError(f"item counts have sensitivity 1; the charged event says {event.sensitivity}")
        return gaussian_release(counts, event=event, noise_share=noise_share, generator=self.numpy_generator)

    def train_round(
        self, global_arrays: dict[str, np.ndarray], precond: np.ndarray, *, event: DPSGDEvent | None,
        noise_share: float = 1.0,
    ) -> dict[str, np.ndarray]:
        """Run this round's local steps from the global item side; return the item-side delta.

        ``event`` is the charged DP-SGD event (its σ, sample rate and steps drive the noise,
        sampling and step count); ``None`` only in a non-private run the institution's policy
        allowed. The delta is on the scale of a sum over persons: the server adds the
        institutions' deltas. Only the item-side delta is returned; the user side stays in
        ``self.user``. Nothing else about the data (not even the clipped fraction) leaves.
        """
        self.item_side.load_numpy(global_arrays)
        start = {k: v.copy() for k, v in global_arrays.items()}
        params = self.item_side.released_parameters()
        n = self.ratings.n_persons
        q = 1.0 if event is None else event.sample_rate
        base = PreconditionedSGD(
            params,
            lr=self.cfg.train.lr / q,
            precond=torch.as_tensor(precond),
            # the prior is data-independent: each of the K institutions carries 1/K of it,
            # so the summed update holds it once
            shrinkage=self.cfg.train.item_reg / self.cfg.data.institutions,
        )
        clip = self.cfg.privacy.clip_norm
        if event is None:
            for _ in range(self.cfg.train.local_steps):
                persons = torch.arange(n)
                fit_user_side(self.item_side, self.ratings, self.user, reg=self.cfg.train.user_reg, persons=persons)
                base.zero_grad()
                losses, _ = person_losses_and_norms(self.item_side, self.user, self.ratings, persons)
                losses.sum().backward()
                base.step()
        else:
            optimizer = dp_sgd_optimizer(
                base, event=event, clip_norm=clip, noise_share=noise_share,
                expected_batch_size=max(1, int(round(q * n))), generator=self.noise_generator,
            )
            loader = DPDataLoader(
                TensorDataset(torch.arange(n)),
                # its mask is float32 torch.rand (multiples of 2^-24) < rate: handed the charged q
                # itself it samples at ceil(q·2^24)/2^24 > q; on the grid below q, at most q
                sample_rate=realizable_rate(event.sample_rate, bits=24),
                generator=self.sampling_generator,
            )
            batches = iter(loader)
            for _ in range(event.steps):
                try:
                    (persons,) = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    (persons,) = next(batches)
                optimizer.zero_grad(set_to_none=False)
                if len(persons):
                    fit_user_side(self.item_side, self.ratings, self.user, reg=self.cfg.train.user_reg, persons=persons)
                    losses, norms = person_losses_and_norms(self.item_side, self.user, self.ratings, persons)
                    finite = torch.isfinite(losses.detach()) & torch.isfinite(norms)
                    if not bool(finite.all()):
                        # a coordinator's NaN/inf reached these people's losses (the handler's
                        # check should have refused it: common/privacy/public_inputs.py): leave
                        # them out of the graph, not just the sum — autograd would multiply their
                        # zero weight by NaN partials on the items they share with others — so the
                        # release's NaN pattern cannot depend on who rated what
                        persons = persons[finite]
                        losses, norms = person_losses_and_norms(self.item_side, self.user, self.ratings, persons)
                    clipped_sum_backward(losses, norms, clip)
                else:  # an empty Poisson batch still releases noise
                    for p in params:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
        delta = {k: v - start[k] for k, v in self.item_side.to_numpy().items()}
        return delta

    def refit(self, global_arrays: dict[str, np.ndarray] | None = None) -> None:
        """Refit the private user side to the (new) item side — free: nothing is released."""
        if global_arrays is not None:
            self.item_side.load_numpy(global_arrays)
        fit_user_side(self.item_side, self.ratings, self.user, reg=self.cfg.train.user_reg)


def evaluation_sums(trainer: MFTrainer, test_person: np.ndarray, test_item: np.ndarray, test_rating: np.ndarray,
                    negatives: np.ndarray, *, bounds: tuple[float, float], k: int) -> dict[str, float]:
    """Held-out RMSE/MAE and ranking sums for this institution (a release: simulations only)."""
    from fedrec.common.metrics import ranking_sums, rating_sums
    from fedrec.common.models.mf import predict, score_items

    person = torch.as_tensor(test_person)
    item = torch.as_tensor(test_item)
    pred = predict(trainer.item_side, trainer.user, person, item, bounds).numpy()
    sums = rating_sums(pred, test_rating)
    pos = score_items(trainer.item_side, trainer.user, person, item.unsqueeze(1)).numpy()[:, 0]
    neg = score_items(trainer.item_side, trainer.user, person, torch.as_tensor(negatives[test_person])).numpy()
    sums.update(ranking_sums(pos, neg, k))
    return sums
