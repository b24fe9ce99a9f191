"""fedrec-sim causal: bad --derive / --noise-mode input fails in one line, before any budget is spent."""

from __future__ import annotations

import subprocess
import sys

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
