"""``fedrec-server audit RUN_DIR``: the privacy audit report of a run folder.

Writes ``audit.md``, ``audit.json`` and ``audit.png`` into ``RUN_DIR``. Four parts:

The audit reads **only the run folder**: ``config.json``, ``metrics.json`` and the ledgers at
``RUN_DIR/ledgers/<institution>.db`` (never a path named in config.json, so a copied folder
audits its own copies). The run is the one ``config.json`` records as ``"run-id"`` (the id every
client charged its ledger rows under); nothing is guessed, so a run that passed still passes
after a later run appended to the same ledgers.

a. **Accounting re-check.** Each ledger's hash chain must verify (every problem is a failure
   naming the institution and the row: deleted, edited, foreign, broken genesis), and where
   ``metrics.json`` records a ``ledger_head`` the ledger must still extend it (else it was
   swapped or rolled back). The ledger must hold at least as many rows of this run as
   ``metrics.json["releases"][institution]["count"]`` says the server accepted from it (fewer
   = a release that was never charged: a failure naming the institution). Every
   institution's ε is re-derived from the mechanism events in its ledger (PRV primary, RDP
   cross-check) and compared with what the run claimed in ``metrics.json`` (the last round's
   ``epsilon`` per institution). A claim below the re-derived value (an under-count) is a
   failure; so is a ledger above its cap. The ε of the run's own events is compared with the
   run's target ``privacy.epsilon``. Non-private rows are ε = ∞ in the report (never 0): a run
   holding any is reported as non-private; that is a failure unless config.json declares the
   run non-private (``privacy.epsilon = inf``, a simulation with ``--non-private``).

b. **Empirical audit in one run** (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
   Training Run", NeurIPS 2023). m canaries, each included independently with probability ½;
   one run of the mechanism; a score per canary; the auditor guesses "in" for the k₊
   highest scores and "out" for the k₋ lowest and abstains otherwise; the number of correct
   guesses becomes a lower bound on ε at 95 % confidence through the paper's bound
   (Theorem 5.2, computed as in its Appendix D: the Binomial(r, e^ε/(1+e^ε)) tail plus the
   2mδ·α term). k₊ and k₋ are chosen on an independent **pilot** run (m/4 canaries, its own
   randomness), so the audited run's bound needs no multiple-testing correction.
   The audit is planned before anything runs (:func:`plan_audit`): a mechanism claiming ε(δ)
   claims every point of its privacy profile, so it may be tested at δ_audit ≤ δ against
   ε(δ_audit); the 2mδ term caps any one-run audit near log(1/δ), and a smaller δ_audit lifts
   that cap faster than the claim grows. The plan takes the fewest canaries m (and the δ_audit)
   with which a fully revealing mechanism would be caught; ``claimed_epsilon`` in the report
   is the claim at that ``delta``, ``claimed_epsilon_at_run_delta`` the one at the run's δ.
   Release kinds:

   * ``mf_dpsgd`` — white-box gradient canaries in DP-SGD with the run's σ, sample rate q,
     clipping bound C and number of steps (read from the ledger's events and config.json).
     Canary u is a person whose gradient is 100·C along its own coordinate e_u (so clipping
     binds); the mechanism is the one the handlers run: Opacus' Poisson sampler
     (``UniformWithReplacementSampler``, the sampler inside ``DPDataLoader``), exact
     per-person clipping (``common/privacy/person_clipping.py``) and the optimizer
     ``common/privacy/release.py::dp_sgd_optimizer`` builds from the charged
     :class:`DPSGDEvent` (the function ``client/train.py`` calls). In ``distributed`` noise
     mode n_min clients each add the share 1/n_min of the variance and the canaries' client is
     one of them. The score is the canary's coordinate of the summed noisy update (θ₀ − θ_T).
   * ``gaussian_release`` — a Gaussian statistics release (MF item counts, causal sums) through
     ``common/privacy/release.py::gaussian_release`` driven by the charged
     :class:`GaussianEvent` (the function ``client/train.py`` and ``client/statistics.py``
     call), after ``common/privacy/gaussian.py::clip_rows``: canary u contributes 100·Δ on its
     own coordinate, clipped to Δ. The run's Gaussian events are replayed (score: the
     1/σ²-weighted sum of the releases); a run that recorded none is audited on a reference
     release calibrated to the run's ε target, and the report says so.

   Because the audit drives the release functions themselves, a change that adds less noise
   than the event charged (e.g. σ/10) is caught here as well as in the unit tests.

   The audit re-runs each mechanism on canaries with the run's parameters — it cannot plant
   canaries in a run that already happened — so it checks the mechanism and its accounting,
   not the particular model. The empirical bound must lie below the claimed ε; one-run audits
   are loose (a bound near log(number of guesses) is their ceiling), so a low bound is
   expected and is not a measure of the true ε.

c. **Power check.** The same audit (same m, δ_audit, pilot procedure) against deliberately
   broken versions of the mechanism with the largest claim — noise multiplier 0, and clipping
   off (the canary's 100·C gradient passes unclipped) — must report a violation (empirical
   lower bound above the claimed ε). When the canary cap makes that impossible the report says
   so (``power_sufficient: false``); ``--quick`` caps m at 400k and the work at ~4e7 noise draws.

d. **Protocol settings** from config.json: SecAgg+, noise mode and n_min, TLS and node
   authentication (n/a in a simulation), which metrics were released and whether they were DP.

Exit code: 0 when the audit finds nothing wrong, 1 when it does (a broken hash chain, fewer
ledger rows than accepted releases, under-counted ε, a cap exceeded, undeclared non-private
releases, a correct mechanism flagged, or a broken mechanism not flagged), 2 for unusable input
(:class:`~fedrec.common.errors.FedrecInputError`: no run id recorded, an unreadable ledger).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fedrec.common.jsonio import write_json
from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.accountant import (
    DPSGDEvent,
    GaussianEvent,
    NonPrivateEvent,
    epsilon_for,
    gaussian_epsilon,
)
from fedrec.common.privacy.gaussian import clip_rows
from fedrec.common.privacy.ledger import LedgerRow, PrivacyLedger
from fedrec.common.privacy.release import dp_sgd_optimizer, gaussian_release

__all__ = [
    "p_value_dp_audit",
    "epsilon_lower_bound",
    "AuditResult",
    "AuditPlan",
    "count_correct",
    "choose_guesses",
    "audit_from_scores",
    "audit_mechanism",
    "audit_ceiling",
    "plan_audit",
    "dpsgd_canary_scores",
    "gaussian_canary_scores",
    "run_audit",
]

CONFIDENCE = 0.95
#: the noise multiplier handed to a release function for "no noise" in the power check
#: (events need σ > 0; 1e-12 of the clip is no noise at all next to a canary's C)
_NO_NOISE = 1e-12
#: how much larger than C (or Δ) a canary's raw gradient / contribution is
CANARY_SCALE = 100.0


# ============================================================== the bound (the paper's math)
def p_value_dp_audit(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under the null "the mechanism is (ε, δ)-DP".

    Steinke, Nasr & Jagielski 2023, Theorem 5.2 as computed in their Appendix D:
    ``β + α·2mδ`` with β = P[Binomial(r, q) ≥ v], q = e^ε/(1+e^ε) (the accuracy of ε-DP
    randomized response) and α = max_{1≤i≤v} P[v−i ≤ Binomial(r, q) < v] / i.
    (Binomial mass more than 40 standard deviations below the mean, < 1e-300, is skipped.)
    """
    from scipy.stats import binom

    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not (0 <= delta <= 1):
        raise ValueError("need ε >= 0 and δ in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    # S_i = P[v-i <= Bin < v] = sum_{j=v-i}^{v-1} pmf(j); alpha = max_i S_i / i
    low = max(0, int(math.floor(r * q - 40 * math.sqrt(r * q * (1 - q)) - 2)))
    if low >= v:
        low = 0 if v <= 64 else v - 64
    js = np.arange(v - 1, low - 1, -1)  # v-1, v-2, ..., low  (i = 1, 2, ...)
    sums = np.cumsum(binom.pmf(js, r, q))
    alpha = float(np.max(sums / np.arange(1, len(js) + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """Largest ε such that "(ε, δ)-DP" is rejected at ``confidence`` by v correct of r guesses.

    Bisection as in the paper's Appendix D (``get_eps_audit``); 0 when nothing is rejected.
    """
    p = 1.0 - confidence
    if not (0 < p < 1):
        raise ValueError("confidence must lie in (0, 1)")
    if r == 0 or p_value_dp_audit(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp_audit(m=m, r=r, v=v, epsilon=hi, delta=delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_value_dp_audit(m=m, r=r, v=v, epsilon=mid, delta=delta) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    return lo


@dataclass
class AuditResult:
    empirical_epsilon_lower_bound: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    k_pos: int
    k_neg: int
    delta: float
    pilot_canaries: int = 0


def _ranked_membership(scores: np.ndarray, included: np.ndarray, seed: int) -> np.ndarray:
    """``included`` ordered by descending score, ties broken at random (a mechanism that says
    nothing about some canaries must not earn correct guesses from their order)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(scores))
    order = perm[np.argsort(-np.asarray(scores, dtype=np.float64)[perm], kind="stable")]
    return np.asarray(included, dtype=bool)[order]


def count_correct(scores: np.ndarray, included: np.ndarray, *, k_pos: int, k_neg: int, seed: int = 0) -> int:
    """Correct guesses when guessing "in" for the k₊ top scores and "out" for the k₋ bottom."""
    ranked = _ranked_membership(scores, included, seed)
    if k_pos + k_neg > len(ranked):
        raise ValueError("k_pos + k_neg exceeds the number of canaries")
    return int(ranked[:k_pos].sum() + (~ranked[len(ranked) - k_neg:]).sum() if k_neg else ranked[:k_pos].sum())


def choose_guesses(
    pilot_scores: np.ndarray,
    pilot_included: np.ndarray,
    *,
    m: int,
    delta: float,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """(k₊/m, k₋/m) that maximise the bound on an independent **pilot** run of the mechanism.

    Choosing the guess counts on a pilot, not on the audited run, keeps the audited run's
    bound valid without a multiple-testing correction.
    """
    ranked = _ranked_membership(pilot_scores, pilot_included, seed)
    mp = len(ranked)
    top = np.concatenate([[0], np.cumsum(ranked)])
    bottom = np.concatenate([[0], np.cumsum(~ranked[::-1])])
    # k up to m/2 less three standard deviations of the number of canaries in (√m/2 around
    # m/2), capped at 96 %: a guess count at the pilot's edge is fragile on the audited run (at
    # m = 1,000 a fully revealing mechanism with 461 canaries in got 461 of 480 guesses right
    # and passed as private)
    cap = min(0.96, 1.0 - 3.0 / math.sqrt(m))
    ks = [int(f * mp / 2) for f in sorted({cap, *(f for f in (0.96, 0.92, 0.85) if f <= cap)}, reverse=True)]
    while ks[-1] >= 4:
        ks.append(int(ks[-1] / 1.4))
    best, best_fr = -1.0, (0.5, 0.0)
    for k in ks:
        for kp, kn in ((k, 0), (k - k // 2, k // 2)):
            r_p, v_p = kp + kn, int(top[kp] + bottom[kn])
            r = max(1, int(round(r_p * m / mp)))
            v = min(r, int(math.floor(v_p / r_p * r)))
            lb = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=confidence)
            if lb > best:
                best, best_fr = lb, (kp / mp, kn / mp)
    return best_fr


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    k_pos: int,
    k_neg: int,
    delta: float,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> AuditResult:
    """The paper's audit for fixed guess counts: v correct of r = k₊ + k₋ -> ε lower bound."""
    m = len(scores)
    v = count_correct(scores, included, k_pos=k_pos, k_neg=k_neg, seed=seed)
    r = k_pos + k_neg
    lb = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=confidence)
    return AuditResult(lb, confidence, m, r, v, k_pos, k_neg, delta)


def audit_mechanism(
    sample: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    *,
    m: int,
    delta: float,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[AuditResult, np.ndarray, np.ndarray]:
    """Pilot run (m/4 canaries, own seed) to choose k₊, k₋; then the audited run of m canaries.

    ``sample(m, seed)`` runs the mechanism once on m fresh canaries, returning
    ``(scores, included)``.
    """
    m_pilot = max(400, m // 4)
    ps, pi = sample(m_pilot, _seeded(seed, "pilot"))
    fp, fn = choose_guesses(ps, pi, m=m, delta=delta, confidence=confidence, seed=seed)
    scores, included = sample(m, _seeded(seed, "audit"))
    k_pos, k_neg = int(round(fp * m)), int(round(fn * m))
    res = audit_from_scores(scores, included, k_pos=k_pos, k_neg=k_neg, delta=delta, confidence=confidence, seed=seed)
    res.pilot_canaries = m_pilot
    return res, scores, included


def audit_ceiling(*, m: int, delta: float, detect_fraction: float, confidence: float = CONFIDENCE) -> float:
    """The bound a mechanism that reveals every canary it touches would get with m canaries:
    all of r = 0.9 · detect_fraction · m/2 "in" guesses correct. No audit of m canaries at
    this δ can certify more (one-run audits top out near log r)."""
    r = max(1, int(0.9 * detect_fraction * m / 2))
    return epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=confidence)


@dataclass
class AuditPlan:
    canaries: int
    audit_delta: float
    claimed_epsilon: float  # the mechanism's ε at audit_delta
    ceiling: float  # audit_ceiling(canaries, audit_delta)
    sufficient: bool  # ceiling clears the claim: a broken mechanism can be caught


def plan_audit(
    claimed_at: Callable[[float], float],
    *,
    delta: float,
    detect_fraction: float,
    max_canaries: int,
    min_canaries: int = 1000,
    confidence: float = CONFIDENCE,
) -> AuditPlan:
    """Choose (m, δ_audit) before any run, from the claim alone.

    A mechanism claiming ε(δ) for every δ on its privacy profile may be audited at any
    δ_audit ≤ δ against ε(δ_audit). A one-run audit's ceiling grows with m but the 2mδ term
    caps it near log(1/δ); a smaller δ_audit lifts that cap while the claim grows more
    slowly. Returns the smallest m (×1.5 grid) for which some δ_audit ∈ {δ, δ/10, …, δ/10⁵}
    lets a fully revealing mechanism beat the claim by a margin (2 % + 0.1), or the best
    pair at ``max_canaries`` with ``sufficient=False``.
    """
    best: AuditPlan | None = None
    for j in range(6):  # δ_audit = δ, δ/10, ...: claims are computed lazily (PRV is not free)
        d = delta / 10**j
        claim = claimed_at(d)
        m = min(min_canaries, max_canaries)
        while True:
            ceil = audit_ceiling(m=m, delta=d, detect_fraction=detect_fraction, confidence=confidence)
            plan = AuditPlan(m, d, claim, ceil, ceil > 1.02 * claim + 0.1)
            if plan.sufficient:
                return plan
            if m >= max_canaries:
                break
            m = min(max_canaries, int(m * 1.5))
        if best is not None and plan.ceiling - plan.claimed_epsilon <= best.ceiling - best.claimed_epsilon:
            return best  # a smaller δ_audit no longer helps
        best = plan
    assert best is not None
    return best


# ======================================================================== the mechanisms
def _seeded(seed: int, *tags: object) -> int:
    h = hashlib.sha256(repr((seed,) + tags).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def dpsgd_canary_scores(
    *,
    m: int,
    schedule: Sequence[tuple[float, float, int]],
    clip_norm: float,
    n_clients: int = 1,
    clipping: bool = True,
    noise_scale: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One DP-SGD run on ``m`` gradient canaries; returns (scores, included).

    ``schedule``: ``[(σ, q, steps), ...]`` in order — σ of the released aggregate, i.e. of the
    charged :class:`DPSGDEvent`. The noise is added by the optimizer
    :func:`~fedrec.common.privacy.release.dp_sgd_optimizer` builds from that event (the handler's
    own function), with ``noise_share`` 1/n_clients: with ``n_clients`` > 1 (distributed noise)
    each client adds σ²/n_clients. ``noise_scale`` and ``clipping=False`` build the broken
    mechanisms of the power check: the optimizer is then handed an event with σ·noise_scale
    (≈ 0 for 0) — a handler noising less than it charged. The score is the canary's coordinate
    of the summed noisy update divided by C: a canary in adds C·(times sampled), noise σ·√steps.
    """
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from fedrec.common.privacy.person_clipping import clipped_sum_backward

    rng = np.random.default_rng(_seeded(seed, "membership"))
    included = rng.random(m) < 0.5
    members = torch.as_tensor(np.flatnonzero(included))
    n_members = max(1, len(members))
    g = CANARY_SCALE * clip_norm
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared machines: keep the audit to one core
    try:
        thetas = [torch.zeros(m, dtype=torch.float64, requires_grad=True) for _ in range(n_clients)]
        score = torch.zeros(m, dtype=torch.float64)
        for seg, (sigma, q, steps) in enumerate(schedule):
            charged = DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=int(steps))
            # what the optimizer is handed: the charged event (or, broken, a scaled one)
            used = charged if noise_scale == 1.0 else DPSGDEvent(
                noise_multiplier=max(noise_scale * sigma, _NO_NOISE), sample_rate=q, steps=int(steps))
            batch_size = max(1, int(round(q * n_members)))
            start = sum(t.detach().clone() for t in thetas)
            opts = []
            for j, theta in enumerate(thetas):
                opts.append(
                    dp_sgd_optimizer(
                        torch.optim.SGD([theta], lr=1.0),
                        event=used,
                        clip_norm=clip_norm,
                        noise_share=1.0 / n_clients,
                        expected_batch_size=batch_size,
                        generator=torch.Generator().manual_seed(_seeded(seed, "noise", seg, j)),
                    )
                )
            sampler = UniformWithReplacementSampler(
                num_samples=n_members,
                sample_rate=q,
                generator=torch.Generator().manual_seed(_seeded(seed, "sampling", seg)),
                steps=int(steps),
            )
            for batch in sampler:
                for j, (theta, opt) in enumerate(zip(thetas, opts)):
                    opt.zero_grad(set_to_none=False)
                    if j == 0 and batch:
                        persons = members[torch.as_tensor(batch, dtype=torch.long)]
                        losses = g * theta[persons]  # person u's gradient: g · e_u
                        norms = torch.full((len(persons),), g, dtype=theta.dtype)
                        if clipping:
                            clipped_sum_backward(losses, norms, clip_norm)
                        else:  # broken: the raw gradient passes
                            losses.sum().backward()
                    else:  # no canary here (or an empty Poisson batch): noise only
                        theta.grad = torch.zeros_like(theta)
                    opt.step()
            with torch.no_grad():  # the segment's summed released update, in units of C
                score += (start - sum(t.detach() for t in thetas)) / clip_norm
        return score.numpy(), included
    finally:
        torch.set_num_threads(torch_threads)


def gaussian_canary_scores(
    *,
    m: int,
    releases: Sequence[tuple[float, int]],
    sensitivity: float,
    n_clients: int = 1,
    clipping: bool = True,
    noise_scale: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian statistics releases of a clipped per-person sum with ``m`` canaries.

    ``releases``: ``[(σ, count), ...]``, the charged :class:`GaussianEvent` s. Each of the
    ``count`` releases goes through :func:`~fedrec.common.privacy.release.gaussian_release`
    (the handlers' function) with a one-release event of that σ and ``sensitivity``, at
    ``noise_share`` 1/n_clients per client; ``noise_scale``/``clipping=False`` are the broken
    mechanisms of the power check (the function is handed a scaled event). The score is
    Σ release / σ² (likelihood-ratio order).
    """
    rng = np.random.default_rng(_seeded(seed, "membership"))
    included = rng.random(m) < 0.5
    raw = np.full((int(included.sum()), 1), CANARY_SCALE * sensitivity)
    rows = clip_rows(raw, sensitivity) if clipping else raw  # each canary's row is 1-sparse
    value = np.zeros(m)
    value[included] = rows[:, 0]
    score = np.zeros(m)
    for k, (sigma, count) in enumerate(releases):
        used = GaussianEvent(noise_multiplier=max(noise_scale * sigma, _NO_NOISE), count=1, sensitivity=sensitivity)
        for c in range(int(count)):
            total = np.zeros(m)
            for j in range(n_clients):
                gen = np.random.default_rng(_seeded(seed, "noise", k, c, j))
                contrib = value if j == 0 else np.zeros(m)
                total += gaussian_release(contrib, event=used, noise_share=1.0 / n_clients, generator=gen)
            score += total / max(sigma, 1e-12) ** 2
    return score, included


# ======================================================================== the run folder
@dataclass
class _Inst:
    name: str
    ledger: PrivacyLedger
    rows: list[LedgerRow]
    run_id: str
    run_rows: list[LedgerRow] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FedrecInputError(f"{path}: missing; is this a run folder written by `fedrec-sim run`?") from None
    except json.JSONDecodeError as err:
        raise FedrecInputError(f"{path}: not valid JSON ({err})") from None


def _num(x: Any) -> float:
    if isinstance(x, str):
        return float(x)  # "inf"
    return float(x)


def _recorded_run_id(cfg: dict, run_dir: Path) -> str:
    """The run id the run recorded about itself (config.json ``run-id``); never guessed."""
    rid = cfg.get("run-id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise FedrecInputError(
            f"{run_dir / 'config.json'}: no \"run-id\" recorded, so the audit cannot tell this run's ledger rows "
            "from other runs'; rerun with a fedrec that records it"
        )
    return str(rid)


def _recorded_releases(metrics: dict, run_dir: Path) -> dict[str, dict] | None:
    """``metrics.json["releases"]``: {institution: {"count": accepted replies, "ledger_head": ...}}."""
    rec = metrics.get("releases")
    if rec is None:
        return None
    if not isinstance(rec, dict):
        raise FedrecInputError(f"{run_dir / 'metrics.json'}: \"releases\" must map institution -> {{count, ledger_head}}")
    out: dict[str, dict] = {}
    for name, entry in rec.items():
        if not _safe_name(str(name)):
            raise FedrecInputError(f"{run_dir / 'metrics.json'}: releases names institution {name!r}, which is not "
                                   "a plain file name")
        count = entry.get("count") if isinstance(entry, dict) else None
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count < 0 or count != int(count):
            raise FedrecInputError(f"{run_dir / 'metrics.json'}: releases[{name!r}].count must be a whole number >= 0")
        out[str(name)] = {"count": int(count), "ledger_head": entry.get("ledger_head")}
    return out


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _head_problem(led: PrivacyLedger, head: Any) -> str | None:
    """Why the ledger does not extend the head the run recorded (``[rows, hash]`` or
    ``{"rows": n, "hash": h}``), or None when it does / none was recorded."""
    if head is None:
        return None
    if isinstance(head, dict):
        n, h = head.get("rows"), head.get("hash")
    elif isinstance(head, (list, tuple)) and len(head) == 2:
        n, h = head
    else:
        return f"the recorded ledger_head {head!r} is not [rows, hash]"
    try:
        at = led.hash_at(int(n))
    except (TypeError, ValueError):
        return f"the recorded ledger_head {head!r} is not [rows, hash]"
    if at != h:
        return (f"the ledger does not extend the head the run recorded (row {n}, hash {str(h)[:12]}…): it was "
                "swapped, rebuilt or rolled back")
    return None


def _claims(metrics: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Final claimed ε per key (institution name or node id) and each key's per-round series."""
    series: dict[str, list[float]] = {}
    for row in metrics.get("rounds", []):
        for key, eps in (row.get("epsilon") or {}).items():
            series.setdefault(str(key), []).append(_num(eps))
    final = {k: v[-1] for k, v in series.items() if v}
    names = metrics.get("institutions")  # optional {node_id: institution}
    if isinstance(names, dict):
        final = {str(names.get(k, k)): v for k, v in final.items()}
        series = {str(names.get(k, k)): v for k, v in series.items()}
    return final, series


def _match_claims(derived: dict[str, float], claimed: dict[str, float]) -> tuple[dict[str, str | None], str]:
    """Map institution -> claim key: by name when the claims are keyed by institution, else
    (node ids) by nearest value, one claim per institution."""
    if claimed and set(claimed) <= set(derived):
        return {name: (name if name in claimed else None) for name in derived}, "institution"
    pairs = sorted(
        ((abs(derived[n] - c), n, k) for n in derived for k, c in claimed.items()), key=lambda t: t[0]
    )
    out: dict[str, str | None] = {n: None for n in derived}
    used: set[str] = set()
    for _, n, k in pairs:
        if out[n] is None and k not in used:
            out[n] = k
            used.add(k)
    return out, "value (metrics.json is keyed by node id)"


def _protocol(cfg: dict) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return cfg.get(key, default)

    institutions = int(get("institutions", 0) or 0)
    # privacy.n-min = 0 means automatic: the institutions minus the tolerated dropouts (RunConfig.n_min)
    dropout = float(get("secagg.max-dropout-fraction", 0.0) or 0.0)
    n_min = int(get("privacy.n-min", 0) or 0) or max(1, institutions - math.floor(dropout * institutions))
    secagg = str(get("secagg.enabled", True)).lower() in ("true", "1", "yes")
    mode = str(get("privacy.noise-mode", "local"))
    metrics_release = str(get("eval.metrics-release", "simulation"))
    eps = _num(get("privacy.epsilon", float("inf")))
    items = {
        "secagg_enabled": secagg,
        "noise_mode": mode,
        "n_min": n_min,
        "institutions": institutions,
        "max_dropout_fraction": get("secagg.max-dropout-fraction"),
        "tls": "n/a (simulation: in-process, no network)",
        "node_authentication": "n/a (simulation: in-process, no network)",
        "metrics_release": metrics_release,
        "metrics_dp": False if metrics_release == "simulation" else None,
        "dp_enabled": math.isfinite(eps),
        "accountant": get("privacy.accountant", "prv"),
    }
    findings = []
    if not items["dp_enabled"]:  # declared: a simulation run with --non-private (institutions refuse it otherwise)
        findings.append(("NOTE", "privacy.epsilon = inf: a declared non-private simulation run; nothing it "
                                 "released is private (ε = ∞)"))
    if not secagg:
        findings.append(("FAIL", "secure aggregation is off: the server saw every institution's update"))
    if mode == "distributed":
        if not secagg:
            findings.append(("FAIL", "distributed noise without SecAgg+: each update carries only σ²/n_min"))
        else:
            findings.append(("NOTE", f"distributed noise: the guarantee holds while >= n_min = {n_min} "
                             "institutions survive each round and SecAgg+ holds"))
    else:
        findings.append(("OK", "local noise: each institution's release is DP on its own"))
    if metrics_release == "simulation":
        findings.append(("NOTE", "held-out metrics were released without DP (simulation only; "
                         "set eval.metrics-release = off in deployment)"))
    else:
        findings.append(("OK", "no metrics computed on institution data were released"))
    items["findings"] = [{"level": lv, "text": t} for lv, t in findings]
    return items


def _rows_schedule(rows: Sequence[LedgerRow]) -> list[tuple[float, float, int]]:
    """Consecutive DP-SGD rows with equal (σ, q) merged: [(σ, q, steps), ...] in order."""
    out: list[list] = []
    for r in rows:
        ev = r.event
        if isinstance(ev, DPSGDEvent):
            if out and out[-1][0] == ev.noise_multiplier and out[-1][1] == ev.sample_rate:
                out[-1][2] += ev.steps
            else:
                out.append([ev.noise_multiplier, ev.sample_rate, ev.steps])
    return [(float(s), float(q), int(n)) for s, q, n in out]


@lru_cache(maxsize=64)
def _sigma_for_gaussian(epsilon: float, delta: float) -> float:
    """σ of one Gaussian release that spends exactly ``epsilon`` at ``delta`` (closed form)."""
    lo, hi = 1e-3, 1e3
    for _ in range(45):
        mid = math.sqrt(lo * hi)
        if gaussian_epsilon(noise_multiplier=mid, delta=delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def run_audit(run_dir: Path, *, quick: bool, console: Console, seed: int | None = None) -> int:
    """Audit ``run_dir``; write audit.md / audit.json / audit.png there. See the module doc."""
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedrecInputError(f"{run_dir}: no such run folder")
    cfg = _read_json(run_dir / "config.json")
    metrics = _read_json(run_dir / "metrics.json")
    if not isinstance(cfg, dict) or not isinstance(metrics, dict):
        raise FedrecInputError(f"{run_dir}: config.json and metrics.json must hold JSON objects")
    run_id = _recorded_run_id(cfg, run_dir)
    recorded = _recorded_releases(metrics, run_dir)
    # only the run folder: a ledger path written into config.json is never followed (a copied
    # folder must audit its own copies, not the originals)
    ledger_dir = run_dir / "ledgers"
    files = sorted(ledger_dir.glob("*.db")) if ledger_dir.is_dir() else []
    if not files:
        raise FedrecInputError(f"{ledger_dir}: no institution ledgers (*.db) to audit")
    delta = _num(cfg.get("privacy.delta", 1e-5))
    target = _num(cfg.get("privacy.epsilon", float("inf")))
    declared_non_private = not math.isfinite(target)
    clip = _num(cfg.get("privacy.clip-norm", 1.0))
    seed = int(cfg.get("seed", 0)) if seed is None else seed
    n_rounds = len(metrics.get("rounds", []))
    protocol = _protocol(cfg)
    n_clients = protocol["n_min"] if protocol["noise_mode"] == "distributed" else 1
    n_clients = max(1, int(n_clients or 1))
    failures: list[str] = []
    warnings: list[str] = []
    for key in ("privacy.ledger-dir", "privacy.ledger"):
        if cfg.get(key):
            warnings.append(f"config.json names {key} = {cfg[key]}; the audit reads only {ledger_dir}")

    insts: list[_Inst] = []
    chain_problems: dict[str, list[str]] = {}
    for f in files:
        try:
            led = PrivacyLedger(f)
        except FedrecInputError as err:
            raise FedrecInputError(f"{err} (in the run's ledger folder)") from None
        name = led.institution
        if f.stem != name:
            failures.append(f"ledgers/{f.name}: holds the ledger of institution {name!r}, not {f.stem!r} (swapped)")
        problems = led.verify_chain()
        head_problem = _head_problem(led, (recorded or {}).get(name, {}).get("ledger_head"))
        if head_problem:
            problems.append(head_problem)
        for prob in problems:
            failures.append(f"{name}: ledgers/{f.name}: {prob}")
        chain_problems[name] = problems
        rows = led.rows()
        insts.append(_Inst(name, led, rows, run_id, [r for r in rows if r.run_id == run_id]))
    by_name = {it.name: it for it in insts}
    if recorded is None:
        failures.append("metrics.json records no \"releases\" (replies accepted per institution): the ledgers "
                        "cannot be checked against what the server received")
    else:
        for name, rec in recorded.items():
            it = by_name.get(name)
            if it is None:
                if rec["count"]:
                    failures.append(f"{name}: the server accepted {rec['count']} release(s) from it but the run "
                                    f"folder holds no ledger ledgers/{name}.db")
            elif len(it.run_rows) < rec["count"]:
                failures.append(
                    f"{name}: the server accepted {rec['count']} release(s) in run {run_id} but the ledger holds "
                    f"only {len(it.run_rows)} row(s) of that run: a release was never charged"
                )
    for it in insts:
        if not it.run_rows and (recorded is None or it.name in recorded):
            warnings.append(f"{it.name}: its ledger holds no rows of run {run_id}")
        n_np = sum(isinstance(r.event, NonPrivateEvent) for r in it.run_rows)
        if n_np and not declared_non_private:
            failures.append(
                f"{it.name}: {n_np} non-private release(s) (ε = ∞) in run {run_id}, but config.json declares "
                f"privacy.epsilon = {target:g}"
            )

    # ------------------------------------------------------------- a. accounting re-check
    claimed_final, claimed_series = _claims(metrics)
    derived_at_claim: dict[str, float] = {}
    for it in insts:
        last = max((r.seq for r in it.run_rows if r.round <= max(n_rounds, 1) or not n_rounds), default=None)
        prefix = [r.event for r in it.rows if last is None or r.seq <= last]
        derived_at_claim[it.name] = epsilon_for(prefix, delta=delta, accountant="prv")
    mapping, matched_by = _match_claims(derived_at_claim, claimed_final)
    report_insts: dict[str, dict] = {}
    for it in insts:
        total_prv = epsilon_for([r.event for r in it.rows], delta=delta, accountant="prv")
        total_rdp = epsilon_for([r.event for r in it.rows], delta=delta, accountant="rdp")
        run_prv = epsilon_for([r.event for r in it.run_rows], delta=delta, accountant="prv")
        run_rdp = epsilon_for([r.event for r in it.run_rows], delta=delta, accountant="rdp")
        non_private_rows = sum(isinstance(r.event, NonPrivateEvent) for r in it.rows)
        non_private_run = sum(isinstance(r.event, NonPrivateEvent) for r in it.run_rows)
        cap = it.ledger.cap()
        key = mapping.get(it.name)
        claimed = claimed_final.get(key) if key is not None else None
        d_claim = derived_at_claim[it.name]
        tol = 0.02 + 1e-3 * d_claim if math.isfinite(d_claim) else 0.0
        if claimed is not None and math.isinf(d_claim):
            consistent, under = math.isinf(claimed), not math.isinf(claimed)  # ε = ∞ claimed as finite
        else:
            consistent = claimed is not None and abs(claimed - d_claim) <= tol
            under = claimed is not None and claimed < d_claim - tol
        series = claimed_series.get(key, []) if key is not None else []
        monotone = all(b >= a - 1e-9 for a, b in zip(series, series[1:]))
        cap_eps_at_cap = (
            epsilon_for([r.event for r in it.rows], delta=cap.delta, accountant="prv") if cap else None
        )
        # a declared non-private simulation's ledger is ∞ by design (reported, not a cap breach)
        within_cap = cap is None or cap_eps_at_cap <= cap.epsilon + 1e-9 or (
            declared_non_private and non_private_rows > 0 and math.isinf(cap_eps_at_cap))
        within_target = not math.isfinite(target) or run_prv <= target + 0.05
        if under:
            failures.append(f"{it.name}: claimed ε {_fmt(claimed)} is below the re-derived {_fmt(d_claim)}")
        if not within_cap:
            failures.append(f"{it.name}: ledger total ε {_fmt(cap_eps_at_cap)} exceeds its cap {cap.epsilon:g}")
        if not monotone:
            failures.append(f"{it.name}: the claimed ε decreased between rounds")
        if claimed is None:
            warnings.append(f"{it.name}: metrics.json holds no ε claim for this institution")
        elif not consistent and not under:
            warnings.append(f"{it.name}: claimed ε {claimed:.3f} above the re-derived {d_claim:.3f} (conservative)")
        if not within_target:
            warnings.append(f"{it.name}: this run's ε {_fmt(run_prv)} exceeds the target privacy.epsilon {target:g}")
        rec = (recorded or {}).get(it.name)
        report_insts[it.name] = {
            "ledger": str(Path("ledgers") / it.ledger.path.name),
            "ledger_id": it.ledger.ledger_id,
            "ledger_head": list(it.ledger.head()),
            "chain_ok": not chain_problems.get(it.name),
            "chain_problems": chain_problems.get(it.name, []),
            "run_id": it.run_id,
            "events_total": len(it.rows),
            "events_run": len(it.run_rows),
            "releases_recorded": None if rec is None else rec["count"],
            "unreleased": sum(r.status == "charged" for r in it.rows),
            "non_private_rows": non_private_rows,
            "non_private_run_rows": non_private_run,
            "accounting": {
                "claimed_epsilon": claimed,
                "claim_key": key,
                "derived_epsilon_at_claim": d_claim,
                "derived_epsilon_total_prv": total_prv,
                "derived_epsilon_total_rdp": total_rdp,
                "run_epsilon_prv": run_prv,
                "run_epsilon_rdp": run_rdp,
                "target_epsilon": target if math.isfinite(target) else None,
                "cap": None if cap is None else {"epsilon": cap.epsilon, "delta": cap.delta},
                "consistent": consistent,
                "under_claimed": under,
                "claims_monotone": monotone,
                "within_cap": within_cap,
                "within_target": within_target,
            },
            "releases": {},
        }

    # ------------------------------------------------------------- b. empirical audits
    # Each distinct mechanism is audited once (institutions with the same σ, q, T share it).
    mechanisms: dict[tuple, dict] = {}
    for it in insts:
        dp_rows = [r for r in it.run_rows if isinstance(r.event, DPSGDEvent)]
        if dp_rows:
            schedule = tuple(_rows_schedule(dp_rows))
            mechanisms.setdefault(("mf_dpsgd", schedule), {"institutions": [], "reference": False})[
                "institutions"].append(it.name)
        g_rows = [r for r in it.run_rows if isinstance(r.event, GaussianEvent)]
        if g_rows:
            releases = tuple((float(r.event.noise_multiplier), int(r.event.count)) for r in g_rows)
            reference = False
        else:  # nothing recorded: audit the statistics mechanism at the run's ε target
            sig = _sigma_for_gaussian(target if math.isfinite(target) else 8.0, delta)
            releases, reference = ((sig, 1),), True
        mechanisms.setdefault(("gaussian_release", releases), {"institutions": [], "reference": reference})[
            "institutions"].append(it.name)

    # noise draws per audited run: quick ≈ a few seconds in all, full ≈ a minute or two
    draw_budget = (4e7 if quick else 4e8) / max(1, len(mechanisms))
    max_m = 400_000 if quick else 8_000_000
    traces: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def events_of(kind: str, params: tuple) -> list:
        if kind == "mf_dpsgd":
            return [DPSGDEvent(noise_multiplier=s, sample_rate=q, steps=n) for s, q, n in params]
        return [GaussianEvent(noise_multiplier=s, count=c) for s, c in params]

    def sampler(kind: str, params: tuple, **broken) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
        if kind == "mf_dpsgd":
            return lambda m, s: dpsgd_canary_scores(
                m=m, schedule=list(params), clip_norm=clip, n_clients=n_clients, seed=s, **broken
            )
        return lambda m, s: gaussian_canary_scores(
            m=m, releases=list(params), sensitivity=1.0, n_clients=n_clients, seed=s, **broken
        )

    def cost_per_canary(kind: str, params: tuple) -> float:
        steps = sum(p[-1] for p in params)
        return 1.25 * steps * n_clients  # pilot + audited run

    def describe(kind: str, params: tuple, reference: bool, **broken) -> dict:
        if kind == "mf_dpsgd":
            mech = {
                "kind": "DP-SGD (Opacus UniformWithReplacementSampler + exact per-person clipping + "
                        "common/privacy/release.py dp_sgd_optimizer noise from the charged event)",
                "schedule": [{"noise_multiplier": a, "sample_rate": b, "steps": c} for a, b, c in params],
                "clip_norm": clip,
            }
        else:
            mech = {
                "kind": "Gaussian statistics release (common/privacy/gaussian.py clip_rows + "
                        "common/privacy/release.py gaussian_release from the charged event)",
                "releases": [{"noise_multiplier": a, "count": b} for a, b in params],
                "sensitivity": 1.0,
                "reference_mechanism": reference,
            }
        mech.update({"clients_adding_noise": n_clients, "noise_scale": broken.get("noise_scale", 1.0),
                     "clipping": broken.get("clipping", True)})
        return mech

    plans: dict[tuple, AuditPlan] = {}
    results: dict[tuple, dict] = {}
    for key, info in mechanisms.items():
        kind, params = key
        evs = events_of(kind, params)
        detect = 1.0
        if kind == "mf_dpsgd":
            detect = 1.0 - math.prod((1 - q) ** n for _, q, n in params)
        limit = int(min(max_m, max(1000, draw_budget / cost_per_canary(kind, params))))
        plan = plan_audit(lambda d, evs=evs: epsilon_for(evs, delta=d), delta=delta, detect_fraction=detect,
                          max_canaries=limit, min_canaries=min(1000 if quick else 50_000, limit))
        plans[key] = plan
        res, scores, inc = audit_mechanism(sampler(kind, params), m=plan.canaries, delta=plan.audit_delta,
                                           seed=_seeded(seed, kind, params))
        if kind not in traces:
            traces[kind] = (scores, inc)
        entry = _release_entry(res, plan.claimed_epsilon, describe(kind, params, info["reference"]))
        entry["claimed_epsilon_at_run_delta"] = epsilon_for(evs, delta=delta)
        entry["run_delta"] = delta
        entry["power_sufficient"] = plan.sufficient
        entry["audit_ceiling"] = plan.ceiling
        entry["institutions"] = list(info["institutions"])
        results[key] = entry
        for name in info["institutions"]:
            report_insts[name]["releases"][kind] = entry
    for inst in report_insts.values():
        inst["releases"] = dict(sorted(inst["releases"].items(), key=lambda kv: kv[0] != "mf_dpsgd"))

    # ------------------------------------------------------------- c. power check
    # Per release kind, the mechanism with the largest claim among those the plan can audit
    # with power (else the largest claim) is run broken, with the same canaries, δ_audit and
    # guessing procedure. Mechanisms the canary budget cannot audit with power are warned about.
    power_cases: list[dict] = []
    for key, plan in plans.items():
        if not plan.sufficient:
            warnings.append(
                f"{key[0]} of {', '.join(mechanisms[key]['institutions'])}: with {plan.canaries} canaries no "
                f"one-run audit can refute ε = {plan.claimed_epsilon:.2f} at δ = {plan.audit_delta:.0e} "
                f"(ceiling {plan.ceiling:.2f}); its empirical bound is informative only"
            )
    for kind in ("mf_dpsgd", "gaussian_release"):
        keys = [k for k in mechanisms if k[0] == kind]
        if not keys:
            continue
        key = max(keys, key=lambda k: (plans[k].sufficient, plans[k].claimed_epsilon))
        plan, params = plans[key], key[1]
        for name, broken in (("no noise (σ = 0)", {"noise_scale": 0.0}), ("clipping off", {"clipping": False})):
            res, scores, inc = audit_mechanism(sampler(kind, params, **broken), m=plan.canaries,
                                               delta=plan.audit_delta, seed=_seeded(seed, kind, params, name))
            if kind == "mf_dpsgd" and "noise" in name:
                traces["mf_dpsgd broken"] = (scores, inc)
            entry = _release_entry(res, plan.claimed_epsilon, describe(kind, params, False, **broken))
            power_cases.append({"release": kind, "broken": name, "power_sufficient": plan.sufficient, **entry})
    broken_flagged = bool(power_cases) and all(c["violation"] for c in power_cases)
    correct_flagged = any(e["violation"] for e in results.values())
    if correct_flagged:
        failures.append("the empirical audit found ε above the claimed ε for a correct mechanism")
    if not broken_flagged:
        insufficient = [c for c in power_cases if not c["power_sufficient"]]
        why = ""
        if insufficient:
            why = (" — no one-run audit with the canaries allowed can certify an ε this large"
                   + ("; rerun without --quick" if quick else " (one-run audits top out near log(canaries "
                      "touched); subsampled runs with few steps touch few canaries)"))
        failures.append(f"power check: a broken mechanism was not flagged{why}")
    for f in protocol["findings"]:
        if f["level"] == "FAIL":
            failures.append(f"protocol: {f['text']}")

    non_private = any(i["non_private_run_rows"] for i in report_insts.values())
    if non_private:
        warnings.append(f"run {run_id} is NON-PRIVATE: its ledgers record releases with ε = ∞"
                        + (" (declared in config.json: privacy.epsilon = inf)" if declared_non_private else ""))
    report = {
        "run_dir": str(run_dir),
        "run_id": run_id,
        "non_private": non_private,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "seed": seed,
        "delta": delta,
        "confidence": CONFIDENCE,
        "claims_matched_by": matched_by,
        "institutions": report_insts,
        "power_check": {
            "broken_mechanism_flagged": broken_flagged,
            "correct_mechanism_flagged": correct_flagged,
            "cases": power_cases,
        },
        "protocol": protocol,
        "failures": failures,
        "warnings": warnings,
        "passed": not failures,
        "seconds": round(time.monotonic() - t0, 2),
    }
    write_json(run_dir / "audit.json", report)
    _plot(run_dir / "audit.png", report, traces)
    (run_dir / "audit.md").write_text(_markdown(report))
    _print_summary(console, report)
    return 0 if not failures else 1


def _release_entry(res: AuditResult, claimed: float, mechanism: dict) -> dict:
    return {
        "claimed_epsilon": claimed,
        "empirical_epsilon_lower_bound": res.empirical_epsilon_lower_bound,
        "confidence": res.confidence,
        "violation": res.empirical_epsilon_lower_bound > claimed,
        "canaries": res.canaries,
        "guesses": res.guesses,
        "correct": res.correct,
        "k_pos": res.k_pos,
        "k_neg": res.k_neg,
        "pilot_canaries": res.pilot_canaries,
        "delta": res.delta,
        "mechanism": mechanism,
    }




# ====================================================================== report writers
def _fmt(x: Any, nd: int = 3) -> str:
    """A number for the report; ε = ∞ reads "∞ (non-private)", never 0 or 'inf'."""
    if isinstance(x, float) and math.isinf(x):
        return "∞ (non-private)" if x > 0 else "-∞"
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _markdown(rep: dict) -> str:
    L = [f"# Privacy audit of `{rep['run_dir']}`", ""]
    verdict = "PASSED" if rep["passed"] else "FAILED"
    L += [f"**{verdict}** — run {rep['run_id']}, generated {rep['generated_at']}, δ = {rep['delta']:g}, "
          f"confidence {rep['confidence']:.0%}{' (quick: fewer canaries)' if rep['quick'] else ''}.", ""]
    if rep.get("non_private"):
        L += ["**NON-PRIVATE RUN: its ledgers record releases with ε = ∞.**", ""]
    for f in rep["failures"]:
        L.append(f"- FAIL: {f}")
    for w in rep["warnings"]:
        L.append(f"- warning: {w}")
    L += ["", "## a. Accounting re-derived from the ledgers", "",
          f"Ledgers read from `RUN_DIR/ledgers/` only; this run's rows are those of run id {rep['run_id']} "
          "(recorded in config.json). "
          f"Claims from metrics.json matched to ledgers by {rep['claims_matched_by']}. "
          "ε is composed from every event in each ledger (PRV; RDP cross-check); charged-but-"
          "unreleased events count as spent; a non-private release is ε = ∞.", "",
          "| institution | hash chain | events (run/total) | accepted by server | unreleased | claimed ε | re-derived ε | total ε PRV | total ε RDP | run ε | target | cap | status |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, i in rep["institutions"].items():
        a = i["accounting"]
        status = "ok" if a["consistent"] and a["within_cap"] and a["claims_monotone"] else (
            "UNDER-CLAIMED" if a["under_claimed"] else ("over cap" if not a["within_cap"] else "check"))
        cap = a["cap"]
        cap_txt = "—" if cap is None else f"{cap['epsilon']:g} @ {cap['delta']:g}"
        chain = "ok" if i["chain_ok"] else f"BROKEN ({len(i['chain_problems'])})"
        L.append(
            f"| {name} | {chain} | {i['events_run']}/{i['events_total']} | {_fmt(i['releases_recorded'])} | "
            f"{i['unreleased']} | "
            f"{_fmt(a['claimed_epsilon'])} | {_fmt(a['derived_epsilon_at_claim'])} | "
            f"{_fmt(a['derived_epsilon_total_prv'])} | {_fmt(a['derived_epsilon_total_rdp'])} | "
            f"{_fmt(a['run_epsilon_prv'])} | {_fmt(a['target_epsilon'], 2)} | "
            f"{cap_txt} | {status} |"
        )
    L += ["", "## b. Empirical audit (one run, Steinke, Nasr & Jagielski 2023)", "",
          "m canaries, each in with probability ½; guesses on the top k₊ / bottom k₋ scores; the "
          "paper's bound (Thm 5.2 / App. D) turns v correct of r guesses into a lower bound on ε, "
          "with k₊, k₋ chosen on an independent pilot run. Each mechanism is tested at the δ_audit "
          "its plan chose (a claim ε(δ) is a claim on the whole privacy profile); claimed ε is "
          "the accountant's ε at δ_audit (in brackets: at the run's δ). The bound must lie below "
          "the claimed ε. One-run audits are loose by design (ceiling ≈ log r), so a bound well "
          "below the claim is expected and is not an estimate of the true ε.", "",
          "| institution | release | mechanism | δ_audit | claimed ε | empirical ε lower bound | canaries m | guesses r | correct v | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, i in rep["institutions"].items():
        for kind, r in i["releases"].items():
            mech = r["mechanism"]
            desc = ", ".join(
                f"σ={s['noise_multiplier']:.3g} q={s['sample_rate']:.3g} T={s['steps']}" for s in mech.get("schedule", [])
            ) or ", ".join(f"σ={s['noise_multiplier']:.3g} ×{s['count']}" for s in mech.get("releases", []))
            if mech.get("reference_mechanism"):
                desc += " (reference: no Gaussian release recorded)"
            L.append(
                f"| {name} | {kind} | {desc} | {r['delta']:.0e} | {_fmt(r['claimed_epsilon'])} "
                f"({_fmt(r.get('claimed_epsilon_at_run_delta'))}) | {_fmt(r['empirical_epsilon_lower_bound'])} | "
                f"{r['canaries']} | {r['guesses']} | {r['correct']} | {'VIOLATION' if r['violation'] else 'ok'} |"
            )
    pc = rep["power_check"]
    L += ["", "## c. Power check (deliberately broken mechanisms must be flagged)", "",
          f"broken mechanisms flagged: **{pc['broken_mechanism_flagged']}**; correct mechanisms flagged: "
          f"**{pc['correct_mechanism_flagged']}**", "",
          "| release | broken how | δ_audit | claimed ε | empirical ε lower bound | canaries | correct/guesses | power enough | flagged |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in pc["cases"]:
        L.append(
            f"| {c['release']} | {c['broken']} | {c['delta']:.0e} | {_fmt(c['claimed_epsilon'])} | "
            f"{_fmt(c['empirical_epsilon_lower_bound'])} | {c['canaries']} | {c['correct']}/{c['guesses']} | "
            f"{'yes' if c['power_sufficient'] else 'no'} | {'yes' if c['violation'] else 'NO'} |"
        )
    p = rep["protocol"]
    L += ["", "## d. Protocol settings", "",
          f"- secure aggregation (SecAgg+): {'on' if p['secagg_enabled'] else 'OFF'}",
          f"- noise mode: {p['noise_mode']} (n_min = {p['n_min']} of {p['institutions']} institutions; "
          f"max dropout fraction {p['max_dropout_fraction']})",
          f"- TLS: {p['tls']}",
          f"- node authentication: {p['node_authentication']}",
          f"- metrics released: {p['metrics_release']} "
          f"({'not DP — simulation ground truth' if p['metrics_release'] == 'simulation' else 'none'})",
          f"- accountant: {p['accountant']} (RDP reported as the cross-check)", ""]
    for f in p["findings"]:
        L.append(f"- {f['level']}: {f['text']}")
    L += ["", "![audit](audit.png)", "", f"_audit took {rep['seconds']} s_", ""]
    return "\n".join(L)


def _plot(path: Path, rep: dict, traces: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    names = list(rep["institutions"])
    x = np.arange(len(names))
    def finite(v: Any) -> float:  # ε = ∞ has no bar (it is marked ∞ above the axis), never 0
        return float("nan") if v is None or (isinstance(v, float) and math.isinf(v)) else float(v)

    claimed = [finite(rep["institutions"][n]["accounting"]["claimed_epsilon"]) for n in names]
    derived = [finite(rep["institutions"][n]["accounting"]["derived_epsilon_at_claim"]) for n in names]
    for k, n in enumerate(names):
        if math.isinf(rep["institutions"][n]["accounting"]["derived_epsilon_at_claim"]):
            ax.annotate("ε = ∞", (x[k], 0), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
    lb = [max((r["empirical_epsilon_lower_bound"] for r in rep["institutions"][n]["releases"].values()), default=0.0)
          for n in names]
    ax.bar(x - 0.27, claimed, 0.27, label="claimed ε (metrics.json)")
    ax.bar(x, derived, 0.27, label="re-derived ε (ledger, PRV)")
    ax.bar(x + 0.27, lb, 0.27, label="empirical ε lower bound (95%)")
    caps = [(rep["institutions"][n]["accounting"].get("cap") or {}).get("epsilon") for n in names]
    cap_label = "budget cap (ledger)"
    for k, c in enumerate(caps):  # each institution's own budget cap, over its bars
        if c is not None and math.isfinite(c):
            ax.hlines(c, x[k] - 0.45, x[k] + 0.45, colors="black", linestyles="--", label=cap_label)
            cap_label = None  # one legend entry
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("institution")
    ax.set_ylabel("ε (privacy loss at the cap's δ)")
    ax.set_title("ε per institution")
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    ax = axes[1]
    ref = traces.get("mf_dpsgd")
    sd = (float(np.std(ref[0][~ref[1]])) if ref is not None else 1.0) or 1.0
    for tag, (scores, inc) in traces.items():
        if not tag.startswith("mf_dpsgd"):
            continue
        for sel, lab in ((inc, "in"), (~inc, "out")):
            ax.hist(scores[sel] / sd, bins=80, histtype="step", density=True,
                    label=f"{'correct' if tag == 'mf_dpsgd' else 'broken (σ=0)'} – canary {lab}")
    ax.set_xlabel("canary score / std of the correct mechanism's out-scores")
    ax.set_ylabel("density (log scale)")
    ax.set_title("DP-SGD canary scores")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:  # a run with no DP-SGD release has no traces
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_summary(console: Console, rep: dict) -> None:
    from rich.table import Table

    table = Table(title=f"privacy audit — {'PASSED' if rep['passed'] else 'FAILED'}")
    for col in ("institution", "release", "claimed ε", "empirical ε LB (95%)", "verdict"):
        table.add_column(col)
    for name, i in rep["institutions"].items():
        a = i["accounting"]
        table.add_row(name, "ledger re-check", _fmt(a["claimed_epsilon"]), f"re-derived {_fmt(a['derived_epsilon_at_claim'])}",
                      "ok" if a["consistent"] else ("UNDER" if a["under_claimed"] else "check"))
        for kind, r in i["releases"].items():
            table.add_row("", kind, _fmt(r["claimed_epsilon"]), _fmt(r["empirical_epsilon_lower_bound"]),
                          "VIOLATION" if r["violation"] else "ok")
    for c in rep["power_check"]["cases"]:
        table.add_row("power check", f"{c['release']}: {c['broken']}", _fmt(c["claimed_epsilon"]),
                      _fmt(c["empirical_epsilon_lower_bound"]), "flagged" if c["violation"] else "NOT flagged")
    console.print(table)
    for f in rep["failures"]:
        console.print(f"[red]FAIL[/] {f}", highlight=False)
    console.print(f"wrote {rep['run_dir']}/audit.md, audit.json, audit.png ({rep['seconds']} s)", highlight=False)

