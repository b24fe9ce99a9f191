"""Data-driven choices the server makes from earlier (DP) releases: the ψ clip from the
``scale`` histogram, the noise-limited clip, the ψ² weight, the outcome interval from the
``outcome-range`` histogram, the automatic Gram weight.

These are heuristics, not bounds: whatever they choose, the client clips to the chosen value
and the release's sensitivity comes from :mod:`fedrec.common.causal.sensitivity`. A bad choice
costs accuracy or coverage, never privacy. Post-processing only: no budget.
"""

from __future__ import annotations

import math

import numpy as np

from fedrec.common.causal.scaling import TRIM
from fedrec.common.causal.sensitivity import INFLUENCE_WEIGHTS, influence_bound, outcome_bound, psi_worst_case

__all__ = [
    "DISTRIBUTED_CLIP_MARGIN", "LOCAL_CLIP_TAIL", "LOCAL_CLIP_MARGIN", "PSI_SQUARE_GRID", "psi_grid",
    "clip_from_histogram", "noise_limited_clip", "histogram_sum_squares", "psi_square_weight",
    "outcome_grid", "outcome_range_from_histogram", "auto_gram_weight",
]


#: the psi clip's histogram rule by noise mode (:attr:`CausalConfig.clip_tail` / ``clip_margin``):
#: distributed noise, the edge above which 1% (``psi_tail``) of the people lie, times 2; local
#: noise (8x the count noise variance, and the 1% edge jumped 9-fold from seed to seed at ε = 1),
#: the 5% edge times 5 (docs/causal.md, "The protocol"; the measurements are in git history)
DISTRIBUTED_CLIP_MARGIN = 2.0
LOCAL_CLIP_TAIL = 0.05
LOCAL_CLIP_MARGIN = 5.0
#: candidate psi^2 weights of :func:`psi_square_weight` (ascending)
PSI_SQUARE_GRID = np.geomspace(0.02, 2.0, 101)


def psi_grid(estimator: str, trim: tuple[float, float] = TRIM, factor: float = 2.0, decades: float = 3.0) -> np.ndarray:
    """Public geometric grid of |psi| values (scaled units) for the clip-choosing histogram:
    from the worst case down by ``decades`` powers of ten, ratio ``factor``."""
    top = psi_worst_case(estimator, trim)
    n = int(math.ceil(decades * math.log(10) / math.log(factor)))
    return top / factor ** np.arange(n, -1, -1)


def clip_from_histogram(counts: np.ndarray, edges: np.ndarray, *, tail: float) -> float:
    """Smallest grid edge above which at most ``tail`` of the people lie, from (noisy) counts
    of |psi| per bin (bin b = [edges[b-1], edges[b]), bin 0 below edges[0], last bin at the top)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = max(float(counts.sum()), 1.0)
    above = np.cumsum(counts[::-1])[::-1]  # above[b] = people in bins >= b
    # people with |psi| >= edges[b] are in bins >= b + 1
    for b, edge in enumerate(edges):
        rest = above[b + 1] if b + 1 < len(above) else 0.0
        if rest <= tail * n:
            return float(edge)
    return float(edges[-1])


def noise_limited_clip(sum_sq: float, *, noise_sd_per_clip: float, ratio: float) -> float:
    """The largest psi clip whose influence-sum noise stays at most ``ratio`` x the sampling
    SD of the psi sum.

    ``noise_sd_per_clip``: public SD of the released psi sum's noise per unit of clip (the
    noise is linear in the clip; it depends on the release's weights, :func:`influence_bound`).
    ``sum_sq``: an estimate of ``sum psi^2`` from the (noisy) |psi| histogram of the ``scale``
    step, :func:`histogram_sum_squares` below the tail-rule edge (:func:`clip_from_histogram`):
    the bins above hold at most the tail's people, and their counts are mostly DP noise on
    empty bins, which at |psi| ~ 20 would swamp the sum (measured: the clip rose 3x at ε = 1).
    Leaving them out can only lower the estimate, so the clip errs low. Post-processing of the
    released counts; 0 when there is no noise.

    Why: the clip from the histogram's tail (:func:`clip_from_histogram`) is the same at
    every ε, but its clipping bias is a fixed amount while the SE shrinks as ε grows, so at
    large ε the bias showed in SE units (education, -0.14 to -0.17 SE against an AIPW with the
    true propensity at ε >= 2, docs/causal.md). Where the budget is large a larger clip costs
    little: at ``ratio`` 0.5 the noise adds at most sqrt(1 + 0.25) - 1 = 12% to the SE.
    """
    if not noise_sd_per_clip > 0 or not ratio > 0:
        return 0.0
    return ratio * math.sqrt(max(sum_sq, 0.0)) / noise_sd_per_clip


def histogram_sum_squares(counts: np.ndarray, edges: np.ndarray, *, upto: float) -> float:
    """``sum psi^2`` estimated from the (noisy) |psi| histogram of the ``scale`` step: the bins
    whose upper edge is at most ``upto``, each at its geometric middle (bin 0, below
    ``edges[0]``, at ``edges[0] / sqrt(ratio of the grid)``), negative noisy counts as 0
    (:func:`noise_limited_clip` says why the bins above are left out). Post-processing."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    edges = np.asarray(edges, dtype=np.float64)
    step = float(edges[1] / edges[0]) if len(edges) > 1 else 2.0
    mids = np.concatenate([[edges[0] / math.sqrt(step)], np.sqrt(edges[:-1] * edges[1:])])
    keep = int(np.searchsorted(edges, upto * (1 + 1e-9), side="right"))  # bins whose upper edge <= upto
    return max(float(counts[:keep] @ mids[:keep] ** 2), 0.0)


