"""The privacy audit: the one-run bound, canary audits of the real mechanisms, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy.stats import binom

from fedrec.client.guard import open_guard
from fedrec.common.config import RunConfig
from fedrec.common.privacy.accountant import DPSGDEvent, calibrate_noise_multiplier, epsilon_for, gaussian_epsilon
from fedrec.server.audit import (
    audit_ceiling,
    audit_mechanism,
    dpsgd_canary_scores,
    epsilon_lower_bound,
    gaussian_canary_scores,
    p_value_dp_audit,
    run_audit,
)

DELTA = 1e-5


# ------------------------------------------------------------------------- the bound
def test_bound_known_answers():
    # δ = 0 and every guess right: P[Bin(r, q) >= r] = q^r = 0.05  ->  ε = log(q / (1 - q))
    for r in (100, 1000):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)
    # δ = 0: the p-value is exactly the binomial tail
    q = 1 / (1 + math.exp(-1.0))
    assert p_value_dp_audit(m=500, r=200, v=150, epsilon=1.0, delta=0.0) == pytest.approx(binom.sf(149, 200, q))
    # the δ term only adds; a weaker null (larger ε) explains more: p grows with ε; chance-level
    # guessing proves nothing
    assert p_value_dp_audit(m=500, r=200, v=150, epsilon=1.0, delta=1e-3) > binom.sf(149, 200, q)
    ps = [p_value_dp_audit(m=1000, r=400, v=300, epsilon=e, delta=DELTA) for e in (0.0, 0.5, 1.0, 2.0)]
    assert ps == sorted(ps) and ps[0] < 0.05 < ps[-1]
    assert epsilon_lower_bound(m=1000, r=400, v=200, delta=DELTA) == 0.0
    # more correct guesses, more canaries -> a higher bound; the 2mδ term caps it
    assert epsilon_lower_bound(m=10_000, r=5000, v=5000, delta=DELTA) > epsilon_lower_bound(
        m=1000, r=500, v=500, delta=DELTA
    )
    assert audit_ceiling(m=2_000_000, delta=1e-5, detect_fraction=1.0) < 8.0  # log(1/δ)-ish ceiling


def test_bound_is_sound_for_pure_dp_randomized_response():
    """ε-DP randomized response: the 95 % lower bound exceeds ε in at most ~5 % of runs."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 400, 200
    keep = math.exp(eps) / (1 + math.exp(eps))
    over, bounds = 0, []
    for _ in range(trials):
        s = rng.random(m) < 0.5
        out = np.where(rng.random(m) < keep, s, ~s)  # guess = the mechanism's output
        v = int((out == s).sum())
        lb = epsilon_lower_bound(m=m, r=m, v=v, delta=0.0)
        bounds.append(lb)
        over += lb > eps
    assert over <= 0.05 * trials + 3 * math.sqrt(0.05 * 0.95 * trials)
    assert np.median(bounds) > 0.3  # and it has power


def test_bound_is_sound_for_the_gaussian_mechanism():
    """(ε(δ), δ)-DP Gaussian release audited with canaries: the bound stays below ε(δ)."""
    sigma = 1.0
    claimed = gaussian_epsilon(noise_multiplier=sigma, delta=DELTA)  # ≈ 4.38
    bounds = []
    for seed in range(12):
        res, _, _ = audit_mechanism(
            lambda m, s: gaussian_canary_scores(m=m, releases=[(sigma, 1)], sensitivity=1.0, seed=s),
            m=4000, delta=DELTA, seed=seed,
        )
        bounds.append(res.empirical_epsilon_lower_bound)
    assert sum(b > claimed for b in bounds) <= 2
    assert np.median(bounds) > 0.5


