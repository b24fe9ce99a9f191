"""Benchmarks run in their --quick form and print the agreed JSON shape (not timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(name: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"meta", "rows"} and out["rows"]
    for row in out["rows"]:
        assert all(isinstance(v, (str, int, float, bool)) or v is None for v in row.values())
    return out


def test_dp_overhead_quick():
    rows = {r["mode"]: r for r in _run("dp_overhead.py")["rows"]}
    assert {"nonprivate", "fedrec", "opacus_ghost"} <= set(rows)
    assert all(r["samples_per_s"] > 0 for r in rows.values())


def test_rec_quality_quick():
    rows = _run("rec_quality.py")["rows"]
    systems = {r["system"] for r in rows}
    assert {"popularity", "local_only", "mf_central", "mf_federated", "mf_federated_dp"} <= systems
    dp = next(r for r in rows if r["system"] == "mf_federated_dp")
    assert dp["epsilon"] == 8.0 and dp["secagg"] is True and dp["epsilon_spent_max"] <= 8.0
