"""Pictures people read (issue 33): every plot the sweep, the demo and ``fedrec-sim run`` draw
has a title, labelled axes, a legend where more than one line is drawn, the budget cap wherever
ε spent is plotted — and metrics.png shows no metric meaningless for the data (HR@10 with no
more items than k).

The checks read the matplotlib Figure objects the plotting functions build (the same objects
that are saved as PNG), not pixels.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fedrec.simulations.report import FIGURES, build_figures  # noqa: E402
from fedrec.simulations.run import metrics_figure  # noqa: E402


def _rows() -> list[dict]:
    """A small sweep's rows: 2 domains x (local, distributed) x ε {1, 4} x 2 seeds, the
    non-private and stay-alone references, rec and causal."""
    rows = []
    for d in ("health", "finance"):
        for seed in (0, 1):
            base = {"domain": d, "seed": seed, "status": "ok"}
            rows.append({**base, "task": "rec", "model": "alone", "noise_mode": "none", "epsilon": 0.0,
                         "rmse": 1.1, "ndcg10": 0.5, "epsilon_spent_max": 0.0})
            rows.append({**base, "task": "rec", "model": "mf", "noise_mode": "none", "epsilon": math.inf,
                         "rmse": 0.8, "ndcg10": 0.7, "epsilon_spent_max": ""})
            rows.append({**base, "task": "causal", "model": "aipw", "noise_mode": "none", "epsilon": math.inf,
                         "ate_abs_error": 0.1, "ci_width": 0.5, "coverage": 1.0, "policy_value_causal": 2.0,
                         "policy_value_engagement": 0.1, "policy_value_oracle": 2.2, "policy_value_random": 0.5})
            for mode in ("local", "distributed"):
                for eps in (1.0, 4.0):
                    rows.append({**base, "task": "rec", "model": "mf", "noise_mode": mode, "epsilon": eps,
                                 "rmse": 0.9 + 0.1 / eps + 0.01 * seed, "ndcg10": 0.6 + 0.02 * eps,
                                 "epsilon_spent_max": eps * 0.99})
                    rows.append({**base, "task": "causal", "model": "aipw", "noise_mode": mode, "epsilon": eps,
                                 "ate_abs_error": 1.0 / eps, "ci_width": 4.0 / eps, "coverage": 0.875,
                                 "policy_value_causal": 2.0 - 1.0 / eps, "policy_value_engagement": 0.1,
                                 "policy_value_oracle": 2.2, "policy_value_random": 0.5})
    for mode in ("local", "distributed"):  # the hybrid (LLM adapter) swept in one domain
        rows.append({"domain": "health", "seed": 0, "status": "ok", "task": "rec", "model": "hybrid",
                     "noise_mode": mode, "epsilon": 4.0, "rmse": 0.95, "ndcg10": 0.65, "epsilon_spent_max": 3.9})
    return rows


def _history(hr10: list[float], epsilon: float = 4.0) -> dict:
    eps = (lambda r: {"1": epsilon * r / 3, "2": epsilon * r / 3}) if math.isfinite(epsilon) else (lambda r: {})
    return {"config": {"dataset": "health", "institutions": 2, "privacy.epsilon": epsilon, "privacy.delta": 1e-5,
                       "privacy.noise-mode": "local"},
            "institutions": {"1": "institution_00", "2": "institution_01"},
            "rounds": [{"round": r, "rmse": 1.0 - 0.05 * r, "mae": 0.8 - 0.04 * r, "ndcg10": 0.5 + 0.05 * r,
                        "hr10": hr10[r - 1], "epsilon": eps(r)} for r in (1, 2, 3)]}


def _check_readable(fig, where: str) -> None:
    """Title, labelled axes, a legend where lines differ, the cap where ε spent is drawn."""
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    axes = [ax for ax in fig.axes if ax.has_data() or ax.texts]
    assert axes, f"{where}: an empty figure"
    for ax in axes:
        name = f"{where} / {ax.get_title() or suptitle!r}"
        assert ax.get_title().strip() or suptitle.strip(), f"{name}: no title"
        assert ax.get_xlabel().strip(), f"{name}: no x label"
        assert ax.get_ylabel().strip(), f"{name}: no y label"
        _, labels = ax.get_legend_handles_labels()
        if len(labels) > 1:
            assert ax.get_legend() is not None, f"{name}: {len(labels)} lines without a legend"
        if "ε spent" in ax.get_ylabel() and ax.has_data():
            assert any("cap" in lab for lab in labels), f"{name}: ε spent drawn without the budget cap"


def test_every_sweep_and_demo_figure_is_readable():
    figs = build_figures(_rows())
    try:
        assert [f for f, *_ in figs] == [f for f, *_ in FIGURES]  # all five drawn from these rows
        for fname, title, text, fig in figs:
            assert title and len(text) > 40, fname  # the report's heading and what the figure means
            _check_readable(fig, fname)
        # lines differ by domain and noise mode: each gets its own legend entry (not one merged line)
        rec = dict((f, fig) for f, _, _, fig in figs)["rec_quality.png"]
        labels = rec.axes[0].get_legend_handles_labels()[1]
        for d in ("health", "finance"):
            for mode in ("local", "distributed"):
                assert f"{d}, MF, {mode} noise" in labels
            assert f"{d}: non-private (ε = ∞)" in labels and any(lab.startswith(f"{d}: each institution alone")
                                                                  for lab in labels)
        for mode in ("local", "distributed"):  # the hybrid's rows are lines of their own, not merged into MF's
            assert f"health, hybrid (LLM adapter), {mode} noise" in labels
        assert not any("finance, hybrid" in lab for lab in labels)
    finally:
        for *_, fig in figs:
            plt.close(fig)


def test_the_report_draws_only_figures_its_rows_carry():
    rec_only = [r for r in _rows() if r["task"] == "rec"]
    figs = build_figures(rec_only)
    try:
        assert [f for f, *_ in figs] == ["rec_quality.png", "epsilon_spent.png"]
    finally:
        for *_, fig in figs:
            plt.close(fig)


def _panel_titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_metrics_png_is_readable_and_drops_hr10_when_it_means_nothing():
    # 8 items, k = 10: every held-out item is in the top 10 -> HR@10 is 1.0 every round, no panel
    fig = metrics_figure(_history([1.0, 1.0, 1.0]))
    try:
        _check_readable(fig, "metrics.png")
        titles = _panel_titles(fig)
        assert not any("HR@10" in t for t in titles), titles
        assert any("RMSE" in t for t in titles) and any("NDCG@10" in t for t in titles)
        eps_ax = fig.axes[-1]
        assert any("budget cap ε = 4" in lab for lab in eps_ax.get_legend_handles_labels()[1])
        # two institutions with the same ε curve: one line, labelled as both (not two identical lines)
        assert eps_ax.get_legend_handles_labels()[1].count("all 2 institutions") == 1
    finally:
        plt.close(fig)
    fig = metrics_figure(_history([0.6, 0.7, 0.8]))  # a catalogue larger than k: HR@10 means something
    try:
        _check_readable(fig, "metrics.png")
        assert any("HR@10" in t for t in _panel_titles(fig))
    finally:
        plt.close(fig)


@pytest.mark.parametrize("eps", [math.inf])
def test_metrics_png_of_a_non_private_run_says_so(eps):
    fig = metrics_figure(_history([0.6, 0.7, 0.8], epsilon=eps))
    try:
        _check_readable(fig, "metrics.png")
        assert any("non-private" in t.get_text() for t in fig.axes[-1].texts)
    finally:
        plt.close(fig)