def psi_square_weight(sum_sq: float, unit_noise_var: float, clip: float, *, count_weight: float,
                      target: float, grid: np.ndarray | None = None) -> float:
    """The smallest relative weight ``k`` of the ``psi^2`` coordinate (:func:`influence_weights`)
    whose noise keeps the SE honest: the released ``sum psi^2`` (from which the sampling
    variance is estimated) gets noise SD at most ``target`` x the variance of the psi sum
    (sampling ``sum_sq`` plus the DP noise on it).

    ``unit_noise_var``: noise variance of the item's psi sum (psi units) if its release row
    were ``[0, psi, 0]`` (bound ``clip``); with weights ``(a, k)`` it scales with
    :func:`influence_bound` squared (``unit_noise_var (1 + a^2 + k^2)``), and the square's noise,
    after dividing ``w_2 = k / clip^2`` out, ``clip^2 / k^2`` times the psi sum's.
    ``sum_sq``: an estimate of ``sum psi^2`` (:func:`histogram_sum_squares`). Public
    post-processing of released values; chooses a weight, releases nothing.

    Why: a fixed ``k`` either starves the square where the clip is large relative to psi's
    spread (large ε, where :func:`noise_limited_clip` raises the clip: the SE's sampling part
    then carries the noise and coverage fell to 0.88 with ``k`` 0.2, docs/causal.md) or spends
    budget on it where the psi noise dominates the SE anyway (small ε), which widens the CI.
    Returns the grid's largest ``k`` when none meets the target.
    """
    grid = PSI_SQUARE_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if not unit_noise_var > 0 or not target > 0:
        return INFLUENCE_WEIGHTS[1]
    for k in grid:
        nv = unit_noise_var * influence_bound((count_weight, float(k))) ** 2
        if math.sqrt(nv) * clip / k <= target * (max(sum_sq, 0.0) + nv):
            return float(k)
    return float(grid[-1])


def outcome_grid(factor: float = 2.0 ** 0.5, decades: float = 3.0) -> np.ndarray:
    """Public signed grid of scaled outcome values (|y| <= 1) for the ``outcome-range``
    histogram: ``±1, ±1/factor, ...`` down to ``10^-decades``, ascending. Bin b is
    ``[edges[b-1], edges[b])`` (bin 0 below ``-1``: empty; the last bin ``y >= 1``); the bin
    around zero spans ``±10^-decades``."""
    n = int(math.ceil(decades * math.log(10) / math.log(factor)))
    pos = 1.0 / factor ** np.arange(n, -1, -1)  # ascending, ending at 1
    return np.concatenate([-pos[::-1], pos])