# ------------------------------------------------------- audits of the real mechanisms
def test_dpsgd_audit_passes_correct_and_flags_broken():
    q, steps, sigma = 0.5, 10, 3.0
    claimed = epsilon_for([DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=DELTA)

    def run(**broken):
        return audit_mechanism(
            lambda m, s: dpsgd_canary_scores(m=m, schedule=[(sigma, q, steps)], clip_norm=1.0, seed=s, **broken),
            m=6000, delta=DELTA, seed=7,
        )[0]

    assert 1.5 < claimed < 4.0
    ok = run()
    assert ok.empirical_epsilon_lower_bound <= claimed
    for broken in ({"noise_scale": 0.0}, {"clipping": False}, {"noise_scale": 0.05}):
        assert run(**broken).empirical_epsilon_lower_bound > claimed, broken


def test_distributed_noise_is_audited_as_a_sum():
    # n clients each adding σ/√n: the sum is the σ mechanism; with one client only it would not be
    sigma, n = 1.0, 4
    scores, inc = dpsgd_canary_scores(m=2000, schedule=[(sigma, 1.0, 4)], clip_norm=1.0, n_clients=n, seed=3)
    out = scores[~inc]
    assert np.std(out) == pytest.approx(sigma * math.sqrt(4), rel=0.1)  # σ per step (units of C), 4 steps
    assert np.mean(scores[inc]) == pytest.approx(4.0, abs=0.3)  # 1 per step (q = 1)
    single, inc1 = dpsgd_canary_scores(m=2000, schedule=[(sigma, 1.0, 4)], clip_norm=1.0, n_clients=1, seed=3)
    assert np.std(single[~inc1]) == pytest.approx(np.std(out), rel=0.1)


# -------------------------------------------------------------------- a run folder
def build_run_folder(run_dir: Path, *, epsilon: float = 3.0, rounds: int = 5, persons=(400, 800), persons_per_step=100,
                     by_node: bool = False) -> Path:
    """A results folder as the ServerApp writes it: config.json, metrics.json with per-round ε
    per institution (as claimed by each guard), and real ledgers under ledgers/."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig().override(**{
        "privacy.epsilon": epsilon, "rounds": rounds, "persons-per-step": persons_per_step,
        "institutions": len(persons),
    })
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flat()))
    guards = []
    for i, n in enumerate(persons):
        q = min(1.0, persons_per_step / n) if persons_per_step else 1.0
        sigma = calibrate_noise_multiplier(target_epsilon=epsilon, delta=cfg.privacy.delta, sample_rate=q, steps=rounds,
                                           accountant="rdp")  # fast; the claims below are PRV
        name = f"institution_{i:02d}"
        guard = open_guard(run_dir / "ledgers" / f"{name}.db", institution=name, cfg=cfg)
        guards.append((name, 100 + i, guard, DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=1)))
    history: dict = {"rounds": [], "config": cfg.to_flat()}
    claims: dict[str, float] = {}
    for r in range(1, rounds + 1):
        for name, node, guard, ev in guards:
            guard.released(guard.charge(ev, run_id="777", round=r, task="train", model="mf"))
            claims[str(node) if by_node else name] = guard.spent(delta=cfg.privacy.delta)[0]
        history["rounds"].append({"round": r, "epsilon": dict(claims)})
    (run_dir / "metrics.json").write_text(json.dumps(history))
    return run_dir


def _server_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedrec-server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedrec.server.cli"]
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def test_audit_cli_on_a_run_folder(tmp_path):
    run_dir = build_run_folder(tmp_path / "run", by_node=True)
    res = _server_cli("audit", str(run_dir), "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("audit.md", "audit.json", "audit.png"):
        assert (run_dir / name).stat().st_size > 0
    report = json.loads((run_dir / "audit.json").read_text())
    assert report["power_check"]["broken_mechanism_flagged"] is True
    assert report["power_check"]["correct_mechanism_flagged"] is False
    assert set(report["institutions"]) == {"institution_00", "institution_01"}
    for inst in report["institutions"].values():
        assert inst["accounting"]["consistent"] and not inst["accounting"]["under_claimed"]
        assert set(inst["releases"]) == {"mf_dpsgd", "gaussian_release"}
        for rel in inst["releases"].values():
            for key in ("claimed_epsilon", "empirical_epsilon_lower_bound", "confidence"):
                assert key in rel
            assert rel["confidence"] == 0.95
            assert rel["empirical_epsilon_lower_bound"] <= rel["claimed_epsilon"]
    assert report["protocol"]["secagg_enabled"] is True
    assert "Power check" in (run_dir / "audit.md").read_text()


def test_audit_catches_an_under_claimed_run(tmp_path):
    run_dir = build_run_folder(tmp_path / "run", rounds=3)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["rounds"][-1]["epsilon"]["institution_01"] *= 0.8  # the run reported less than it spent
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code = run_audit(run_dir, quick=True, console=Console(file=open(os.devnull, "w")))
    report = json.loads((run_dir / "audit.json").read_text())
    assert code == 1
    assert report["institutions"]["institution_01"]["accounting"]["under_claimed"] is True
    assert report["institutions"]["institution_00"]["accounting"]["consistent"] is True
    assert any("institution_01" in f and "below" in f for f in report["failures"])


def test_audit_rejects_a_folder_without_ledgers(tmp_path):
    from fedrec.common.errors import FedrecInputError

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.json").write_text('{"rounds": []}')
    with pytest.raises(FedrecInputError, match="no institution ledgers"):
        run_audit(tmp_path, quick=True, console=Console(file=open(os.devnull, "w")))
