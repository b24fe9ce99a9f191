"""The data contract keeps what strategy evaluation needs (a logged ``propensity`` column, a
``[causal.graph]`` table) and a study whose effect is not identifiable under its declared graph
is refused before any budget is spent (issue 32, deliverable 4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedrec.common.causal.graph import check_study_graph
from fedrec.common.datasets import load_institution, write_institution
from fedrec.common.errors import FedrecInputError
from fedrec.common.schema import parse_study, validate_folder

CONFOUNDED = {"treatment": "exposed", "outcome": "outcome", "latent": ["motivation"],
              "edges": ["age -> exposed", "age -> outcome", "motivation -> exposed", "motivation -> outcome",
                        "exposed -> outcome"]}
CLEAN = {"edges": ["age -> exposed", "age -> outcome", "exposed -> engagement", "engagement -> outcome",
                   "exposed -> outcome"], "mediators": ["engagement"]}


@pytest.fixture(scope="module")
def health():
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("health", institutions=2, people=240, seed=3, skew=0.0)
    return insts


def _write(folder: Path, d, graph=None, propensity=None):
    study = dataclasses.replace(d.study, causal_graph=graph) if graph is not None else d.study
    inter = d.interactions if propensity is None else d.interactions.assign(propensity=propensity)
    write_institution(folder, dataclasses.replace(d, study=study, interactions=inter))
    return folder


def test_the_contract_keeps_a_logged_propensity_and_a_declared_graph(health, tmp_path):
    d = health[0]
    folder = _write(tmp_path / "a", d, graph=CLEAN, propensity=0.25)
    back = load_institution(folder)
    assert "propensity" in back.interactions.columns
    assert (back.interactions["propensity"] == 0.25).all()
    assert back.study.causal_graph["mediators"] == ["engagement"]
    assert back.study.causal_graph["edges"][0] == "age -> exposed"
    assert parse_study(back.study.to_toml()) == back.study
    # without the column nothing changes: the frame has the required columns only
    plain = load_institution(_write(tmp_path / "b", d))
    assert "propensity" not in plain.interactions.columns and plain.study.causal_graph is None


@pytest.mark.parametrize(("value", "says"), [(0.0, "0 is outside (0, 1]"), (1.5, "1.5 is outside (0, 1]"),
                                             ("often", "'often' is not a number")])
def test_a_bad_propensity_is_one_line_naming_file_row_and_column(health, tmp_path, value, says):
    d = health[0]
    prop = d.interactions["exposed"].astype(object) * 0 + 0.5
    prop.iloc[4] = value
    v = validate_folder(_write(tmp_path / "a", d, propensity=prop))
    lines = [p.line() for p in v.problems]
    assert len(lines) == 1, lines
    assert lines[0].startswith("interactions.csv row 6, column propensity: " + says), lines[0]
    assert "; fix: " in lines[0]


def test_a_bad_graph_in_study_toml_is_one_line_naming_the_key(health, tmp_path):
    d = health[0]
    folder = _write(tmp_path / "a", d)
    text = (folder / "study.toml").read_text() + '\n[causal.graph]\nedges = ["age exposed"]\n'
    (folder / "study.toml").write_text(text)
    lines = [p.line() for p in validate_folder(folder).problems]
    assert len(lines) == 1 and "causal.graph" in lines[0] and "'age exposed' is not 'A -> B'" in lines[0], lines
    both = (folder / "study.toml").read_text().replace('["age exposed"]', '["age -> exposed", "exposed -> outcome"]')
    (folder / "study.toml").write_text(both + '\n[graph]\nedges = ["exposed -> outcome"]\n')
    lines = [p.line() for p in validate_folder(folder).problems]
    assert len(lines) == 1 and "declared twice" in lines[0], lines


def test_the_design_must_block_every_backdoor_path(health):
    names = health[0].study.covariate_names
    graph = {"edges": ["age -> exposed", "age -> outcome", "exercise -> exposed", "exercise -> outcome",
                       "exposed -> outcome"]}
    assert check_study_graph(graph, names, design=["age", "exercise", "female"]) == ["age", "exercise"]
    with pytest.raises(FedrecInputError, match=r"path exposed <- exercise -> outcome open; fix: add age, exercise"):
        check_study_graph(graph, names, design=["age", "female"])
    post = {"edges": ["age -> exposed", "age -> outcome", "exposed -> exercise", "exercise -> outcome",
                      "exposed -> outcome"]}
    with pytest.raises(FedrecInputError, match=r"adjusts for 'exercise', which the graph makes an effect of exposed"):
        check_study_graph(post, names, design=["age", "exercise"])
    assert check_study_graph(None, names, design=["age"]) is None


def test_a_non_identifiable_study_is_refused_before_any_ledger_is_touched(health, tmp_path):
    from rich.console import Console

    from fedrec.simulations.causal_cli import causal_command

    data = tmp_path / "data"
    for d in health:
        _write(data / d.name, d, graph=CONFOUNDED)
    out = tmp_path / "out"
    with pytest.raises(FedrecInputError) as err:
        causal_command(data, None, 1.0, "aipw", False, out, 0, Console(quiet=True), plain=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "the back-door path exposed <- motivation -> outcome stays open (motivation not observed)" in msg
    assert not out.exists()  # no ledger, no policy, no result: nothing was charged


def test_the_server_refuses_a_non_identifiable_declaration(health, monkeypatch):
    """The server's study query (server/causal.py) runs the same check on the institutions'
    public declaration (client/causal_app.py) before any DP step."""
    from flwr.app import ConfigRecord, RecordDict

    from fedrec.client.causal_app import _declaration
    from fedrec.common.causal.config import CausalConfig
    from fedrec.server.causal import query_study
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)

    d = health[0]
    decl = _declaration(dataclasses.replace(d, study=dataclasses.replace(d.study, causal_graph=CONFOUNDED)),
                        CausalConfig())

    class Reply:  # what split_replies and query_study read of a reply
        def __init__(self, node: int):
            self.metadata = SimpleNamespace(src_node_id=node)
            self.content = RecordDict({"study": ConfigRecord({"declaration": decl})})

        def has_error(self) -> bool:
            return False

    class Grid:
        def send_and_receive(self, msgs, timeout=None):
            return [Reply(m.metadata.dst_node_id) for m in msgs]

    with pytest.raises(FedrecInputError, match=r"exposed <- motivation -> outcome stays open"):
        query_study(Grid(), [1, 2], CausalConfig())