def outcome_range_from_histogram(counts: np.ndarray, edges: np.ndarray, *, tail: float, margin: float,
                                 noise_sd: float = 0.0, z: float = 2.0) -> tuple[float, float]:
    """``(centre, half)`` of the scaled-outcome interval the outcome models are fitted on, from
    the (noisy) signed histogram of the ``outcome-range`` step: walking in from each end, the
    last edge before the people passed exceed ``tail`` of all, widened ``margin`` times about
    the middle and cut to [-1, 1] (y never leaves it). Public post-processing of released counts.

    ``noise_sd``: the public noise SD of one released count. The walk from each end crosses
    many empty bins whose noise adds up (SD ``noise_sd sqrt(k)`` after k bins), which alone
    would stop it early and leave the declared bounds (measured: health, 9,000 people, ε = 1:
    the whole lower half-range). So it walks on while the count passed is at most ``tail n +
    z noise_sd sqrt(k)`` (z = 2: the noise of what it passed rarely reaches that), and so clips
    at most about that many more people than ``tail`` — a cost in the outcome models'
    efficiency, not in the ATE's validity (AIPW stays unbiased with any outcome model when the propensity is right).
    A degenerate range (both walks in one bin) keeps that bin's width."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    n = max(float(counts.sum()), 1.0)

    def walk(c: np.ndarray) -> int:
        """How many bins from the outer end may be passed (counts in walking order)."""
        passed = np.cumsum(c)
        allowed = tail * n + z * noise_sd * np.sqrt(np.arange(1, len(c) + 1))
        over = np.flatnonzero(passed > allowed)
        return int(over[0]) if over.size else len(c)

    # bin b = [edges[b-1], edges[b]); passing bins 0..k-1 from below puts lo at edges[k-1]
    k_lo = walk(counts)
    k_hi = walk(counts[::-1])
    lo = float(edges[min(max(k_lo - 1, 0), len(edges) - 1)])
    hi = float(edges[max(len(edges) - k_hi, 0) if k_hi > 0 else len(edges) - 1])
    if hi <= lo:  # everyone in one bin (or the walks crossed): that bin's edges
        j = int(np.clip(np.searchsorted(edges, (lo + hi) / 2, side="right"), 1, len(edges) - 1))
        lo, hi = float(edges[j - 1]), float(edges[j])
    centre, half = (lo + hi) / 2.0, margin * (hi - lo) / 2.0
    lo, hi = max(centre - half, -1.0), min(centre + half, 1.0)
    return (lo + hi) / 2.0, (hi - lo) / 2.0


def auto_gram_weight(*, arm_scale: float, noise_multiplier: float, r2: float, p: int, n_items: int,
                     contributors: int, noise_mode: str, n_min: int, floor_k: float,
                     lowest: float = 0.3, max_ratio: float = 1.0) -> float:
    """The outcome release's Gram weight: the smallest ``g`` in ``[lowest, 1]`` whose Gram noise
    keeps the eigenvalue floor (``floor_k`` x the noise's spectral norm) at most ``max_ratio`` x
    ``arm_scale``; 1 if none does, or without DP.

    Why: in ``[g vech(G), X'y, y'y]`` a smaller g lowers the sensitivity and so the noise on X'y,
    which carries most of the coefficients' noise when they are small (their variance goes as
    ``v_xy + v_G |c|^2``, :func:`ridge_noise_cov`), but raises the Gram's noise ``v_G = v_xy /
    g^2``; once the floor that noise forces is a sizeable part of the Gram, the ridge shrinks
    the outcome models by more than the SE accounts for (measured: coverage 0.80 at ε = 0.5
    local with g = 0.3). ``arm_scale`` is public: the fitted propensity Hessian's intercept
    entry ``sum omega^2 e(1-e)``, at most the smaller arm's (weighted) size. Post-processing of
    earlier releases only, so the choice costs no budget; the weight travels with the step and
    sets the sensitivity the client charges (:func:`release_sensitivity`).
    """
    from fedrec.common.privacy.gaussian import summed_noise_var

    if noise_multiplier <= 0:
        return 1.0
    for g in np.geomspace(lowest, 1.0, 41):
        gram_nv = summed_noise_var(sensitivity=outcome_bound(r2, g) * math.sqrt(n_items),
                                   noise_multiplier=noise_multiplier, noise_mode=noise_mode, n_min=n_min,
                                   contributors=contributors) / g**2
        if floor_k * math.sqrt(gram_nv * p) <= max_ratio * arm_scale:
            return float(g)
    return 1.0
