"""The mutation suite runs in `make test`: every mutant of tests/mutation/mutants.toml is killed.

Also checks the runner itself, so that "killed" keeps meaning something: a mutant whose `find`
no longer applies is stale (a failure), a scratch copy that would import the original code
instead of the mutated one is refused, and pytest's per-test outcomes are read correctly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import run_mutants as rm

#: the breakages issue 27 names that are stable now; deleting one from the toml fails here
REQUIRED = {
    "secagg-no-pairwise-masks",
    "secagg-no-self-mask",
    "ate-sampling-se-doubled",
    "clip-rows-bound-x10",
    "person-clip-bound-x10",
    "noise-local-sigma-over-10",
    "noise-distributed-over-n-min",
    # the institution's policy and release path
    "mf-handler-noise-over-10",
    "distributed-share-over-n-min-squared",
    "causal-handler-noise-over-10",
    "guard-skips-the-ledger-charge",
    "policy-accepts-non-private-runs",
    "policy-ignores-max-run-epsilon",
    "guard-creates-a-missing-ledger",
    "policy-ignores-round-size",
    "holder-unmasks-below-n-min",
    "no-up-front-plan-check",
    "error-text-reaches-the-server",
    "mf-offset-from-the-data",
}


def test_every_mutant_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    r = subprocess.run([rm.default_python(), str(Path(rm.__file__)), "--json", str(out)], cwd=rm.REPO,
                       capture_output=True, text=True, timeout=900)
    table = r.stdout.split("\n{", 1)[0]
    assert out.exists(), f"runner wrote no summary (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    assert summary["baseline"]["status"] == "passed", f"kill tests fail on the unmutated code:\n{table}"
    not_killed = {m["id"]: (m["status"], m["detail"]) for m in summary["mutants"] if m["status"] != "killed"}
    assert not not_killed, f"mutants not killed: {not_killed}\n{table}"
    assert REQUIRED <= {m["id"] for m in summary["mutants"]}
    assert summary["ok"] and summary["killed"] == summary["total"] and r.returncode == 0


def test_a_mutant_that_no_longer_applies_is_stale(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("x = 1\ny = 1\nz = 2\n")
    assert "occurs 0 times" in rm.apply_edits(tmp_path, [rm.Edit("m.py", "w = 3", "w = 4")])
    assert "occurs 2 times" in rm.apply_edits(tmp_path, [rm.Edit("m.py", " = 1", " = 5")])
    assert "no such file" in rm.apply_edits(tmp_path, [rm.Edit("gone.py", "a", "b")])
    assert rm.apply_edits(tmp_path, [rm.Edit("m.py", "z = 2", "z = 3")]) is None
    assert (tmp_path / "m.py").read_text() == "x = 1\ny = 1\nz = 3\n"


def test_every_mutant_applies_to_the_current_code(tmp_path: Path) -> None:
    """Cheap pre-check of the full run (which reports it too): no mutant has rotted."""
    for m in rm.load_mutants():
        for e in m.edits:
            n = (rm.REPO / e.file).read_text(encoding="utf-8").count(e.find)
            assert n == 1, f"{m.id}: find occurs {n} times in {e.file}"


def test_the_scratch_copy_and_not_the_original_is_under_test(tmp_path: Path) -> None:
    files, pdirs = rm.source_files(), rm.package_dirs()
    assert {"fedrec.common", "fedrec.client", "fedrec.server", "fedrec.simulations"} <= set(pdirs)
    assert not any(f.startswith((".venv/", "results/")) for f in files)
    root = rm.make_scratch(tmp_path, "guard", files, pdirs)
    py = rm.default_python()
    assert rm.check_importable(py, root, pdirs) is None
    # without the scratch package the editable install maps fedrec.* to the original folders:
    # both the pre-check and the in-session guard must refuse
    shutil.rmtree(root / "_pkg" / "fedrec")
    why = rm.check_importable(py, root, pdirs)
    assert why is not None and "not the scratch copy" in why
    code, output = rm.run_pytest(py, root, ["tests/unit/test_gaussian.py::test_noise_std_by_mode"], timeout=300)
    assert code == 4 and "mutation guard" in output
    assert rm.judge(code, output, ["tests/unit/test_gaussian.py::test_noise_std_by_mode"], "all",
                    baseline=False).status == "invalid"


def test_outcomes_are_read_per_named_test() -> None:
    a, b = "tests/unit/t.py::test_a", "tests/unit/t.py::test_b"
    both_fail = f"FAILED {a}[1] - AssertionError: x\nPASSED {a}[2]\nERROR {b} - RuntimeError\n"
    assert rm.judge(1, both_fail, [a, b], "all", baseline=False).status == "killed"
    one_fails = f"PASSED {a}[1]\nPASSED {a}[2]\nFAILED {b} - AssertionError\n"
    r = rm.judge(1, one_fails, [a, b], "all", baseline=False)
    assert r.status == "survived" and r.passing == [a]
    assert rm.judge(1, one_fails, [a, b], "any", baseline=False).status == "killed"
    assert rm.judge(0, f"PASSED {a}[1]\nPASSED {b}\n", [a, b], "all", baseline=False).status == "survived"
    assert rm.judge(1, f"FAILED {a}\n", [a, b], "all", baseline=False).status == "invalid"  # b never ran
    assert rm.judge(2, "ERROR tests/unit/t.py - SyntaxError\n", [a], "all", baseline=False).status == "invalid"
    assert rm.judge(None, "", [a], "all", baseline=False).status == "timeout"
    assert rm.judge(0, f"PASSED {a}\nPASSED {b}\n", [a, b], "all", baseline=True).status == "passed"
    assert rm.judge(0, f"PASSED {a}\nSKIPPED {b}\n", [a, b], "all", baseline=True).status == "failed"
    # a prefix of another test's name is not that test
    assert rm.per_test(f"FAILED {a}_more\n", [a])[0] == {a: []}


@pytest.mark.parametrize("bad,match", [
    ('id = "x"\nfile = "f"\nfind = "a"\nreplace = "b"\nwhy = "w"\n', "missing 'kills'"),
    ('id = "x"\nfile = "f"\nfind = "a"\nreplace = "b"\nwhy = "w"\nkills = ["tests/unit/t.py"]\n', "node ids"),
    ('id = "x"\nfile = "f"\nfind = "a"\nreplace = "a"\nwhy = "w"\nkills = ["tests/unit/t.py::t"]\n', "differs"),
    ('id = "x"\nfile = "f"\nfind = "a"\nreplace = "b"\nwhy = "w"\nkills = ["tests/mutation/t.py::t"]\n', "recurse"),
])
def test_malformed_mutants_are_refused(tmp_path: Path, bad: str, match: str) -> None:
    p = tmp_path / "m.toml"
    p.write_text("[[mutant]]\n" + bad)
    with pytest.raises(ValueError, match=match):
        rm.load_mutants(p)


def test_list_names_every_mutant() -> None:
    r = subprocess.run([sys.executable, str(Path(rm.__file__)), "--list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for m in rm.load_mutants():
        assert m.id in r.stdout
