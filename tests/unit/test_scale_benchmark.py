"""benchmarks/scale.py says why a size failed: the nodes' drop reasons and refusal codes, counted
from the server's warnings and the run's whole error text (issue 33: a row, not a traceback)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCALE = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


def _scale():
    spec = importlib.util.spec_from_file_location("fedrec_scale_benchmark", SCALE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failed_size_row_counts_why_nodes_dropped(tmp_path):
    scale = _scale()
    assert scale._why_nodes_dropped(tmp_path) == {}  # nothing logged, nothing failed: nothing added
    (tmp_path / "server_warnings.log").write_text(
        "round 1: node 5 dropped: no masked vector\nround 1: node 7 dropped: no masked vector\n"
        "round 1: node 9 failed: actor died\n"
        "run failed: round 1: 1 of 5 nodes contributed, 3 needed (dropped [5, 7, 9], refused {})" + "x" * 300 + "\n")
    (tmp_path / "error.txt").write_text(
        "RunFailed: round 1: 1 of 5 nodes contributed, 3 needed (dropped [5, 7, 9], "
        "refused {3: 'budget', 4: 'budget', 6: 'internal'})\n")
    assert scale._why_nodes_dropped(tmp_path) == {
        "node_warnings": {"node N dropped: no masked vector": 2, "node N failed: actor died": 1,
                          # ids elided, at most 160 characters
                          ("run failed: 1 of 5 nodes contributed, 3 needed (dropped [...], refused {})"
                           + "x" * 86 + "..."): 1},
        "refusal_codes": {"budget": 2, "internal": 1},
    }


def test_bad_sizes_are_one_line_errors(capsys):
    scale = _scale()
    assert scale.main(["--sizes", "10,x"]) == 2
    assert scale.main(["--sizes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --sizes '10,x': give whole numbers, e.g. 10,100,1000",
                   "error: --sizes: each count must be >= 3 institutions"]
