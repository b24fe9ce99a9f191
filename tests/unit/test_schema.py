"""The institution data contract: study.toml parsing, the loader, and check-data's messages.

Each malformed case builds a small valid folder, breaks one thing, and runs the real
``fedrec-client check-data`` command (in process through typer's runner; once more through a
subprocess): exit code 2 and one line naming file, row and column.
"""

from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fedrec.client.cli import app as client_app
from fedrec.common.datasets import load_federation, load_institution, write_institution
from fedrec.common.errors import FedrecInputError
from fedrec.common.schema import Covariate, Study, parse_study, validate_folder

STUDY = """\
[study]
domain = "test"
person_unit = "person"

[engagement]
kind = "rating"
min = 1
max = 5

[outcome]
name = "score"
unit = "points"
min = -10
max = 10

[covariates.age]
kind = "integer"
min = 0
max = 120

[covariates.female]
kind = "binary"

[covariates.income]
kind = "number"
min = 0
max = 1000000

[covariates.region]
kind = "category"
levels = ["north", "south"]
"""

PEOPLE = """\
person_id,age,female,income,region
a1,30,0,1000.5,north
a2,45,1,2000,south
a3,60,0,0,north
"""

ITEMS = """\
item_id,name,description,category
x1,Tutoring,One-on-one tutoring three times a week,support
x2,Videos,Short videos explaining one idea each,digital
"""

INTERACTIONS = """\
person_id,item_id,exposed,engagement,outcome,timestamp
a1,x1,1,4,1.5,2024-01-02
a1,x2,0,,1.5,2024-01-03
a2,x1,0,,-2,2024-01-04
a3,x2,1,5,3.25,2024-02-01T10:00:00
"""


def make_folder(root: Path) -> Path:
    folder = root / "inst"
    folder.mkdir()
    for name, text in (("study.toml", STUDY), ("people.csv", PEOPLE), ("items.csv", ITEMS),
                       ("interactions.csv", INTERACTIONS)):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path)


