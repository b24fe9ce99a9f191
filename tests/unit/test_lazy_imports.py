"""Importing the Flower apps stays light (issue 31: one deployed message = one flwr-clientapp
process, which imports the ClientApp module before it runs any handler).

torch, opacus, transformers and peft load in the handlers that train or compute ε, never at
import: a SecAgg+ stage, a catalogue query or a causal step must not pay 2-5 s for them.
Checked in a fresh interpreter (this test process has them loaded already).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("torch", "opacus", "transformers", "peft")
APPS = ("fedrec.client.app", "fedrec.client.causal_app", "fedrec.client.strategy_app", "fedrec.server.app",
        "fedrec.server.causal")


def _loaded_after_import(modules: tuple[str, ...], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(k for k in {list(heavy)!r} if k in sys.modules)))\n")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_flower_apps_import_without_torch_opacus_transformers_or_peft():
    assert _loaded_after_import(APPS) == []


def test_the_client_apps_import_without_scipy_stats():
    """scipy.stats alone was ~0.5 s (idle) to ~1.8 s (loaded) of every deployed ClientApp process
    (each SecAgg+ stage of each release): the client's normal quantiles come from the stdlib."""
    assert _loaded_after_import(("fedrec.client.app",), ("scipy.stats",)) == []


def test_the_accountant_loads_opacus_only_for_subsampled_histories():
    """ε of un-subsampled Gaussian releases (every causal / strategy / count release) is closed
    form: no opacus (torch under it) in the process; a subsampled DP-SGD history is Opacus' (so
    the check above cannot pass by the accountant having silently stopped using it)."""
    code = ("import sys\n"
            "from fedrec.common.privacy.accountant import DPSGDEvent, GaussianEvent, epsilon_pair, epsilon_for\n"
            "assert 'opacus' not in sys.modules\n"
            "g = epsilon_pair([GaussianEvent(noise_multiplier=2.0, count=3)], delta=1e-5)\n"
            "print(min(g), 'opacus' in sys.modules or 'torch' in sys.modules)\n"
            "eps = epsilon_for([DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5)], delta=1e-5, "
            "accountant='rdp')\n"
            "print(eps, 'opacus' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert res.returncode == 0, res.stderr[-2000:]
    (g_eps, g_loaded), (eps, loaded) = (line.split() for line in res.stdout.strip().splitlines())
    assert g_loaded == "False" and 0 < float(g_eps) < 10
    assert loaded == "True" and 0 < float(eps) < 10
