"""Know before spending: each item's CI half-width forecast from public quantities only.

A simulation (it runs the protocol's client statistics and server code in-process on a public
stand-in federation), so it lives in ``simulations/``; the institution-side pilot release it
reads is ``fedrec/common/causal/pilot.py``.

Before any budget is spent, the run's configuration (ε, noise mode, items, estimator, design)
is applied to a **public stand-in federation**: the same number of institutions, each with the
approximate number of people per item it declares (each stand-in person is considered for every
item), covariates drawn uniformly within their declared bounds (binary and category columns
evenly), exposure a fair coin per person and item, and an outcome at
the declared range's midpoint plus normal noise of SD :data:`SPREAD` x the declared range (a
typical outcome covers about a third of its declared range within ±2 SD). The very protocol of
the real run (the same client statistics, the same server code, the same budget plan and noise)
runs on it in-process; its CI half-widths are the forecast. Nothing of anyone's data enters it,
so it costs no budget.

Where the noise dominates (small ε, local noise, many items) the width is the noise's and the
forecast follows it closely; where sampling dominates it is a typical-spread guess (an outcome
spreading more or less than assumed moves it). docs/causal.md, "Know before spending", has the
forecasts next to the measured widths.

:func:`answerable` says whether a run can answer: every item's forecast half-width must stay
below :data:`MAX_HALF_FRACTION` of the largest possible effect (``max - min`` of the outcome).

**The pilot** (issue 29): the stand-in's outcome spread and treated shares are guesses, and the
forecast followed them (3.0x-3.8x the measured width at ε = ∞ in finance, whose outcome SD of
~6,000 USD is a third of the assumed range/12 = 16,667 USD; docs/causal.md, Know before
spending). So a run first
spends :data:`PILOT_SHARE` of its Gaussian budget (1/σ² terms; :func:`pilot_plan`) on one
**charged pilot release** per institution: per item and arm the count, the sum and the sum of
squares of the outcome scaled by its declared bounds (:func:`pilot_release`, sensitivity
:func:`fedrec.common.causal.sensitivity.pilot_bound`), noised like every other statistic and
added by secure aggregation. From the sums (:func:`pilot_shapes`) each item's stand-in takes its
treated share and each arm's outcome mean and SD; the forecast and the refusal follow, before the
main run's budget (the rest, :func:`pilot_plan`'s ``main_epsilon``) is spent. A refused run has
spent the pilot only. Where the pilot's noise leaves a mean or a share imprecise the default
stays; an arm's outcome SD whose own variance is imprecise takes the variance pooled over every
item and arm, or where even that is imprecise an upper bound never above the default
(:func:`pilot_shapes`; measured: docs/causal.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.common.causal import pilot  # the module (not its names): a test's spy on pilot_release reaches us
from fedrec.common.causal.pilot import PILOT_SHARE, PilotPlan

__all__ = ["SPREAD", "MAX_HALF_FRACTION", "Forecast", "ItemShape", "stand_in_federation", "forecast_half_widths",
           "answerable", "declared_people_per_item", "refusal_message", "pilot_shapes", "pilot_forecast"]

#: the stand-in outcome's SD as a fraction of the declared range (max - min)
SPREAD = 1.0 / 12.0
#: a run cannot answer when the forecast 95% half-width reaches this fraction of
#: ``max - min`` (±10 kg on health's ±40 kg): its CI would then span a quarter of every effect the
#: bounds allow
MAX_HALF_FRACTION = 0.125
#: an arm whose pilot count is below this keeps the stand-in's defaults (share 1/2, SD = SPREAD)
PILOT_MIN_ARM = 20.0


@dataclass(frozen=True)
class ItemShape:
    """One item's stand-in, from the pilot: treated share, outcome mean and SD per arm
    ``(untreated, treated)`` in outcome units."""

    treated_share: float
    mean: tuple[float, float]
    sd: tuple[float, float]

    def to_json(self) -> dict:
        return {"treated_share": self.treated_share, "mean": list(self.mean), "sd": list(self.sd)}


@dataclass(frozen=True)
class Forecast:
    """Forecast 95% CI half-width per item (outcome units), and what it was made from."""

    half_width: dict[str, float]
    limit: float  #: the largest possible effect, ``max - min``
    people_per_item: list[int]
    epsilon: float
    noise_mode: str
    #: the pilot's item shapes (None: the stand-in's defaults, SPREAD and fair coins)
    shapes: dict[str, ItemShape] | None = None
    #: ``z`` x SE per item before the cut to the possible range (``half_width`` is the interval the
    #: run prints, cut like the run's; the two differ only where a CI reaches past ``±limit``)
    se_half_width: dict[str, float] | None = None

    def to_json(self) -> dict:
        out = {"half_width": self.half_width, "largest_possible_effect": self.limit,
               "people_per_item_declared": self.people_per_item, "epsilon": _num(self.epsilon),
               "noise_mode": self.noise_mode, "max_half_fraction": MAX_HALF_FRACTION, "spread": SPREAD}
        if self.se_half_width is not None:
            out["half_width_before_cut"] = self.se_half_width
        if self.shapes is not None:
            out["pilot"] = {"share_of_budget": PILOT_SHARE, "items": {k: v.to_json() for k, v in self.shapes.items()}}
        return out


def _num(x: float):
    return x if math.isfinite(x) else "inf"


def stand_in_federation(study, items: Sequence[str], people_per_item: Sequence[int], *, seed: int = 0,
                        shapes: dict[str, ItemShape] | None = None):
    """Public stand-in institutions: one per entry of ``people_per_item`` (its declared number of
    people considered for each item), built from the study declaration alone, or with each item's
    treated share and per-arm outcome mean and SD from the pilot (``shapes``)."""
    from fedrec.common.datasets import InstitutionData

    rng = np.random.default_rng(seed)
    lo_y, hi_y = study.outcome_bounds
    mid, sd = (lo_y + hi_y) / 2.0, SPREAD * (hi_y - lo_y)
    out = []
    for k, m in enumerate(people_per_item):
        m = max(int(m), 4)
        n = m  # every person is considered for every item: m people per item
        cols: dict[str, object] = {"person_id": pd.Series([f"S{k}_{i}" for i in range(n)], dtype="str")}
        for c in study.covariates:
            if c.kind == "category":
                cols[c.name] = pd.Series(rng.choice(list(c.levels), n), dtype="str")
            elif c.kind == "binary":
                cols[c.name] = rng.integers(0, 2, n)
            elif c.kind == "integer":
                cols[c.name] = rng.integers(int(math.ceil(c.lower)), int(math.floor(c.upper)) + 1, n)
            else:
                cols[c.name] = rng.uniform(c.lower, c.upper, n)
        people = pd.DataFrame(cols)
        rows = n * len(items)
        if shapes is None:
            t = rng.integers(0, 2, rows)
            y = np.clip(mid + rng.normal(0.0, sd, rows), lo_y, hi_y)
        else:
            t = np.concatenate([(rng.random(n) < shapes[it].treated_share).astype(np.int64) for it in items])
            mu = np.concatenate([np.asarray(shapes[it].mean)[t[j * n:(j + 1) * n]] for j, it in enumerate(items)])
            sds = np.concatenate([np.asarray(shapes[it].sd)[t[j * n:(j + 1) * n]] for j, it in enumerate(items)])
            y = np.clip(mu + rng.normal(0.0, 1.0, rows) * sds, lo_y, hi_y)
        inter = pd.DataFrame({"person_id": pd.Series(np.tile(people["person_id"].to_numpy(), len(items)), dtype="str"),
                              "item_id": pd.Series(np.repeat(np.asarray(items, dtype=object), n), dtype="str"),
                              "exposed": t, "engagement": np.where(t == 1, 1.0, np.nan), "outcome": y,
                              "timestamp": pd.Timestamp("2024-01-01")})
        cat = pd.DataFrame({"item_id": list(items), "name": list(items), "description": list(items),
                            "category": ["stand-in"] * len(items)})
        out.append(InstitutionData(name=f"stand_in_{k}", people=people, items=cat, interactions=inter, study=study))
    return out


def forecast_half_widths(study, cfg, items: Sequence[str], people_per_item: Sequence[int], *, draws: int = 3,
                         seed: int = 0, alpha: float | None = None,
                         shapes: dict[str, ItemShape] | None = None) -> Forecast:
    """The forecast ``1 - alpha`` CI half-width of a run of ``cfg`` (ε, noise mode, estimator,
    design) over institutions declaring ``people_per_item`` people per item: the median over
    ``draws`` stand-in federations and their items (exchangeable in the stand-in, so every item
    gets the same forecast; a single draw's width is itself noisy where the noise dominates).
    With the pilot's ``shapes`` each item gets its own: the median over the draws of its width.

    The width is that of the interval the run prints: the stand-in runs the run's server code,
    which cuts an interval reaching past ``±(max - min)`` to that range (``cut_to_possible_range``),
    so the forecast is cut exactly as the run's will be; ``se_half_width`` keeps ``z`` x SE. The
    stand-in draws are seeded by ``seed`` (``seed + 2d`` and ``seed + 2d + 1``): two runs' forecasts
    share their Monte Carlo error only when they share ``seed``."""
    from dataclasses import replace

    from scipy.stats import norm

    from fedrec.simulations.causal_cli import estimate_inprocess

    a = float(alpha or cfg.alpha)
    run_cfg = replace(cfg, items=tuple(items), alpha=a)
    z = float(norm.ppf(1 - a / 2))
    widths: dict[str, list[float]] = {it: [] for it in items}
    se_widths: dict[str, list[float]] = {it: [] for it in items}
    for d in range(draws):
        insts = stand_in_federation(study, items, people_per_item, seed=seed + 2 * d, shapes=shapes)
        res = estimate_inprocess(insts, run_cfg, rng=np.random.default_rng(seed + 2 * d + 1))
        for it in items:
            row = res.items[it]
            widths[it].append((float(row["ci_high"]) - float(row["ci_low"])) / 2.0)  # as printed: cut
            se_widths[it].append(z * float(row["se"]))

    def per_item(ws: dict[str, list[float]]) -> dict[str, float]:
        if shapes is None:
            half = float(np.median([w for v in ws.values() for w in v]))
            return {it: half for it in items}
        return {it: float(np.median(ws[it])) for it in items}

    limit = float(study.outcome_bounds[1] - study.outcome_bounds[0])
    return Forecast(half_width=per_item(widths), limit=limit,
                    people_per_item=[int(m) for m in people_per_item], epsilon=float(cfg.epsilon),
                    noise_mode=cfg.noise_mode, shapes=shapes, se_half_width=per_item(se_widths))


def declared_people_per_item(institutions, items: Sequence[str]) -> list[int]:
    """Simulation stand-in for each institution's declared approximate size: its mean number of
    people considered per item, rounded to two significant digits."""
    out = []
    for d in institutions:
        counts = d.interactions["item_id"].astype(str).value_counts()
        m = float(np.mean([counts.get(it, 0) for it in items]))
        out.append(int(float(f"{m:.2g}")) if m > 0 else 0)
    return out


def answerable(fc: Forecast) -> bool:
    return all(h < MAX_HALF_FRACTION * fc.limit for h in fc.half_width.values())


def refusal_message(fc: Forecast, unit: str = "") -> str:
    """One paragraph: what the run would give and what would make it answer."""
    # the uncut z x SE where known: a printed interval cut to ±(max - min) hides how far off it is
    worst = max((fc.se_half_width or fc.half_width).values())
    people = round(float(np.mean(fc.people_per_item)))
    u = f" {unit}" if unit else ""
    eps = "∞" if not math.isfinite(fc.epsilon) else f"{fc.epsilon:g}"
    return (f"this run cannot answer: at ε = {eps}, {fc.noise_mode} noise, ~{people:,} people per item at each of "
            f"{len(fc.people_per_item)} institutions and {len(fc.half_width)} item(s), the 95% CI will be about "
            f"±{worst:.3g}{u} on effects of at most ±{fc.limit:.3g}{u} (refused above ±{MAX_HALF_FRACTION * fc.limit:.3g}); "
            "fix: use --noise-mode distributed, a larger --epsilon, fewer items (--item), or more people; "
            "or --force to spend the budget anyway")


# --------------------------------------------------------------------------- the pilot
def pilot_shapes(sums: np.ndarray, items: Sequence[str], bounds: tuple[float, float], *,
                 noise_std: float = 0.0) -> dict[str, ItemShape]:
    """Each item's :class:`ItemShape` from the federation's summed pilot releases (post-processing
    of a DP release: no further cost). ``noise_std``: the public std of the sum's noise per
    coordinate. A quantity the noise leaves too imprecise keeps the stand-in's default: the treated
    share (1/2) unless both arms count :data:`PILOT_MIN_ARM` and ``noise_std / n <= 0.05``; an arm's
    mean (the midpoint) unless ``noise_std / n_arm <= 0.05``.

    An arm's outcome SD (scaled units; :func:`_arm_sds`) is its own variance where the pilot's
    noise's std is at most :data:`ARM_VAR_NOISE` of it (always at ε = ∞); otherwise the variance
    pooled over every item and arm (one outcome: the items move its mean, not much its spread; the
    pooled sum has about ``1 / sqrt(2 J)`` of one arm's relative noise) where its noise's std is at
    most :data:`ARM_VAR_NOISE` of it, or at most :data:`POOLED_VAR_NOISE` of it but then never above
    the default ``SPREAD`` x range (a variance taken because it looked resolved is one the noise
    tends to have inflated: issue 29's education regression, where arms' own variances taken at
    half their noise came out 2-3x the data's); otherwise an upper bound, the pooled variance plus
    its noise's std, ``sqrt(max(var, 0) + noise)``, capped at the default (never above it). An
    outcome spreading far less than its declared range (finance: SD 3% of it) so gets the smaller
    SD its pilot allows."""
    lo, hi = float(bounds[0]), float(bounds[1])
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    tau = float(noise_std)
    sds = _arm_sds(np.asarray(sums, dtype=np.float64), tau, default=2.0 * SPREAD)
    out = {}
    for j, it in enumerate(items):
        s = np.asarray(sums[j], dtype=np.float64)
        n = (s[0], s[1])
        share = 0.5
        if min(n) >= PILOT_MIN_ARM and tau / (n[0] + n[1]) <= 0.05:
            share = float(np.clip(n[1] / (n[0] + n[1]), 0.05, 0.95))
        mean = [mid, mid]
        for a in (0, 1):
            if n[a] >= PILOT_MIN_ARM and tau / n[a] <= 0.05:
                mean[a] = mid + half * float(np.clip(s[2 + a] / n[a], -1.0, 1.0))
        out[it] = ItemShape(treated_share=share, mean=(mean[0], mean[1]),
                            sd=(half * float(sds[j, 0]), half * float(sds[j, 1])))
    return out


#: an arm keeps its own pilot variance where the pilot's noise on it is at most this fraction of it
ARM_VAR_NOISE = 0.1
#: the pooled variance is taken as it is where its noise's std is at most this fraction of it (else an
#: upper bound)
POOLED_VAR_NOISE = 1.0


def _arm_sds(sums: np.ndarray, tau: float, *, default: float) -> np.ndarray:
    """(items, 2) outcome SDs in scaled units ([-1, 1]) from the summed pilot (see :func:`pilot_shapes`).
    Arms counting fewer than :data:`PILOT_MIN_ARM` take ``default``."""
    n = sums[:, 0:2]
    ok = n >= PILOT_MIN_ARM
    safe = np.where(ok, n, 1.0)
    m = np.clip(sums[:, 2:4] / safe, -1.0, 1.0)
    ss = sums[:, 4:6] - m * sums[:, 2:4]  # the arm's sum of squared deviations, noisy
    var = ss / safe
    noise = tau * np.sqrt(1.0 + 4.0 * m * m) / safe  # std of var's noise (Σy², and Σy through m²)
    out = np.full(n.shape, float(default))
    if ok.any():
        big_n = float(n[ok].sum())
        pooled = float(ss[ok].sum()) / big_n
        pooled_noise = tau * math.sqrt(float((1.0 + 4.0 * m[ok] ** 2).sum())) / big_n
        if pooled > 0 and pooled_noise <= ARM_VAR_NOISE * pooled:  # resolved as an arm's own would be
            fallback = min(math.sqrt(pooled), 1.0)
        elif pooled > 0 and pooled_noise <= POOLED_VAR_NOISE * pooled:  # roughly: never above the default
            fallback = min(math.sqrt(pooled), default)  # (chosen where the noise inflated it, it could be)
        else:  # not resolved: an upper bound, never above the default
            fallback = min(math.sqrt(max(pooled, 0.0) + pooled_noise), default)
        own = ok & (var > 0) & (noise <= ARM_VAR_NOISE * var)
        out = np.where(ok, fallback, out)
        out = np.where(own, np.sqrt(np.clip(var, 0.0, 1.0)), out)
    return out


def pilot_forecast(institutions, cfg, items: Sequence[str], *, rng: np.random.Generator | None = None,
                   draws: int = 3, seed: int = 0) -> tuple[Forecast, PilotPlan]:
    """The forecast with the pilot, in-process (benchmarks and tests; the CLI charges each
    institution's ledger first, ``simulations/causal_cli.py``): each institution's
    :func:`pilot_release` with the plan's σ, the sum, :func:`pilot_shapes`, and the stand-in run of
    the main run's configuration (ε = ``main_epsilon``). ``cfg`` must be resolved."""
    from dataclasses import replace

    from fedrec.common.causal.sensitivity import pilot_bound
    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.release import noise_share

    plan = pilot.pilot_plan(cfg)
    event = None
    if plan.noise_multiplier > 0:
        event = GaussianEvent(noise_multiplier=plan.noise_multiplier, sensitivity=pilot_bound(len(items)))
    share = noise_share(cfg.noise_mode, cfg.n_min or len(institutions))
    total = sum(pilot.pilot_release(d, items, event=event, noise_share=share, generator=rng) for d in institutions)
    study = institutions[0].study
    shapes = pilot_shapes(total, items, study.outcome_bounds,
                          noise_std=pilot.pilot_noise_std(plan, len(items), len(institutions), cfg.noise_mode,
                                                    cfg.n_min or len(institutions)))
    main_cfg = replace(cfg, epsilon=plan.main_epsilon) if cfg.dp else cfg
    fc = forecast_half_widths(study, main_cfg, items, declared_people_per_item(institutions, items), draws=draws,
                              seed=seed, shapes=shapes)
    return fc, plan