def edit(name: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(f: Path) -> None:
        text = (f / name).read_text(encoding="utf-8")
        assert old in text, (name, old)
        (f / name).write_text(text.replace(old, new, 1), encoding="utf-8")
    return apply


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(f: Path) -> None:
        (f / name).write_bytes(data)
    return apply


def delete(name: str) -> Callable[[Path], None]:
    def apply(f: Path) -> None:
        (f / name).unlink()
    return apply


def causal(table: str) -> Callable[[Path], None]:
    """Append a ``[causal]`` table with ``table`` as its body to study.toml."""
    return edit("study.toml", 'levels = ["north", "south"]\n', f'levels = ["north", "south"]\n\n[causal]\n{table}\n')


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(f: Path) -> None:
        for s in steps:
            s(f)
    return apply


def add_parquet_people(f: Path) -> None:
    pd.read_csv(f / "people.csv").to_parquet(f / "people.parquet")


def parquet_people_with_text_age(f: Path) -> None:
    df = pd.read_csv(f / "people.csv", dtype=str)
    df.loc[1, "age"] = "forty"
    df.to_parquet(f / "people.parquet")
    (f / "people.csv").unlink()


def huge_line(f: Path) -> None:
    text = ITEMS.replace("Short videos explaining one idea each", "v" * (1 << 20 + 1) + " x")
    (f / "items.csv").write_text(text, encoding="utf-8")


def latin1_items(f: Path) -> None:
    text = ITEMS.replace("Short videos", "Short vid\u00e9os")
    (f / "items.csv").write_bytes(text.encode("latin-1"))


def click_study(f: Path) -> None:
    text = STUDY.replace('kind = "rating"\nmin = 1\nmax = 5', 'kind = "click"')
    (f / "study.toml").write_text(text, encoding="utf-8")


def parquet_interactions(**columns: object) -> Callable[[Path], None]:
    """Replace interactions.csv by interactions.parquet written with pyarrow, the CSV's columns as
    text except those given here as pyarrow arrays (4 rows, in the CSV's order)."""
    def apply(f: Path) -> None:
        df = pd.read_csv(f / "interactions.csv", dtype=str, keep_default_na=False)
        arrays = {c: columns.get(c, pa.array(df[c].tolist(), type=pa.string())) for c in df.columns}
        pq.write_table(pa.table(arrays), f / "interactions.parquet")
        (f / "interactions.csv").unlink()
    return apply


def timestamps(last: object, unit: str = "us", tz: Optional[str] = None) -> object:
    """A Parquet timestamp column whose fourth value is ``last`` (the others in 2024)."""
    return pa.array([datetime.datetime(2024, 1, 2), datetime.datetime(2024, 1, 3), datetime.datetime(2024, 1, 4), last],
                    type=pa.timestamp(unit, tz=tz))


def dates(last: object) -> object:
    return pa.array([datetime.date(2024, 1, 2), datetime.date(2024, 1, 3), datetime.date(2024, 1, 4), last],
                    type=pa.date32())


def floats(*values: float) -> object:
    return pa.array(list(values), type=pa.float64())


def nobody_exposed(f: Path) -> None:
    text = (f / "interactions.csv").read_text(encoding="utf-8")
    (f / "interactions.csv").write_text(text.replace(",1,4,", ",0,,").replace(",1,5,", ",0,,"), encoding="utf-8")


def make_dir(name: str) -> Callable[[Path], None]:
    """Put a folder where the file ``name`` is expected."""
    def apply(f: Path) -> None:
        if (f / name).exists():
            (f / name).unlink()
        (f / name).mkdir()
        (f / name / "inside.txt").write_text("x")
    return apply


def symlink(name: str, target: str) -> Callable[[Path], None]:
    """Make ``name`` a symbolic link to ``target`` (relative to the folder): a link to itself
    cannot be opened by anyone, root included (ELOOP); a link to nothing is broken."""
    def apply(f: Path) -> None:
        (f / name).unlink()
        os.symlink(target, f / name)
    return apply


def fifo(name: str) -> Callable[[Path], None]:
    """A named pipe where a table is expected (reading it would block forever)."""
    def apply(f: Path) -> None:
        (f / name).unlink()
        os.mkfifo(f / name)
    return apply


# (case id, how to break the folder, file, row, column, part of the message)
CASES: list[tuple[str, Callable[[Path], None], str, Optional[int], Optional[str], str]] = [
    ("missing_study", delete("study.toml"), "study.toml", None, None, "missing"),
    ("missing_people", delete("people.csv"), "people.csv", None, None, "missing"),
    ("missing_items", delete("items.csv"), "items.csv", None, None, "missing"),
    ("missing_interactions", delete("interactions.csv"), "interactions.csv", None, None, "missing"),
    ("csv_and_parquet", add_parquet_people, "people.csv", None, None, "both"),
    ("empty_file", write("people.csv", b""), "people.csv", None, None, "empty"),
    ("header_only", write("interactions.csv", INTERACTIONS.splitlines()[0].encode() + b"\n"),
     "interactions.csv", None, None, "no rows"),
    ("missing_covariate_column", edit("people.csv", "person_id,age,", "person_id,years,"), "people.csv", 1, "age",
     "column missing"),
    ("missing_required_column", edit("interactions.csv", "exposed,", "shown,"), "interactions.csv", 1, "exposed",
     "column missing"),
    ("not_a_number", edit("people.csv", "a2,45,", "a2,abc,"), "people.csv", 3, "age", "'abc' is not a number"),
    ("nan_covariate", edit("people.csv", "1000.5", "NaN"), "people.csv", 2, "income", "missing"),
    ("covariate_out_of_bounds", edit("people.csv", "a3,60,", "a3,130,"), "people.csv", 4, "age", "outside [0, 120]"),
    ("integer_with_fraction", edit("people.csv", "a1,30,", "a1,30.5,"), "people.csv", 2, "age", "not a whole number"),
    ("binary_not_01", edit("people.csv", "a2,45,1,", "a2,45,2,"), "people.csv", 3, "female", "not 0 or 1"),
    ("undeclared_level", edit("people.csv", "2000,south", "2000,east"), "people.csv", 3, "region",
     "not a declared level"),
    ("duplicate_person_id", edit("people.csv", "a2,", "a1,"), "people.csv", 3, "person_id", "repeats row 2"),
    ("empty_person_id", edit("people.csv", "a3,", ","), "people.csv", 4, "person_id", "empty"),
    ("duplicate_item_id", edit("items.csv", "x2,", "x1,"), "items.csv", 3, "item_id", "repeats row 2"),
    ("empty_description", edit("items.csv", "Short videos explaining one idea each", ""), "items.csv", 3,
     "description", "empty"),
    ("dangling_person", edit("interactions.csv", "a2,x1", "zz,x1"), "interactions.csv", 4, "person_id",
     "not in the people file"),
    ("dangling_item", edit("interactions.csv", "a3,x2", "a3,x9"), "interactions.csv", 5, "item_id",
     "not in the items file"),
    ("duplicate_pair", edit("interactions.csv", "a1,x2,0", "a1,x1,0"), "interactions.csv", 3, "item_id", "repeat row 2"),
    ("exposed_not_01", edit("interactions.csv", "a1,x1,1,", "a1,x1,yes,"), "interactions.csv", 2, "exposed",
     "'yes' is not 0 or 1"),
    ("engagement_out_of_bounds", edit("interactions.csv", "a3,x2,1,5,", "a3,x2,1,7,"), "interactions.csv", 5,
     "engagement", "outside [1, 5]"),
    ("engagement_missing_when_exposed", edit("interactions.csv", "a1,x1,1,4,", "a1,x1,1,,"), "interactions.csv", 2,
     "engagement", "exposed = 1"),
    ("engagement_when_unexposed", edit("interactions.csv", "a2,x1,0,,", "a2,x1,0,3,"), "interactions.csv", 4,
     "engagement", "exposed = 0"),
    ("engagement_not_a_number", edit("interactions.csv", "a1,x1,1,4,", "a1,x1,1,good,"), "interactions.csv", 2,
     "engagement", "not a number"),
    ("outcome_out_of_bounds", edit("interactions.csv", "3.25", "99"), "interactions.csv", 5, "outcome",
     "outside [-10, 10]"),
    ("outcome_infinite", edit("interactions.csv", ",-2,", ",inf,"), "interactions.csv", 4, "outcome",
     "not a number"),
    ("outcome_missing", edit("interactions.csv", ",-2,", ",,"), "interactions.csv", 4, "outcome", "empty"),
    ("bad_timestamp", edit("interactions.csv", "2024-01-04", "2024-13-45"), "interactions.csv", 4, "timestamp",
     "'2024-13-45' is not a real date/time"),
    ("timestamp_no_such_day", edit("interactions.csv", "2024-01-04", "2024-02-30"), "interactions.csv", 4, "timestamp",
     "'2024-02-30' is not a real date/time"),
    ("timestamp_truncated_day", edit("interactions.csv", "2024-01-04", "2024-03-1"), "interactions.csv", 4,
     "timestamp", "'2024-03-1' is not an ISO 8601 date/time"),
    ("timestamp_one_digit_month", edit("interactions.csv", "2024-01-04", "2024-3-01"), "interactions.csv", 4,
     "timestamp", "'2024-3-01' is not an ISO 8601"),
    ("timestamp_year_month", edit("interactions.csv", "2024-01-04", "2024-03"), "interactions.csv", 4, "timestamp",
     "'2024-03' is not an ISO 8601"),
    ("timestamp_basic_format", edit("interactions.csv", "2024-01-04", "20240104"), "interactions.csv", 4,
     "timestamp", "'20240104' is not an ISO 8601"),
    ("timestamp_fullwidth_digits", edit("interactions.csv", "2024-01-04", "\uff12\uff10\uff12\uff14-01-04"),
     "interactions.csv", 4, "timestamp", "is not an ISO 8601"),
    ("timestamp_offset_without_time", edit("interactions.csv", "2024-01-04", "2024-01-04Z"), "interactions.csv", 4,
     "timestamp", "'2024-01-04Z' is not an ISO 8601"),
    ("timestamp_year_2300_csv", edit("interactions.csv", "2024-01-04", "2300-01-04"), "interactions.csv", 4,
     "timestamp", "'2300-01-04' is outside the accepted range 1678-01-01 to 2261-12-31"),
    ("timestamp_year_1500_csv", edit("interactions.csv", "2024-02-01T10:00:00", "1500-02-01T10:00:00"),
     "interactions.csv", 5, "timestamp", "'1500-02-01T10:00:00' is outside the accepted range"),
    ("timestamp_year_2262_csv", edit("interactions.csv", "2024-01-03", "2262-01-01"), "interactions.csv", 3,
     "timestamp", "'2262-01-01' is outside"),
    ("timestamp_empty", edit("interactions.csv", "2024-01-03", ""), "interactions.csv", 3, "timestamp",
     "value is empty"),
    ("parquet_timestamp_us_2300", parquet_interactions(timestamp=timestamps(datetime.datetime(2300, 1, 1))),
     "interactions.parquet", 4, "timestamp", "2300-01-01 00:00:00 is outside the accepted range"),
    ("parquet_timestamp_ms_1500", parquet_interactions(timestamp=timestamps(datetime.datetime(1500, 6, 1), "ms")),
     "interactions.parquet", 4, "timestamp", "1500-06-01 00:00:00 is outside"),
    ("parquet_timestamp_tz_2300",
     parquet_interactions(timestamp=timestamps(datetime.datetime(2300, 1, 1), "s", "Europe/Paris")),
     "interactions.parquet", 4, "timestamp", "is outside the accepted range"),
    ("parquet_date_2300", parquet_interactions(timestamp=dates(datetime.date(2300, 1, 1))),
     "interactions.parquet", 4, "timestamp", "'2300-01-01' is outside the accepted range"),
    ("parquet_text_timestamp_truncated",
     parquet_interactions(timestamp=pa.array(["2024-01-02", "2024-03-1", "2024-01-04", "2024-01-05"])),
     "interactions.parquet", 2, "timestamp", "'2024-03-1' is not an ISO 8601"),
    ("parquet_epoch_seconds_timestamp",
     parquet_interactions(timestamp=pa.array([1704153600, 1704240000, 1704326400, 1706781600])),
     "interactions.parquet", 1, "timestamp", "'1704153600' is not an ISO 8601"),
    ("no_exposed_rows", nobody_exposed, "interactions.csv", None, "exposed", "no row has exposed = 1 (0 of 4 rows)"),
    ("people_is_a_folder", make_dir("people.csv"), "people.csv", None, None, "is a folder, not a file"),
    ("study_is_a_folder", make_dir("study.toml"), "study.toml", None, None, "is a folder, not a file"),
    ("parquet_is_a_folder", both(delete("items.csv"), make_dir("items.parquet")), "items.parquet", None, None,
     "is a folder, not a file"),
    ("people_link_loop", symlink("people.csv", "people.csv"), "people.csv", None, None, "cannot be read ("),
    ("study_link_loop", symlink("study.toml", "study.toml"), "study.toml", None, None, "cannot be read ("),
    ("people_broken_link", symlink("people.csv", "no-such-file.csv"), "people.csv", None, None,
     "cannot be read (a broken link)"),
    ("interactions_named_pipe", fifo("interactions.csv"), "interactions.csv", None, None, "not a regular file"),
    ("nan_person_id_csv", edit("interactions.csv", "a2,x1", "NaN,x1"), "interactions.csv", 4, "person_id",
     "person is empty"),
    ("parquet_nan_person_id", parquet_interactions(person_id=floats(1, 1, float("nan"), 3)), "interactions.parquet",
     3, "person_id", "person is empty"),
    ("parquet_infinite_item_id", parquet_interactions(item_id=floats(1, 2, float("inf"), 2)), "interactions.parquet",
     3, "item_id", "'inf' is not an id"),
    ("parquet_numeric_id_not_in_people", parquet_interactions(person_id=floats(1, 1, 2, 3)), "interactions.parquet",
     1, "person_id", "person '1' is not in the people file"),
    ("wrong_encoding", latin1_items, "items.csv", 3, "description", "not UTF-8"),
    ("huge_line", huge_line, "items.csv", 3, None, "bytes long"),
    ("ragged_row", edit("people.csv", "a2,45,1,2000,south", "a2,45,1,2,000,south"), "people.csv", 3, None,
     "fields but the header has"),
    ("duplicate_header", edit("people.csv", "income,region", "income,income"), "people.csv", 1, "income",
     "twice"),
    ("toml_syntax", edit("study.toml", 'domain = "test"', "domain = test"), "study.toml", 2, None, "not valid TOML"),
    ("toml_missing_outcome", edit("study.toml", "[outcome]", "[result]"), "study.toml", None, "[outcome]",
     "table missing"),
    ("toml_bounds_reversed", edit("study.toml", "min = -10\nmax = 10", "min = 10\nmax = -10"), "study.toml", None,
     "outcome.min", "not a range"),
    ("toml_unknown_engagement", edit("study.toml", 'kind = "rating"', 'kind = "stars"'), "study.toml", None,
     "engagement.kind", "not rating or click"),
    ("toml_unknown_covariate_kind", edit("study.toml", 'kind = "binary"', 'kind = "boolean"'), "study.toml", None,
     "covariates.female.kind", "not a covariate kind"),
    ("toml_covariate_without_bounds", edit("study.toml", "min = 0\nmax = 120\n", ""), "study.toml", None,
     "covariates.age.min", "missing"),
    ("toml_causal_unknown_covariate", causal('covariates = ["agee"]'), "study.toml", None, "causal.covariates",
     "'agee' is not declared"),
    ("toml_causal_derived_from_category", causal('derived = ["log1p(region)"]'), "study.toml", None,
     "causal.derived", "is a category"),
    ("toml_causal_log_of_zero", causal('derived = ["log(income)"]'), "study.toml", None, "causal.derived",
     "'log(income)'"),
    ("toml_causal_bad_form", causal('derived = ["sqrt(age)"]'), "study.toml", None, "causal.derived",
     "derived feature 'sqrt(age)'"),
    ("toml_causal_unknown_key", causal('derive = ["log1p(age)"]'), "study.toml", None, "causal.derive",
     "not a [causal] key"),
    ("toml_causal_not_a_list", causal('derived = "log1p(age)"'), "study.toml", None, "causal.derived",
     "list of texts"),
    ("corrupt_parquet", both(delete("people.csv"), write("people.parquet", b"PAR1 this is not parquet")),
     "people.parquet", None, None, "not a readable Parquet"),
    ("parquet_wrong_type", parquet_people_with_text_age, "people.parquet", 2, "age", "'forty' is not a number"),
    ("click_not_01", click_study, "interactions.csv", 5, "engagement", "not a click"),
]


def snapshot(folder: Path) -> dict[str, object]:
    """What is in ``folder``, without opening anything that is not a regular file."""
    snap: dict[str, object] = {}
    for p in folder.iterdir():
        if p.is_symlink():
            snap[p.name] = ("link", os.readlink(p))
        elif p.is_dir():
            snap[p.name] = ("folder", sorted(q.name for q in p.iterdir()))
        elif p.is_file():
            snap[p.name] = p.read_bytes()
        else:
            snap[p.name] = ("other", p.stat().st_mode)
    return snap


def run_cli(folder: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(client_app, ["check-data", str(folder)])
    return result.exit_code, result.stdout, result.stderr


def test_valid_folder_passes_and_loads(folder: Path) -> None:
    code, out, err = run_cli(folder)
    assert code == 0, err
    assert "people" in out and "exposure rate" in out and err == ""
    data = load_institution(folder)
    assert list(data.people.columns) == ["person_id", "age", "female", "income", "region"]
    assert data.people["age"].dtype == np.int64 and data.people["income"].dtype == np.float64
    inter = data.interactions
    assert inter["exposed"].tolist() == [1, 0, 0, 1]
    assert np.isnan(inter["engagement"].to_numpy()[[1, 2]]).all()
    assert inter["engagement"].to_numpy()[[0, 3]].tolist() == [4.0, 5.0]
    assert str(inter["timestamp"].dtype) == "datetime64[ns]"
    assert data.covariate_matrix().shape == (3, 4)  # region -> one column (south)
    assert data.engagement_rows()["engagement"].tolist() == [4.0, 5.0]


def test_case_count() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_folder_exit_2_with_one_line(tmp_path: Path, case) -> None:
    _, breaker, file, row, column, fragment = case
    folder = make_folder(tmp_path)
    breaker(folder)
    broken = snapshot(folder)
    code, out, err = run_cli(folder)
    assert code == 2, (out, err)
    label = "key" if file == "study.toml" else "column"
    prefix = file + (f" row {row}" if row is not None else "") + (f", {label} {column}" if column else "")
    hits = [ln for ln in err.splitlines() if ln.startswith(prefix + ":") and fragment in ln and "; fix: " in ln]
    assert hits, f"expected a line starting {prefix!r} containing {fragment!r}; got:\n{err}"
    assert snapshot(folder) == broken  # check-data modifies nothing
    # the loader raises the same kind of one-line error
    with pytest.raises(FedrecInputError) as info:
        load_institution(folder)
    assert "\n" not in str(info.value) and file in str(info.value)


def test_many_bad_rows_are_summarised(folder: Path) -> None:
    rows = "\n".join(f"b{i},abc,0,1,north" for i in range(50))
    (folder / "people.csv").write_text(PEOPLE + rows + "\n", encoding="utf-8")
    problems = validate_folder(folder).problems
    age = [p for p in problems if p.column == "age"]
    assert len(age) == 6 and "row 10, column age" in age[-1].line()
    assert "(and 44 more rows like it: 11, 12," in age[-1].line()


def test_subprocess_real_cli(folder: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fedrec-client")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedrec.client.cli"]
    env = dict(os.environ, COLUMNS="200")
    ok = subprocess.run([*cmd, "check-data", str(folder)], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    edit("people.csv", "a2,45,", "a2,abc,")(folder)
    bad = subprocess.run([*cmd, "check-data", str(folder)], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert "people.csv row 3, column age: 'abc' is not a number; fix: write a number within [0, 120]" in bad.stderr


def test_study_round_trip() -> None:
    study = parse_study(STUDY)
    assert study.covariate_names == ("age", "female", "income", "region")
    assert study.covariate_bounds["age"] == (0.0, 120.0)
    assert study.outcome_bounds == (-10.0, 10.0) and study.outcome_better == "higher"
    assert study.engagement_kind == "rating" and study.engagement_bounds == (1.0, 5.0)
    assert parse_study(study.to_toml()) == study
    assert [c[0] for c in study.design_columns()] == ["age", "female", "income", "region=south"]
    click = Study("x", (Covariate("z", "number", -1, 1),), "y", "u", (0, 1), "lower", "click", (0.0, 1.0))
    assert parse_study(click.to_toml()) == click


def test_parquet_folder_round_trip(folder: Path, tmp_path: Path) -> None:
    data = load_institution(folder)
    out = write_institution(tmp_path / "fed" / "pq", data, fmt="parquet")
    back = load_institution(out)
    for t in ("people", "items", "interactions"):
        pd.testing.assert_frame_equal(getattr(back, t), getattr(data, t), check_exact=True)
    assert load_federation(tmp_path / "fed")[0].name == "pq"


def test_load_federation_errors(tmp_path: Path) -> None:
    with pytest.raises(FedrecInputError, match="no institution folders"):
        load_federation(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for f in (a, b):
        for name, text in (("study.toml", STUDY), ("people.csv", PEOPLE), ("items.csv", ITEMS),
                           ("interactions.csv", INTERACTIONS)):
            (f / name).write_text(text, encoding="utf-8")
    (b / "study.toml").write_text(STUDY.replace('unit = "points"', 'unit = "percent"'), encoding="utf-8")
    with pytest.raises(FedrecInputError, match="differs from"):
        load_federation(tmp_path)


def test_not_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, _, err = run_cli(f)
    assert code == 2 and "is not a folder" in err


def test_causal_design_is_declared_once_and_round_trips(tmp_path: Path) -> None:
    """``[causal]`` declares the nuisance design (a subset of covariates + derived features with
    explicit public bounds); it parses, renders back identically and loads with the folder."""
    folder = make_folder(tmp_path)
    causal('covariates = ["age", "region"]\nderived = ["log1p(income)", "square(age)[0, 10000]"]')(folder)
    study = load_institution(folder).study
    assert study.causal_covariates == ("age", "region")
    assert study.causal_derived == ("log1p(income)", "square(age)[0, 10000]")
    assert parse_study(study.to_toml()) == study
    assert parse_study(STUDY).causal_covariates is None and parse_study(STUDY).causal_derived == ()
    assert "[causal]" not in parse_study(STUDY).to_toml()


def test_the_documented_study_toml_parses() -> None:
    """The example in docs/data-contract.md is a valid study.toml (including [causal])."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "data-contract.md").read_text(encoding="utf-8")
    example = re.search(r"### study.toml\n\n```toml\n(.*?)```", doc, re.S)
    assert example is not None
    study = parse_study(example.group(1))
    assert study.causal_covariates == ("age", "female", "region") and study.causal_derived == ("square(age)",)


# --------------------------------------------------------------------------- unreadable files
# Root reads any file whatever its mode, so as root the permission cases run in a child process
# that drops to an unprivileged uid after importing everything (a real EACCES, not a mock).

UNREADABLE = ["people.csv", "study.toml", "items.parquet", "."]


def _make_unreadable(folder: Path, target: str) -> tuple[Path, str]:
    """chmod 000 ``target`` in ``folder`` (``.``: the folder itself); returns the path and the
    start of the line check-data must print."""
    if target == "items.parquet":
        pd.read_csv(folder / "items.csv", dtype=str).to_parquet(folder / "items.parquet")
        (folder / "items.csv").unlink()
    path = folder if target == "." else folder / target
    os.chmod(path, 0)
    return path, (str(folder) if target == "." else target) + ": cannot be read (Permission denied)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode (see the root variant)")
@pytest.mark.parametrize("target", UNREADABLE)
def test_unreadable_file_is_one_line_as_non_root(tmp_path: Path, target: str) -> None:
    folder = make_folder(tmp_path)
    path, expected = _make_unreadable(folder, target)
    try:
        if target == ".":  # an unreadable FOLDER argument is refused by click first: check run_check itself
            from rich.console import Console

            from fedrec.client.check_data import run_check

            buf = io.StringIO()
            code = run_check(folder, console=Console(file=io.StringIO()), err_console=Console(file=buf, width=400))
            err = buf.getvalue()
        else:
            code, _, err = run_cli(folder)
        assert code == 2 and any(ln.startswith(expected) and "; fix: " in ln for ln in err.splitlines()), err
        with pytest.raises(FedrecInputError, match="cannot be read") as info:
            load_institution(folder)
        assert "\n" not in str(info.value)
    finally:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


_AS_NOBODY = r"""
import io, os, sys
from pathlib import Path
from rich.console import Console
from typer.testing import CliRunner
import typer.rich_utils  # imported lazily by typer when it reports a usage error
from fedrec.client.check_data import run_check
from fedrec.client.cli import app
from fedrec.common.datasets import load_institution
from fedrec.common.errors import FedrecInputError
warm, targets = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
assert CliRunner().invoke(app, ["check-data", str(warm)]).exit_code == 0  # every lazy import, as root
try:
    os.setgid(65534)
    os.setuid(65534)
except PermissionError:
    print("NO-SETUID")
    sys.exit(0)
for target in targets:
    print("=== TARGET", target)
    result = CliRunner().invoke(app, ["check-data", str(target)])
    print("CLI", result.exit_code)
    sys.stdout.write(result.stderr)
    err = io.StringIO()
    code = run_check(target, console=Console(file=io.StringIO()), err_console=Console(file=err, width=400))
    print("RUN_CHECK", code)
    sys.stdout.write(err.getvalue())
    try:
        load_institution(target)
        print("LOADED")
    except FedrecInputError as e:
        print("LOADER", e)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid (the non-root variant covers it)")
def test_unreadable_file_is_one_line_after_dropping_root() -> None:
    """Each of UNREADABLE, chmod 000, checked by an unprivileged child (one process for all)."""
    import shutil
    import stat as st
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="fedrec-unreadable-"))
    try:
        os.chmod(base, 0o755)
        if any(not os.stat(p).st_mode & st.S_IXOTH for p in base.parents):
            pytest.skip(f"{tempfile.gettempdir()} is not reachable by an unprivileged user")
        (base / "warm").mkdir()
        warm = make_folder(base / "warm")
        pd.read_csv(warm / "items.csv", dtype=str).to_parquet(warm / "items.parquet")  # warm the Parquet reader
        (warm / "items.csv").unlink()
        folders, expected = [], {}
        for k, target in enumerate(UNREADABLE):
            (base / str(k)).mkdir()
            bad = make_folder(base / str(k))
            folders.append(str(bad))
            expected[str(bad)] = (target, _make_unreadable(bad, target)[1])
        run = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(warm), *folders], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        if "NO-SETUID" in run.stdout:
            pytest.skip("cannot drop privileges here")
        blocks = run.stdout.split("=== TARGET ")[1:]
        assert len(blocks) == len(UNREADABLE), run.stdout
        for block in blocks:
            folder, _, body = block.partition("\n")
            target, line = expected[folder]
            cli, _, rest = body.partition("RUN_CHECK ")
            direct, _, loader = rest.partition("LOADER ")
            assert direct.startswith("2\n"), (target, body)
            assert any(ln.startswith(line) and "; fix: " in ln for ln in direct.splitlines()), (target, body)
            assert "cannot be read (Permission denied); fix: " in loader and "\n" not in loader.strip(), (target, body)
            if target != ".":  # an unreadable FOLDER argument is refused by click first (see the report)
                assert cli.startswith("CLI 2\n"), (target, body)
                assert any(ln.startswith(line) and "; fix: " in ln for ln in cli.splitlines()), (target, body)
    finally:
        for p in [base, *base.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- what is accepted


def test_iso_forms_load_to_the_right_instant(folder: Path) -> None:
    """Strict ISO 8601 forms that are accepted, and the instant each loads as (offsets -> UTC,
    no offset: as written)."""
    text = INTERACTIONS.replace("2024-01-02", "2024-01-02T23:30:00-02:00").replace("2024-01-03", "2024-01-03 07:15")
    text = text.replace("2024-01-04", "2261-12-31T23:59:59.123456789Z").replace("2024-02-01T10:00:00", "1678-01-01")
    (folder / "interactions.csv").write_text(text, encoding="utf-8")
    ts = load_institution(folder).interactions["timestamp"]
    assert str(ts.dtype) == "datetime64[ns]"
    assert ts.tolist() == [pd.Timestamp("2024-01-03T01:30:00"), pd.Timestamp("2024-01-03T07:15:00"),
                           pd.Timestamp("2261-12-31T23:59:59.123456789"), pd.Timestamp("1678-01-01")]


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_parquet_timestamps_keep_their_value_in_any_unit(folder: Path, unit: str) -> None:
    """A Parquet timestamp near the accepted range's end is read exactly (no nanosecond wrap);
    a time zone converts to UTC."""
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    values = [datetime.datetime(2024, 1, 2, 0, 30, tzinfo=paris), datetime.datetime(2024, 1, 3, tzinfo=paris),
              datetime.datetime(2024, 1, 4, tzinfo=paris), datetime.datetime(2261, 6, 1, 12, tzinfo=paris)]
    parquet_interactions(timestamp=pa.array(values, type=pa.timestamp(unit, tz="Europe/Paris")))(folder)
    ts = load_institution(folder).interactions["timestamp"]
    assert str(ts.dtype) == "datetime64[ns]"
    assert ts.iloc[3] == pd.Timestamp("2261-06-01T10:00:00")  # 12:00 in Paris (summer time) is 10:00 UTC
    assert ts.iloc[0] == pd.Timestamp("2024-01-01T23:30:00")  # winter time: UTC+1


def test_parquet_date_column_loads(folder: Path) -> None:
    parquet_interactions(timestamp=dates(datetime.date(2261, 12, 31)))(folder)
    ts = load_institution(folder).interactions["timestamp"]
    assert ts.tolist()[2:] == [pd.Timestamp("2024-01-04"), pd.Timestamp("2261-12-31")]


def test_parquet_numeric_ids_match_across_tables(folder: Path) -> None:
    """Whole-number ids read as 7 whether the Parquet column is integer or float (a float id
    column is what a NaN anywhere in it makes); the loaded ids are text."""
    people = pd.read_csv(folder / "people.csv", dtype={"person_id": str})
    people["person_id"] = [1, 2, 3]
    people.to_parquet(folder / "people.parquet")
    (folder / "people.csv").unlink()
    parquet_interactions(person_id=floats(1, 1, 2, 3))(folder)
    data = load_institution(folder)
    assert data.people["person_id"].tolist() == ["1", "2", "3"]
    assert data.interactions["person_id"].tolist() == ["1", "1", "2", "3"]


def test_one_exposed_row_is_enough(folder: Path) -> None:
    text = INTERACTIONS.replace("a3,x2,1,5,", "a3,x2,0,,")
    (folder / "interactions.csv").write_text(text, encoding="utf-8")
    assert load_institution(folder).interactions["exposed"].tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("breaker, expected", [
    (edit("interactions.csv", "2024-01-04", "2024-03-1"),
     "interactions.csv row 4, column timestamp: '2024-03-1' is not an ISO 8601 date/time; fix: "),
    (parquet_interactions(timestamp=timestamps(datetime.datetime(2300, 1, 1))),
     "interactions.parquet row 4, column timestamp: 2300-01-01 00:00:00 is outside the accepted range "),
    (nobody_exposed, "interactions.csv, column exposed: no row has exposed = 1 "),
], ids=["truncated_date", "parquet_2300", "no_exposed_rows"])
def test_subprocess_real_cli_new_checks(tmp_path: Path, breaker: Callable[[Path], None], expected: str) -> None:
    """The installed ``fedrec-client check-data``: exit 2, the problem on one stderr line, no traceback."""
    folder = make_folder(tmp_path)
    breaker(folder)
    exe = Path(sys.executable).with_name("fedrec-client")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedrec.client.cli"]
    env = dict(os.environ, COLUMNS="300")
    run = subprocess.run([*cmd, "check-data", str(folder)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert [ln for ln in run.stderr.splitlines() if ln.startswith(expected)], run.stderr
