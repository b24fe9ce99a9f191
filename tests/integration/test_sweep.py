"""``fedrec-sim sweep`` end to end on a tiny grid (real Flower simulations for the rec cells),
and the reproducibility of ``fedrec-sim run --seed``.

Tiny grid: health, ε ∈ {1, inf}, 1 seed, 2 institutions, 1 round, local noise, MF -> 5 cells:
rec (alone, ε = 1, ε = inf: two Flower runs) and causal (ε = 1, ε = inf, in-process). The hybrid
(LLM adapter) rows are tested by the adapter's own tests: an adapter Flower run per cell would
double this file's time.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrec.simulations.cli import app as sim_cli

pytestmark = pytest.mark.slow

TINY = ["sweep", "--domains", "health", "--epsilon", "1,inf", "--seeds", "1", "--institutions", "2", "--rounds", "1",
        "--people", "600", "--noise-modes", "local", "--models", "mf", "--jobs", "2", "--quiet"]
CELLS = 5


def sweep(out: Path, *extra: str):
    return CliRunner().invoke(sim_cli, [*TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    t0 = time.monotonic()
    res = sweep(out)
    assert res.exit_code == 0, res.output
    return out, res.output, time.monotonic() - t0


def test_tiny_sweep_writes_csv_plots_and_reports(tiny):
    out, output, _ = tiny
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == CELLS and all(r["status"] == "ok" for r in rows), rows
    by = {(r["task"], r["model"], r["epsilon"]): r for r in rows}
    dp, ref, alone = by[("rec", "mf", "1.0")], by[("rec", "mf", "inf")], by[("rec", "alone", "0.0")]
    for r in (dp, ref, alone):
        assert 0 < float(r["rmse"]) < 3 and 0 <= float(r["ndcg10"]) <= 1
    assert 0 < float(dp["epsilon_spent_max"]) <= 1.0 * 1.02  # the ledgers' ε, under the cap
    c = by[("causal", "aipw", "1.0")]
    assert float(c["ci_width"]) > float(by[("causal", "aipw", "inf")]["ci_width"]) > 0  # DP noise widens CIs
    assert 0 <= float(c["coverage"]) <= 1 and c["policy_value_causal"] and c["policy_value_engagement"]
    for png in ("rec_quality", "epsilon_spent", "causal_accuracy", "coverage", "policy_value"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 5000
    md = (out / "report.md").read_text()
    assert "## Figures" in md and "plots/rec_quality.png" in md and "| domain |" in md
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["commit"] and meta["command"].startswith("fedrec-sim sweep")
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["rec-health-mf-local-eps1-seed0",
                                                               "rec-health-mf-none-epsinf-seed0"]
    assert (out / "runs" / "rec-health-mf-local-eps1-seed0" / "ledgers" / "institution_00.db").exists()


class _Checker(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.seen: list[str] = []
        self.images: list[str] = []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
            if not a.get("alt"):
                self.errors.append("img without alt")
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("data:"):
                self.errors.append(f"external reference {k}={v[:40]}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_report_html_is_self_contained_and_valid(tiny):
    out, _, _ = tiny
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"(?i)https?://|//[a-z0-9.-]+\.[a-z]{2,}/|<script|<link|<iframe|@import|url\(", text)
    chk = _Checker()
    chk.feed(text)
    chk.close()
    assert chk.doctype and not chk.errors and not chk.stack, (chk.errors, chk.stack)
    assert chk.seen[:3] == ["html", "head", "meta"] and chk.seen.count("title") == 1 and chk.seen.count("body") == 1
    assert '<html lang="en">' in text and '<meta charset="utf-8">' in text
    assert len(chk.images) == 5 and all(s.startswith("data:image/png;base64,") for s in chk.images)


def test_a_second_run_reuses_every_finished_cell(tiny):
    out, _, _ = tiny
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    t0 = time.monotonic()
    res = sweep(out)
    assert res.exit_code == 0, res.output
    assert f"{CELLS} finished before, skipped; 0 to run" in res.output
    assert time.monotonic() - t0 < 30
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before


def test_an_interrupted_sweep_resumes_only_what_was_missing(tiny):
    """An interrupted sweep has some cells' files and none of the others (each is written
    atomically when its cell ends): re-running runs exactly the missing ones."""
    out, _, _ = tiny
    lost = out / "cells" / "causal-health-aipw-local-eps1-seed0.json"
    kept_row = json.loads(lost.read_text())
    lost.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    res = sweep(out)
    assert res.exit_code == 0, res.output
    assert f"{CELLS - 1} finished before, skipped; 1 to run" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json") if p.name != lost.name} == before
    again = json.loads(lost.read_text())
    for k in ("ate_abs_error", "ci_width", "coverage", "policy_value_causal"):
        assert again[k] == kept_row[k], k  # seeded: the re-run cell gives the same numbers


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedrec-sim")  # the error line goes to the real stderr
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_a_folder_of_another_sweep_and_bad_input_are_one_line_errors(tiny, tmp_path):
    out, _, _ = tiny
    res = _cli(*TINY, "--out", str(out), "--people", "800")  # the later option wins: other fixed settings
    assert res.returncode != 0 and "holds a sweep with --people 600" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = _cli("sweep", "--epsilon", "0,1", "--out", str(tmp_path / "x"))
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1 and "--epsilon" in res.stderr


def _run_cmd(out: Path) -> subprocess.Popen:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).with_name("fedrec-sim")
    return subprocess.Popen([str(exe), "run", "--domain", "health", "-k", "3", "-r", "2", "--epsilon", "1",
                             "--set", "people=600", "--seed", "7", "--quiet", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_simulations_with_the_same_seed_give_identical_metrics(tmp_path):
    """`fedrec-sim run --seed 7` twice (in parallel), over SecAgg+: the same numbers to the last
    bit, DP noise and SecAgg+'s stochastic rounding included (in a simulation ``--seed`` also sets
    ``sim.noise-seed``, which seeds the rounding per node, round and slot: unseeded, it moved RMSE
    in the 7th digit; client/secagg_mod.rounding_rng, tests/integration/test_secagg_reproducible.py)."""
    procs = [_run_cmd(tmp_path / name) for name in ("a", "b")]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert len(a["rounds"]) == len(b["rounds"]) == 2
    for ra, rb in zip(a["rounds"], b["rounds"]):
        assert ra["contributors"] == rb["contributors"] == 3  # every node's masked update in the sum
        for key in ("rmse", "mae", "ndcg10", "hr10"):
            assert ra[key] == rb[key], key
        assert sorted(ra["epsilon"].values()) == sorted(rb["epsilon"].values())
    assert a["rounds"][0]["rmse"] != a["rounds"][1]["rmse"]
