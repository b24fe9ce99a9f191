"""fedrec-sim causal: bad --derive / --noise-mode input fails in one line, before any budget is spent."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def _sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrec.simulations.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def finance(tmp_path_factory):
    out = tmp_path_factory.mktemp("fin") / "data"
    proc = _sim("generate", "--domain", "finance", "--institutions", "2", "--people", "400", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize(("args", "expect"), [
    (["--derive", "bogus(x)"], "derived feature 'bogus(x)'"),
    (["--derive", "at_min(nope)"], "'nope', which study.toml does not declare"),
    (["--noise-mode", "central"], "--noise-mode"),
])
def test_bad_causal_options_fail_before_any_budget_is_spent(finance, tmp_path, args, expect):
    out = tmp_path / "out"
    proc = _sim("causal", "--data", str(finance), "--item", "job_training", "--out", str(out), *args)
    assert proc.returncode == 2
    assert expect in proc.stdout + proc.stderr
    assert not (out / "ledgers").exists()  # nothing charged


# ------------------------------------------------------------------ design and knobs (no Flower)
@pytest.fixture(scope="module")
def health():
    from fedrec.simulations.domains import domain_federation

    institutions, _ = domain_federation("health", institutions=2, people=300, seed=3, skew=0.5)
    return institutions


def test_the_study_declared_design_is_the_default_and_flags_replace_it(health):
    from fedrec.simulations.causal_cli import resolve_config

    study = health[0].study
    assert study.causal_derived == ("ratio(weight_kg,height_cm,2)[12e-4,60e-4]",)  # health declares BMI
    cfg, source = resolve_config(health)
    assert source == "study.toml [causal]"
    assert cfg.covariates == study.causal_covariates and "weight_kg" not in cfg.covariates
    assert cfg.derived == study.causal_derived
    cfg, source = resolve_config(health, overrides={"derived": ("log1p(age)",)})
    assert source == "--covariates/--derive" and cfg.covariates is None and cfg.derived == ("log1p(age)",)
    cfg, _ = resolve_config(health, overrides={"covariates": ("age", "female")})
    assert cfg.covariates == ("age", "female") and cfg.derived == ()


def test_set_changes_a_knob_and_keeps_the_rest(health):
    from fedrec.simulations.causal_cli import resolve_config

    base, _ = resolve_config(health, epsilon=2.0)
    cfg, _ = resolve_config(health, epsilon=2.0, settings=["causal.expert.psi-noise-ratio=0.25", "expert.share-influence=0.3",
                                                            "expert.newton-steps=3", "expert.whiten-weighted=false"])
    assert (cfg.psi_noise_ratio, cfg.share_influence, cfg.newton_steps, cfg.whiten_weighted) == (0.25, 0.3, 3, False)
    changed = {k for k, v in cfg.to_flat().items() if base.to_flat()[k] != v}
    assert changed == {"causal.expert.psi-noise-ratio", "causal.expert.share-influence", "causal.expert.newton-steps",
                       "causal.expert.whiten-weighted"}
    assert cfg.epsilon == 2.0 and cfg.derived == base.derived  # flags and the study design survive --set


@pytest.mark.parametrize(("setting", "expect"), [
    ("expert.psi-noise-ratio", "not KEY=VALUE"),
    ("causal.expert.psi-noise-ratoi=0.3", "did you mean causal.expert.psi-noise-ratio?"),
    ("psi-noise-ratio=0.3", "did you mean causal.expert.psi-noise-ratio?"),  # an expert knob's old key
    ("outcome-anchor=pooled", "unknown knob causal.outcome-anchor"),  # a removed knob
    ("share-jacobian=0.05", "unknown knob causal.share-jacobian"),
    ("epsilon=3", "use --epsilon"),
    ("derived=[]", "use --derive"),
    ("expert.psi-noise-ratio=abc", "is a number"),
    ("expert.newton-steps=2.5", "is a whole number"),
    ("expert.whiten-weighted=maybe", "true or false"),
    ("expert.psi-noise-ratio=nan", "finite"),
    ("expert.psi-noise-ratio=-1", "psi_noise_ratio must be >= 0"),
    ("expert.trim-low=0.97", "trim must be 0 < trim-low < trim-high < 1"),
    ("expert.accountant=gdp", "accountant 'gdp': use one of prv, rdp"),
    ("expert.psi-tail=0", "psi_tail must be in (0, 1)"),
    ("expert.psi-clip-tail=1.5", "psi_clip_tail must be in (0, 1)"),
])
def test_bad_settings_are_one_line_errors(health, setting, expect):
    from fedrec.common.errors import FedrecInputError
    from fedrec.simulations.causal_cli import resolve_config

    with pytest.raises(FedrecInputError) as info:
        resolve_config(health, settings=[setting])
    assert expect in str(info.value) and "fix:" in str(info.value) and "\n" not in str(info.value)


def test_bad_set_fails_before_any_budget_is_spent(finance, tmp_path):
    out = tmp_path / "out"
    proc = _sim("causal", "--data", str(finance), "--item", "job_training", "--out", str(out),
                "--set", "expert.psi-tail=lots")
    assert proc.returncode == 2 and "causal.expert.psi-tail is a number" in proc.stdout + proc.stderr
    assert not out.exists()  # nothing charged, nothing written


def test_every_knob_is_documented():
    """docs/causal.md lists every run-config key CausalConfig reads: the analyst's under "The
    analyst's knobs", the expert ones (``causal.expert.<key>``) under "Expert knobs"."""
    from pathlib import Path

    from fedrec.common.causal.config import CausalConfig

    doc = (Path(__file__).resolve().parents[2] / "docs" / "causal.md").read_text(encoding="utf-8")
    analyst = doc.split("## The analyst's knobs", 1)[1].split("\n## ", 1)[0]
    expert = doc.split("### Expert knobs", 1)[1].split("\n## ", 1)[0]
    keys = list(CausalConfig().to_flat())
    missing = [k for k in keys if not k.startswith("causal.expert.") and f"`{k}`" not in analyst]
    missing += [k for k in keys if k.startswith("causal.expert.") and f"`{k[len('causal.expert.'):]}`" not in expert]
    assert not missing, f"undocumented knobs: {missing}"


