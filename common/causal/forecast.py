"""Know before spending: each item's CI half-width forecast from public quantities only.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["SPREAD", "MAX_HALF_FRACTION", "Forecast", "stand_in_federation", "forecast_half_widths", "answerable",
           "declared_people_per_item", "refusal_message"]

#: the stand-in outcome's SD as a fraction of the declared range (max - min)
SPREAD = 1.0 / 12.0
#: a run cannot answer when the forecast 95% half-width reaches this fraction of
#: ``max - min`` (±10 kg on health's ±40 kg): its CI would then span a quarter of every effect the
#: bounds allow
MAX_HALF_FRACTION = 0.125


@dataclass(frozen=True)
class Forecast:
    """Forecast 95% CI half-width per item (outcome units), and what it was made from."""

    half_width: dict[str, float]
    limit: float  #: the largest possible effect, ``max - min``
    people_per_item: list[int]
    epsilon: float
    noise_mode: str

    def to_json(self) -> dict:
        return {"half_width": self.half_width, "largest_possible_effect": self.limit,
                "people_per_item_declared": self.people_per_item, "epsilon": _num(self.epsilon),
                "noise_mode": self.noise_mode, "max_half_fraction": MAX_HALF_FRACTION, "spread": SPREAD}


def _num(x: float):
    return x if math.isfinite(x) else "inf"


def stand_in_federation(study, items: Sequence[str], people_per_item: Sequence[int], *, seed: int = 0):
    """Public stand-in institutions: one per entry of ``people_per_item`` (its declared number of
    people considered for each item), built from the study declaration alone."""
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
        t = rng.integers(0, 2, rows)
        y = np.clip(mid + rng.normal(0.0, sd, rows), lo_y, hi_y)
        inter = pd.DataFrame({"person_id": pd.Series(np.tile(people["person_id"].to_numpy(), len(items)), dtype="str"),
                              "item_id": pd.Series(np.repeat(np.asarray(items, dtype=object), n), dtype="str"),
                              "exposed": t, "engagement": np.where(t == 1, 1.0, np.nan), "outcome": y,
                              "timestamp": pd.Timestamp("2024-01-01")})
        cat = pd.DataFrame({"item_id": list(items), "name": list(items), "description": list(items),
                            "category": ["stand-in"] * len(items)})
        out.append(InstitutionData(name=f"stand_in_{k}", people=people, items=cat, interactions=inter, study=study))
    return out


def forecast_half_widths(study, cfg, items: Sequence[str], people_per_item: Sequence[int], *, draws: int = 3,
                         seed: int = 0, alpha: float | None = None) -> Forecast:
    """The forecast ``1 - alpha`` CI half-width of a run of ``cfg`` (ε, noise mode, estimator,
    design) over institutions declaring ``people_per_item`` people per item: the median over
    ``draws`` stand-in federations and their items (exchangeable in the stand-in, so every item
    gets the same forecast; a single draw's width is itself noisy where the noise dominates)."""
    from dataclasses import replace

    from scipy.stats import norm

    from fedrec.simulations.causal_cli import estimate_inprocess

    run_cfg = replace(cfg, items=tuple(items))
    z = float(norm.ppf(1 - (alpha or cfg.alpha) / 2))
    widths = []
    for d in range(draws):
        insts = stand_in_federation(study, items, people_per_item, seed=seed + 2 * d)
        res = estimate_inprocess(insts, run_cfg, rng=np.random.default_rng(seed + 2 * d + 1))
        widths += [z * float(res.items[it]["se"]) for it in items]
    half = float(np.median(widths))
    limit = float(study.outcome_bounds[1] - study.outcome_bounds[0])
    return Forecast(half_width={it: half for it in items}, limit=limit,
                    people_per_item=[int(m) for m in people_per_item], epsilon=float(cfg.epsilon),
                    noise_mode=cfg.noise_mode)


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
    worst = max(fc.half_width.values())
    people = round(float(np.mean(fc.people_per_item)))
    u = f" {unit}" if unit else ""
    eps = "∞" if not math.isfinite(fc.epsilon) else f"{fc.epsilon:g}"
    return (f"this run cannot answer: at ε = {eps}, {fc.noise_mode} noise, ~{people:,} people per item at each of "
            f"{len(fc.people_per_item)} institutions and {len(fc.half_width)} item(s), the 95% CI will be about "
            f"±{worst:.3g}{u} on effects of at most ±{fc.limit:.3g}{u} (refused above ±{MAX_HALF_FRACTION * fc.limit:.3g}); "
            "fix: use --noise-mode distributed, a larger --epsilon, fewer items (--item), or more people; "
            "or --force to spend the budget anyway")
