"""Know before spending (issue 29): the forecast is of the interval the run prints, and its
Monte Carlo draws are its own.

* The run cuts an interval reaching past ``±(max - min)`` to that range (``server/causal.py``,
  ``cut_to_possible_range``); the forecast's stand-in runs the same server code, so its
  half-width must be the cut one, never ``z`` x SE of a CI the run would not print.
* Each forecast's stand-in draws follow its ``seed``: two runs' forecasts share their Monte Carlo
  error only when they share it (the benchmark's "median over seeds" was over one set of draws).
* The benchmark's per-run comparison and its oracle ceilings, against hand counts.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _study_and_items():
    from fedrec.simulations.domains import domain_federation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        insts, truth = domain_federation("health", institutions=2, people=400, seed=4242, skew=0.4)
    return insts, list(truth.item_ids)[:2]


def _cfg(insts, items, epsilon: float, mode: str = "local"):
    from fedrec.simulations.causal_cli import resolve_config

    cfg, _ = resolve_config(insts, epsilon=epsilon, overrides={"noise_mode": mode})
    from dataclasses import replace

    return replace(cfg.resolved(len(insts)), items=tuple(items))


def test_the_forecast_is_cut_to_the_possible_range_as_the_run_cuts_its_interval():
    """2 institutions x 40 people per item at ε = 0.05: z x SE runs far past the largest possible
    effect (±80 kg); the interval the run would print stops at ±80, and so must the forecast."""
    from fedrec.simulations.forecast import forecast_half_widths

    insts, items = _study_and_items()
    study = insts[0].study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = forecast_half_widths(study, _cfg(insts, items, 0.05), items, [40, 40], draws=1, seed=3)
    limit = study.outcome_bounds[1] - study.outcome_bounds[0]
    assert fc.limit == limit
    assert fc.se_half_width is not None
    assert max(fc.se_half_width.values()) > 2 * limit  # the uncut width: past anything possible
    for it in items:
        assert fc.half_width[it] <= limit * (1 + 1e-12)  # the printed interval spans at most [-L, L]
        assert fc.half_width[it] <= fc.se_half_width[it]


def test_the_uncut_forecast_equals_z_times_se_where_nothing_is_cut():
    """Where no interval reaches the possible range (ε = ∞), the printed half-width is z x SE."""
    from fedrec.simulations.forecast import forecast_half_widths

    insts, items = _study_and_items()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = forecast_half_widths(insts[0].study, _cfg(insts, items, math.inf), items, [200, 200], draws=1, seed=5)
    assert fc.se_half_width is not None
    for it in items:
        assert fc.half_width[it] == pytest.approx(fc.se_half_width[it], rel=1e-9)
        assert fc.half_width[it] < fc.limit / 8


def test_the_stand_in_draws_follow_the_seed():
    """Same seed: the same forecast (the draws are reproducible); another seed: other draws, so
    two runs' forecasts do not share one Monte Carlo error."""
    from fedrec.simulations.forecast import forecast_half_widths

    insts, items = _study_and_items()
    cfg = _cfg(insts, items, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = forecast_half_widths(insts[0].study, cfg, items, [100, 100], draws=1, seed=11)
        b = forecast_half_widths(insts[0].study, cfg, items, [100, 100], draws=1, seed=11)
        c = forecast_half_widths(insts[0].study, cfg, items, [100, 100], draws=1, seed=11000)
    assert a.half_width == b.half_width
    assert a.half_width != c.half_width


def _bench():
    path = ROOT / "benchmarks" / "causal_forecast.py"
    spec = importlib.util.spec_from_file_location("fedrec_forecast_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_counts_each_run_against_its_own_width_and_the_oracle_ceiling():
    """One item, three runs: measured 1.0, 1.1, 4.0; each run's forecast 1.0, 2.0, 4.0.
    By hand: own forecast within 25% for runs 0 and 2 (2/3); leave-one-out oracle (median of the
    other two: 2.55, 2.5, 1.05) for none; the median of all (1.1) for runs 0 and 1."""
    bench = _bench()
    cell = [{"seed": s, "forecast": {"x": f}, "measured": {"x": m}}
            for s, f, m in ((1, 1.0, 1.0), (2, 2.0, 1.1), (3, 4.0, 4.0))]
    got = bench.per_run_counts(cell, ["x"])
    assert got == {"runs_within_25pct": 2, "oracle_loo_runs_within_25pct": 0,
                   "oracle_median_runs_within_25pct": 2, "runs": 3}