def test_a_results_folder_with_spent_ledgers_is_refused_in_one_line(finance, tmp_path):
    """Re-running into a results folder that already holds a run would charge its ledgers
    twice; the CLI refuses first (exit 2), in one line, and touches nothing."""
    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.ledger import PrivacyLedger

    out = tmp_path / "out"
    (out / "ledgers").mkdir(parents=True)
    ledger = PrivacyLedger.initialize(out / "ledgers" / "institution_00.db", institution="institution_00",
                                      epsilon_cap=1.02, delta_cap=1e-5)
    ledger.charge(GaussianEvent(noise_multiplier=4.0), run_id="earlier", round=1, task="causal", model="causal")
    before = sorted(p.name for p in out.rglob("*"))
    proc = _sim("causal", "--data", str(finance), "--item", "job_training", "--out", str(out))
    assert proc.returncode == 2
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "already holds a run" in ln]
    assert len(lines) == 1 and "nothing was charged" in lines[0] and "fix: give a new --out" in lines[0]
    assert sorted(p.name for p in out.rglob("*")) == before
    assert len(PrivacyLedger(out / "ledgers" / "institution_00.db").events()) == 1

# ------------------------------------------------------------------ know before spending (issue 29)
def test_the_forecast_refuses_the_new_user_scenario_before_any_budget_is_spent(tmp_path):
    """health, 4 x 1,000, ε = 1, local noise, every item (the CLI's defaults): refused with the
    forecast and the fixes in one line, before the run's budget is spent: each ledger holds the
    charged pilot only; the same federation with distributed noise at ε = 4 is forecast to answer."""
    from fedrec.simulations.forecast import answerable, pilot_forecast
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.common.datasets import write_institution
    from fedrec.common.errors import FedrecInputError
    from fedrec.simulations.causal_cli import causal_command, resolve_config
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("health", institutions=4, people=4000, seed=9601, skew=0.4)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)

    class Console:
        lines: list = []

        def print(self, *a, **k):
            self.lines.append(" ".join(map(str, a)))

    out = tmp_path / "out"
    with pytest.raises(FedrecInputError, match="cannot answer") as err:
        causal_command(data, None, 1.0, "aipw", False, out, 0, Console())
    msg = str(err.value)
    assert "\n" not in msg and "--noise-mode distributed" in msg and "--force" in msg and "kg" in msg
    assert "only the pilot" in msg
    assert any("forecast after the pilot" in line and "before the run's budget is spent" in line
               for line in Console.lines)
    for d in insts:  # the pilot, nothing of the run
        assert [r.task for r in PrivacyLedger(out / "ledgers" / f"{d.name}.db").rows()] == ["causal-pilot"]
    items = sorted(insts[0].items["item_id"].astype(str))
    cfg, _ = resolve_config(insts, epsilon=4.0, overrides={"noise_mode": "distributed"})
    assert answerable(pilot_forecast(insts, cfg.resolved(4), items, rng=np.random.default_rng(9601))[0])


def test_the_forecast_is_within_25_percent_of_the_measured_width_where_noise_dominates():
    """One item at ε = 1, local noise, 8 x 2,500 (health): the pilot forecast (what the CLI
    prints) against the median measured 95% half-width of the run at the ε the pilot leaves, over
    3 seeds. Other cells: docs/causal.md, Know before spending."""
    from dataclasses import replace

    from fedrec.simulations.forecast import pilot_forecast
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config
    from fedrec.simulations.domains import domain_federation

    item, widths = "smoking_cessation", []
    for seed in (9701, 9702, 9703):
        insts, _ = domain_federation("health", institutions=8, people=20000, seed=seed, skew=0.4)
        cfg, _ = resolve_config(insts, epsilon=1.0, item=item)
        fc, plan = pilot_forecast(insts, cfg.resolved(8), [item], rng=np.random.default_rng([seed, 7]))
        widths.append(1.959963984540054 * estimate_inprocess(insts, replace(cfg, epsilon=plan.main_epsilon),
                                                             rng=np.random.default_rng(seed)).items[item]["se"])
    assert fc.half_width[item] == pytest.approx(float(np.median(widths)), rel=0.25)
