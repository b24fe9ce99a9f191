"""The institution data contract: what an institution provides, and its one validation.

An institution folder holds four files (see docs/data-contract.md):

- ``people.csv`` or ``people.parquet``: ``person_id`` + one column per declared covariate;
- ``items.csv`` or ``items.parquet``: ``item_id, name, description, category``;
- ``interactions.csv`` or ``interactions.parquet``: ``person_id, item_id, exposed, engagement,
  outcome, timestamp`` — one row per (person, item) the person was considered for;
- ``study.toml``: the domain, each covariate with its **public bounds** (DP clipping needs
  them), the engagement kind and bounds, the outcome's bounds, unit and better direction.

:func:`validate_folder` reads the folder once and returns every problem found, each a
:class:`Problem` whose :meth:`Problem.line` names file, row, column and the fix. Behind this
boundary the tables are typed and trusted. Row numbers: for CSV, the spreadsheet row (the
header is row 1, the first record row 2 — the file's line number); for Parquet, the 1-based
record number.

Bad input never raises out of :func:`validate_folder`: an unreadable file (no permission, a
folder or pipe where a file belongs, a broken link), a timestamp that is not strict ISO 8601 or
lies outside :data:`TIMESTAMP_YEARS`, and a folder in which nobody was exposed are problems like
any other. ``fedrec-client check-data`` and ``load_institution`` (hence every training and
causal run) share this one path, so a run never starts on a folder check-data rejects.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import pandas as pd

from fedrec.common.errors import FedrecInputError

__all__ = [
    "CONTRACT_VERSION",
    "TABLES",
    "STUDY_FILE",
    "REQUIRED_COLUMNS",
    "MAX_LINE_BYTES",
    "TIMESTAMP_YEARS",
    "Covariate",
    "Study",
    "Problem",
    "ValidatedTables",
    "Validation",
    "parse_study",
    "read_study",
    "validate_folder",
    "table_path",
]

CONTRACT_VERSION = 1
TABLES = ("people", "items", "interactions")
STUDY_FILE = "study.toml"
#: Columns every table must have (people also needs one column per declared covariate).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "people": ("person_id",),
    "items": ("item_id", "name", "description", "category"),
    "interactions": ("person_id", "item_id", "exposed", "engagement", "outcome", "timestamp"),
}
#: A CSV line longer than this is refused (a missing newline or a blob pasted into a cell).
MAX_LINE_BYTES = 1 << 20
#: Cell texts read as "no value" in CSV files (case-insensitive, after stripping blanks).
MISSING_TOKENS = frozenset({"", "na", "nan", "null", "none", "n/a"})
#: Individual problem lines per (file, column, kind) before they are summarised in one line.
MAX_LINES_PER_KIND = 5
#: Calendar years a timestamp may have (inclusive). The loaded column is ``datetime64[ns]``,
#: which holds 1677-09-21 to 2262-04-11; whole years inside that range keep every accepted value
#: (offsets included) representable, so nothing overflows or wraps silently.
TIMESTAMP_YEARS = (1678, 2261)
#: Strict ISO 8601 (extended format): ``YYYY-MM-DD``, optionally ``T`` (or a space) and
#: ``hh:mm[:ss[.fraction]]`` with an optional ``Z`` / ``±hh[:mm]`` offset. Truncated or basic
#: forms (``2024-03-1``, ``2024-03``, ``20240301``) are refused.
_ISO_RE = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]{1,9})?)?(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?)?$"
)

CovariateKind = Literal["number", "integer", "binary", "category"]
_KINDS = ("number", "integer", "binary", "category")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------- study.toml


@dataclass(frozen=True)
class Covariate:
    """One declared person covariate.

    ``kind`` is ``number`` (real), ``integer`` (whole numbers), ``binary`` (0/1) or
    ``category`` (one of ``levels``). ``lower``/``upper`` are the **public bounds** every
    value lies in: DP clipping and sensitivity use them, so they must not be learnt from the
    data. Binary covariates have bounds [0, 1]; categories are bounded by their level list.
    """

    name: str
    kind: CovariateKind
    lower: float = 0.0
    upper: float = 1.0
    levels: tuple[str, ...] = ()
    description: str = ""

    @property
    def bounds(self) -> tuple[float, float]:
        """Public (lower, upper) bounds of the encoded value."""
        return (self.lower, self.upper)


@dataclass(frozen=True)
class Study:
    """What ``study.toml`` declares: the domain, covariates with public bounds, engagement and
    outcome.

    The causal layer reads ``covariates`` (names + bounds) as the adjustment set and clips by
    ``outcome_bounds``; recommenders train on engagement within ``engagement_bounds``.
    ``outcome_better`` says whether a higher or a lower outcome is a benefit.
    """

    domain: str
    covariates: tuple[Covariate, ...]
    outcome_name: str
    outcome_unit: str
    outcome_bounds: tuple[float, float]
    outcome_better: Literal["higher", "lower"] = "higher"
    engagement_kind: Literal["rating", "click"] = "rating"
    engagement_bounds: tuple[float, float] = (1.0, 5.0)
    title: str = ""
    person_unit: str = "person"
    contract: int = CONTRACT_VERSION
    #: the causal nuisance models' design (``[causal]``, optional): the declared covariates
    #: they use (None: all) and derived features such as ``ratio(weight_kg,height_cm,2)``
    #: (body-mass index), with explicit public bounds where needed. Public, like the bounds.
    causal_covariates: Optional[tuple[str, ...]] = None
    causal_derived: tuple[str, ...] = ()
    #: the declared causal graph (``[causal.graph]``, or ``[graph]``; optional): the table
    #: normalized to treatment, outcome, mediators, latent, edges. Public; identifiability is
    #: checked before any budget is spent (common/causal/graph.py, docs/strategies.md)
    causal_graph: Optional[dict] = field(default=None, hash=False)

    @property
    def covariate_names(self) -> tuple[str, ...]:
        """Declared covariate names, in declaration order (the people table's columns)."""
        return tuple(c.name for c in self.covariates)

    @property
    def covariate_bounds(self) -> dict[str, tuple[float, float]]:
        """Public bounds per covariate name (categories: [0, 1] per one-hot column)."""
        return {c.name: c.bounds for c in self.covariates}

    def covariate(self, name: str) -> Covariate:
        """The declared covariate called ``name`` (KeyError if none)."""
        for c in self.covariates:
            if c.name == name:
                return c
        raise KeyError(name)

    def design_columns(self) -> list[tuple[str, float, float]]:
        """Numeric design columns as (name, lower, upper): one per number/integer/binary
        covariate, one per non-first level (``name=level``) for a category."""
        cols: list[tuple[str, float, float]] = []
        for c in self.covariates:
            if c.kind == "category":
                cols.extend((f"{c.name}={lv}", 0.0, 1.0) for lv in c.levels[1:])
            else:
                cols.append((c.name, c.lower, c.upper))
        return cols

    def to_toml(self) -> str:
        """Render as ``study.toml`` text (parse_study(to_toml()) == self)."""
        lines = [
            "# fedrec institution data contract: see docs/data-contract.md",
            "[study]",
            f"contract = {self.contract}",
            f"domain = {_toml_str(self.domain)}",
        ]
        if self.title:
            lines.append(f"title = {_toml_str(self.title)}")
        lines.append(f"person_unit = {_toml_str(self.person_unit)}")
        lines += ["", "[engagement]", f"kind = {_toml_str(self.engagement_kind)}"]
        lines += [f"min = {_toml_num(self.engagement_bounds[0])}", f"max = {_toml_num(self.engagement_bounds[1])}"]
        lines += [
            "",
            "[outcome]",
            f"name = {_toml_str(self.outcome_name)}",
            f"unit = {_toml_str(self.outcome_unit)}",
            f"min = {_toml_num(self.outcome_bounds[0])}",
            f"max = {_toml_num(self.outcome_bounds[1])}",
            f"better = {_toml_str(self.outcome_better)}",
        ]
        for c in self.covariates:
            lines += ["", f"[covariates.{c.name}]", f"kind = {_toml_str(c.kind)}"]
            if c.kind in ("number", "integer"):
                lines += [f"min = {_toml_num(c.lower)}", f"max = {_toml_num(c.upper)}"]
            if c.kind == "category":
                lines.append("levels = [" + ", ".join(_toml_str(v) for v in c.levels) + "]")
            if c.description:
                lines.append(f"description = {_toml_str(c.description)}")
        if self.causal_covariates is not None or self.causal_derived:
            lines += ["", "[causal]"]
            if self.causal_covariates is not None:
                lines.append("covariates = [" + ", ".join(_toml_str(v) for v in self.causal_covariates) + "]")
            if self.causal_derived:
                lines.append("derived = [" + ", ".join(_toml_str(v) for v in self.causal_derived) + "]")
        if self.causal_graph is not None:
            g = self.causal_graph
            lines += ["", "[causal.graph]", f"treatment = {_toml_str(g.get('treatment', 'exposed'))}",
                      f"outcome = {_toml_str(g.get('outcome', 'outcome'))}"]
            for key in ("mediators", "latent", "edges"):
                if g.get(key):
                    lines.append(f"{key} = [" + ", ".join(_toml_str(v) for v in g[key]) + "]")
        return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _fmt(x: object) -> str:
    """A value as shown in messages: integers without '.0', long texts shortened."""
    if isinstance(x, (float, np.floating)) and math.isfinite(x) and float(x).is_integer():
        return str(int(x))
    s = str(x)
    return s if len(s) <= 40 else s[:37] + "..."


class _StudyError(Exception):
    def __init__(self, key: Optional[str], message: str, fix: str, row: Optional[int] = None):
        super().__init__(message)
        self.problem = Problem(STUDY_FILE, row, key, message, fix, field_label="key")


def _need(table: dict, key: str, where: str, kinds: tuple[type, ...], fix: str) -> object:
    if key not in table:
        raise _StudyError(f"{where}.{key}", "missing", fix)
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _StudyError(f"{where}.{key}", f"{value!r} has the wrong type", fix)
    return value


def _bounds(table: dict, where: str, what: str) -> tuple[float, float]:
    fix = f"write {where}.min and {where}.max as numbers with min < max (the public range of {what})"
    lo = float(_need(table, "min", where, (int, float), fix))  # type: ignore[arg-type]
    hi = float(_need(table, "max", where, (int, float), fix))  # type: ignore[arg-type]
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise _StudyError(f"{where}.min", f"bounds [{_fmt(lo)}, {_fmt(hi)}] are not a range", fix)
    return lo, hi


def parse_study(text: str) -> Study:
    """Parse ``study.toml`` text; raise :class:`FedrecInputError` (one line) when invalid."""
    try:
        return _parse_study(text)
    except _StudyError as err:
        raise FedrecInputError(err.problem.line()) from None


def _parse_study(text: str) -> Study:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = str(err).splitlines()[0]
        m = re.search(r"line (\d+)", msg)
        raise _StudyError(None, f"not valid TOML ({msg})", "correct the TOML syntax (key = value, [table])",
                          row=int(m.group(1)) if m else None) from None
    for table in ("study", "engagement", "outcome", "covariates"):
        if not isinstance(doc.get(table), dict):
            raise _StudyError(f"[{table}]", "table missing", f"add a [{table}] table as in docs/data-contract.md")
    st, eng, out, covs = doc["study"], doc["engagement"], doc["outcome"], doc["covariates"]
    domain = str(_need(st, "domain", "study", (str,), "name the domain, e.g. domain = \"health\""))
    contract = st.get("contract", CONTRACT_VERSION)
    if contract != CONTRACT_VERSION:
        raise _StudyError("study.contract", f"contract version {contract!r} is not supported",
                          f"write contract = {CONTRACT_VERSION}")
    kind = _need(eng, "kind", "engagement", (str,), 'write kind = "rating" or kind = "click"')
    if kind not in ("rating", "click"):
        raise _StudyError("engagement.kind", f"{kind!r} is not rating or click", 'write kind = "rating" or "click"')
    if kind == "click":
        ebounds = (0.0, 1.0)
        if "min" in eng or "max" in eng:
            got = (float(eng.get("min", 0)), float(eng.get("max", 1)))
            if got != ebounds:
                raise _StudyError("engagement.min", "clicks are 0/1", "drop min/max for kind = \"click\"")
    else:
        ebounds = _bounds(eng, "engagement", "ratings")
    oname = str(_need(out, "name", "outcome", (str,), 'name the outcome, e.g. name = "weight_change"'))
    unit = str(_need(out, "unit", "outcome", (str,), 'give the unit, e.g. unit = "kg"'))
    obounds = _bounds(out, "outcome", "the outcome")
    better = out.get("better", "higher")
    if better not in ("higher", "lower"):
        raise _StudyError("outcome.better", f"{better!r} is not higher or lower",
                          'write better = "higher" or better = "lower"')
    if not covs:
        raise _StudyError("[covariates]", "no covariates declared",
                          "declare each person covariate as [covariates.NAME] with kind and bounds")
    covariates = []
    for name, spec in covs.items():
        where = f"covariates.{name}"
        if not _NAME_RE.match(name) or name in ("person_id",):
            raise _StudyError(where, f"{name!r} is not a usable column name",
                              "use letters, digits and _ (not starting with a digit), not person_id")
        if not isinstance(spec, dict):
            raise _StudyError(where, "is not a table", f"write [covariates.{name}] with kind = ...")
        ck = _need(spec, "kind", where, (str,), "write kind = number | integer | binary | category")
        if ck not in _KINDS:
            raise _StudyError(f"{where}.kind", f"{ck!r} is not a covariate kind",
                              "write kind = number | integer | binary | category")
        desc = str(spec.get("description", ""))
        if ck in ("number", "integer"):
            lo, hi = _bounds(spec, where, name)
            covariates.append(Covariate(name, ck, lo, hi, description=desc))  # type: ignore[arg-type]
        elif ck == "binary":
            covariates.append(Covariate(name, "binary", 0.0, 1.0, description=desc))
        else:
            levels = spec.get("levels")
            if (not isinstance(levels, list) or len(levels) < 2 or not all(isinstance(v, str) and v for v in levels)
                    or len(set(levels)) != len(levels)):
                raise _StudyError(f"{where}.levels", "needs a list of at least two distinct texts",
                                  'write levels = ["a", "b", ...]')
            covariates.append(Covariate(name, "category", 0.0, 1.0, tuple(levels), desc))
    causal_covariates, causal_derived = _causal_table(doc.get("causal", {}))
    causal_graph = _graph_table(doc)
    study = Study(
        domain=domain,
        covariates=tuple(covariates),
        outcome_name=oname,
        outcome_unit=unit,
        outcome_bounds=obounds,
        outcome_better=better,  # type: ignore[arg-type]
        engagement_kind=kind,  # type: ignore[arg-type]
        engagement_bounds=ebounds,
        title=str(st.get("title", "")),
        person_unit=str(st.get("person_unit", "person")),
        contract=int(contract),
        causal_covariates=causal_covariates,
        causal_derived=causal_derived,
        causal_graph=causal_graph,
    )
    if causal_covariates is not None or causal_derived:
        from fedrec.common.causal.design import design_columns_of  # lazy: design imports this module

        try:
            design_columns_of(study, causal_covariates, causal_derived,
                              where_covariates="causal.covariates", where_derived="causal.derived")
        except FedrecInputError as err:  # "KEY: message; fix: fix" -> a study.toml problem at KEY
            key, _, rest = str(err).partition(": ")
            message, _, fix = rest.rpartition("; fix: ")
            raise _StudyError(key, message or rest, fix if message else "see docs/data-contract.md ([causal])") from None
    return study


def _causal_table(table: object) -> tuple[Optional[tuple[str, ...]], tuple[str, ...]]:
    """``[causal]``: optional ``covariates`` and ``derived`` lists of texts (names are checked
    against the declared covariates by the caller)."""
    if not isinstance(table, dict):
        raise _StudyError("causal", "is not a table", "write [causal] with covariates = [...] and/or derived = [...]")
    unknown = sorted(set(table) - {"covariates", "derived", "graph"})
    if unknown:
        raise _StudyError(f"causal.{unknown[0]}", "is not a [causal] key", "use covariates = [...] or derived = [...]")
    lists = {}
    for key in ("covariates", "derived"):
        if key in table:
            v = table[key]
            if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
                raise _StudyError(f"causal.{key}", "needs a list of texts",
                                  f'write {key} = ["..."] (see docs/data-contract.md)')
            lists[key] = tuple(x.strip() for x in v)
    if "covariates" in lists and not lists["covariates"] and not lists.get("derived"):
        raise _StudyError("causal.covariates", "is empty and nothing is derived",
                          "name at least one covariate or derived feature, or drop the key (all covariates)")
    return lists.get("covariates"), lists.get("derived", ())


def _graph_table(doc: dict) -> Optional[dict]:
    """``[causal.graph]`` (or a top-level ``[graph]``): parsed by common/causal/graph.py (edges,
    acyclicity, roles), returned normalized; a problem is one line naming the key."""
    causal = doc.get("causal", {})
    tables = [(k, t) for k, t in (("graph", doc.get("graph")),
                                  ("causal.graph", causal.get("graph") if isinstance(causal, dict) else None))
              if t is not None]
    if not tables:
        return None
    if len(tables) > 1:
        raise _StudyError("graph", "declared twice ([graph] and [causal.graph])", "keep one of the two tables")
    key, table = tables[0]
    from fedrec.common.causal.graph import parse_graph  # lazy: networkx only for studies with a graph

    try:
        g = parse_graph(table, where=key)
    except FedrecInputError as err:  # "KEY: message; fix: fix" -> a study.toml problem at KEY
        where, _, rest = str(err).partition(": ")
        message, _, fix = rest.rpartition("; fix: ")
        raise _StudyError(where, message or rest, fix or "see docs/strategies.md (A declared causal graph)") from None
    return {"treatment": g.treatment, "outcome": g.outcome, "mediators": list(g.mediators),
            "latent": sorted(g.latent),
            "edges": [" -> ".join(part.strip() for part in str(e).partition("->")[::2]) for e in table["edges"]]}


def read_study(path: Path) -> Study:
    """Read and parse a ``study.toml`` file (FedrecInputError when missing or invalid)."""
    path = Path(path)
    if _probe(path)[0] == "missing":
        raise FedrecInputError(f"{STUDY_FILE}: missing in {path.parent}; fix: write it as in docs/data-contract.md")
    problems: list[Problem] = []
    data = _read_bytes(path, problems)
    if data is None:
        raise FedrecInputError(problems[0].line())
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FedrecInputError(f"{STUDY_FILE}: not UTF-8 text; fix: save it as UTF-8") from None
    return parse_study(text)


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One problem: where (file, row, column) and the fix. ``line()`` is what users see."""

    file: str
    row: Optional[int]
    column: Optional[str]
    message: str
    fix: str
    field_label: str = "column"

    def line(self) -> str:
        where = self.file
        if self.row is not None:
            where += f" row {self.row}"
        if self.column is not None:
            where += f", {self.field_label} {self.column}"
        return f"{where}: {self.message}; fix: {self.fix}".replace("\n", " ")


@dataclass(frozen=True)
class ValidatedTables:
    """The three typed tables of a valid folder, plus its study.

    people: ``person_id`` (str) + covariates (int64 for integer/binary, float64 for number,
    str for category), in file order. items: ``item_id, name, description, category`` (str).
    interactions: ``person_id, item_id`` (str), ``exposed`` (int64 0/1), ``engagement``
    (float64, NaN exactly where exposed = 0), ``outcome`` (float64), ``timestamp``
    (datetime64[ns]). Extra columns are dropped.
    """

    people: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    study: Study


@dataclass
class Validation:
    """Result of :func:`validate_folder`: every problem, and the tables when there are none."""

    folder: Path
    problems: list[Problem] = field(default_factory=list)
    tables: Optional[ValidatedTables] = None

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- reading


def table_path(folder: Path, stem: str) -> list[Path]:
    """The paths present for table ``stem`` (``.csv`` and/or ``.parquet``), whatever they are
    (a file, a folder, a path that cannot be inspected): :func:`validate_folder` says which
    cannot be read."""
    return [p for p in (folder / f"{stem}.csv", folder / f"{stem}.parquet") if _probe(p)[0] != "missing"]


_READ_FIX = ("give the user running fedrec-client read access to it (check its owner and permissions, "
             "e.g. chmod u+r), or copy it into the folder as a plain file")


def _probe(path: Path) -> tuple[Literal["missing", "file", "folder", "other", "error"], str]:
    """What ``path`` is, without following it into a traceback: ``missing``, ``file`` (a
    regular file, after symlinks), ``folder``, ``other`` (a device, pipe, socket) or ``error``
    (it exists but cannot be inspected; the second item is the OS's reason)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return ("error", "a broken link") if os.path.islink(path) else ("missing", "")
    except OSError as err:
        return "error", err.strerror or type(err).__name__
    if stat.S_ISREG(st.st_mode):
        return "file", ""
    if stat.S_ISDIR(st.st_mode):
        return "folder", ""
    return "other", ""


def _not_a_file(path: Path, kind: str, reason: str) -> Problem:
    """The problem for a path that is present but is not a readable regular file."""
    if kind == "folder":
        return Problem(path.name, None, None, "is a folder, not a file",
                       f"put the {path.name} file itself here (not a folder of that name)")
    if kind == "other":
        return Problem(path.name, None, None, "is not a regular file (a device, pipe or socket)",
                       f"copy the data into a plain {path.name} file")
    if reason == "a broken link":
        return Problem(path.name, None, None, "cannot be read (a broken link)",
                       "point the link at an existing file, or copy the file itself into the folder")
    return Problem(path.name, None, None, f"cannot be read ({reason})", _READ_FIX)


def _read_bytes(path: Path, out: list[Problem]) -> Optional[bytes]:
    """The file's bytes, or None with a one-line problem when it is not a readable file."""
    kind, reason = _probe(path)
    if kind != "file":
        out.append(_not_a_file(path, kind, reason) if kind != "missing"
                   else Problem(path.name, None, None, "missing", f"provide {path.name}"))
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        out.append(Problem(path.name, None, None, f"cannot be read ({err.strerror or type(err).__name__})", _READ_FIX))
        return None


@dataclass
class _Table:
    name: str  # file name shown in messages
    frame: pd.DataFrame
    row_offset: int  # row number = index + row_offset
    is_csv: bool


def _read_csv(path: Path, out: list[Problem]) -> Optional[_Table]:
    name = path.name
    data = _read_bytes(path, out)
    if data is None:
        return None
    if not data.strip():
        out.append(Problem(name, None, None, "file is empty",
                           "write a header row with the contract's columns, then one row per record"))
        return None
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(data)]])
    long = np.flatnonzero(ends - starts > MAX_LINE_BYTES)
    if long.size:
        i = int(long[0])
        out.append(Problem(name, i + 1, None, f"line is {int(ends[i] - starts[i]):,} bytes long (limit {MAX_LINE_BYTES:,})",
                           "check for a missing line break or a huge value pasted into a cell"))
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = int(np.searchsorted(nl, err.start)) + 1
        line_start = int(starts[line - 1])
        header = next(csv.reader([data[: ends[0]].decode("utf-8", "replace")]), [])
        col_i = data[line_start: err.start].count(b",")
        col = header[col_i].strip() if line > 1 and col_i < len(header) else None
        out.append(Problem(name, line, col, f"byte 0x{data[err.start]:02x} is not UTF-8 text",
                           "save the file as UTF-8 (e.g. 'Save as CSV UTF-8')"))
        return None
    header = next(csv.reader([text.split("\n", 1)[0].rstrip("\r")]), [])
    seen: set[str] = set()
    for h in header:
        h = h.strip()
        if h in seen:
            out.append(Problem(name, 1, h, "column appears twice in the header", "keep one column of each name"))
            return None
        seen.add(h)
        if not h:
            out.append(Problem(name, 1, None, "header has an empty column name", "name every column or delete the empty one"))
            return None
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                            skipinitialspace=True)
    except pd.errors.ParserError as err:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
        if m:
            out.append(Problem(name, int(m.group(2)), None,
                               f"has {m.group(3)} fields but the header has {m.group(1)}",
                               "quote values that contain commas and give every row the header's columns"))
        else:
            out.append(Problem(name, None, None, f"cannot be parsed as CSV ({str(err).strip().splitlines()[0]})",
                               "write comma-separated UTF-8 text with one header row"))
        return None
    frame.columns = [str(c).strip() for c in frame.columns]
    return _Table(name, frame, 2, True)


def _read_parquet(path: Path, out: list[Problem]) -> Optional[_Table]:
    kind, reason = _probe(path)
    if kind != "file":
        out.append(_not_a_file(path, kind, reason))
        return None
    try:
        with open(path, "rb"):  # permission problems get their own line, not a reader's error
            pass
    except OSError as err:
        out.append(Problem(path.name, None, None, f"cannot be read ({err.strerror or type(err).__name__})", _READ_FIX))
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is the user's file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        out.append(Problem(path.name, None, None, f"not a readable Parquet file ({_fmt(first)})",
                           "write it with pandas.DataFrame.to_parquet or pyarrow, or provide a CSV instead"))
        return None
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c).strip() for c in frame.columns]
    return _Table(path.name, frame, 1, False)


def _read_table(folder: Path, stem: str, out: list[Problem]) -> Optional[_Table]:
    paths = table_path(folder, stem)
    if not paths:
        out.append(Problem(f"{stem}.csv", None, None, f"missing in {folder}",
                           f"provide {stem}.csv or {stem}.parquet (see docs/data-contract.md)"))
        return None
    if len(paths) > 1:
        out.append(Problem(paths[0].name, None, None, f"both {stem}.csv and {stem}.parquet exist",
                           "keep exactly one of them"))
        return None
    path = paths[0]
    table = _read_csv(path, out) if path.suffix == ".csv" else _read_parquet(path, out)
    if table is None:
        return None
    if len(table.frame) == 0:
        out.append(Problem(table.name, None, None, "has a header but no rows", "write at least one record"))
        return None
    return table


# --------------------------------------------------------------------------- cell checks


class _Reporter:
    """Adds problems for flagged rows: the first few one by one, then one summary line."""

    def __init__(self, out: list[Problem], table: _Table):
        self.out, self.t = out, table

    def rows(self, column: Optional[str], mask: np.ndarray, message: Callable[[int], str], fix: str) -> None:
        idx = np.flatnonzero(mask)
        for i in idx[:MAX_LINES_PER_KIND]:
            self.out.append(Problem(self.t.name, int(i) + self.t.row_offset, column, message(int(i)), fix))
        if idx.size > MAX_LINES_PER_KIND:
            rest = idx[MAX_LINES_PER_KIND:] + self.t.row_offset
            first = int(idx[MAX_LINES_PER_KIND])
            msg = message(first)
            if rest.size > 1:
                shown = ", ".join(str(int(r)) for r in rest[1:9]) + (", ..." if rest.size > 9 else "")
                msg += f" (and {rest.size - 1} more rows like it: {shown})"
            self.out.append(Problem(self.t.name, int(rest[0]), column, msg, fix))

    def column_missing(self, column: str, fix: str) -> None:
        self.out.append(Problem(self.t.name, 1 if self.t.is_csv else None, column, "column missing", fix))


def _missing_mask(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.isna().to_numpy()
    text = s.astype(object).where(s.notna(), "").astype(str).str.strip().str.lower()
    return (s.isna() | text.isin(MISSING_TOKENS)).to_numpy()


def _to_number(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, missing, bad): float values (NaN where missing/bad); bad = present but not a
    finite number."""
    missing = _missing_mask(s)
    if pd.api.types.is_bool_dtype(s.dtype):
        vals = s.astype(float).to_numpy()
        return vals, missing, np.zeros(len(s), bool)
    if pd.api.types.is_numeric_dtype(s.dtype):
        vals = s.to_numpy(dtype=float, na_value=np.nan)
    else:
        text = s.astype(object).where(~missing, None)
        vals = np.full(len(s), np.nan)
        present = ~missing
        vals[present] = pd.to_numeric(text[present].astype(str).str.strip(), errors="coerce").to_numpy(dtype=float)
    bad = ~missing & ~np.isfinite(vals)
    vals = np.where(bad | missing, np.nan, vals)
    return vals, missing, bad


def _text(s: pd.Series) -> pd.Series:
    return s.astype(object).where(s.notna(), "").astype(str).str.strip()


def _id_text(s: pd.Series) -> pd.Series:
    """Ids as text. CSV ids are read as text already; a numeric Parquet id column is written
    the way it would read in a CSV: whole numbers without ``.0`` (a float column holding ids
    7 and NaN says ``7``, the same id as an integer column's 7)."""
    if pd.api.types.is_float_dtype(s.dtype):
        vals = s.to_numpy(dtype=float, na_value=np.nan)
        whole = np.isfinite(vals) & (vals == np.round(vals)) & (np.abs(vals) < 2.0**63)
        text = _text(s).to_numpy(dtype=object)
        text[whole] = [str(int(v)) for v in vals[whole]]
        return pd.Series(text, index=s.index, dtype=object).astype(str)
    return _text(s)


def _bad_id_mask(s: pd.Series, missing: np.ndarray) -> np.ndarray:
    """Present ids that are not usable: infinite numbers (a numeric Parquet id column)."""
    if pd.api.types.is_float_dtype(s.dtype):
        vals = s.to_numpy(dtype=float, na_value=np.nan)
        return ~missing & ~np.isfinite(vals)
    return np.zeros(len(s), bool)


def _check_ids(rep: _Reporter, s: pd.Series, column: str, what: str) -> pd.Series:
    ids = _id_text(s)
    missing = _missing_mask(s)
    rep.rows(column, missing, lambda i: f"{what} is empty", f"give every row a {column}")
    bad = _bad_id_mask(s, missing)
    rep.rows(column, bad, lambda i: f"{_fmt(ids.iat[i])!r} is not an id", f"give every row a finite {column} (text or a whole number)")
    missing = missing | bad
    dup = ids.duplicated(keep="first").to_numpy() & ~missing
    if dup.any():
        firsts = {v: int(i) for i, v in zip(ids.index[~ids.duplicated()], ids[~ids.duplicated()])}
        rep.rows(column, dup, lambda i: f"{what} {_fmt(ids.iat[i])!r} repeats row {firsts[ids.iat[i]] + rep.t.row_offset}",
                 f"make each {column} unique (one row per {what})")
    return ids


def _check_covariate(rep: _Reporter, s: pd.Series, cov: Covariate) -> Optional[pd.Series]:
    name = cov.name
    raw = _text(s)
    bounds = f"[{_fmt(cov.lower)}, {_fmt(cov.upper)}]"
    if cov.kind == "category":
        missing = _missing_mask(s)
        rep.rows(name, missing, lambda i: "value is empty", f"write one of {', '.join(cov.levels)}")
        bad = ~missing & ~raw.isin(cov.levels).to_numpy()
        rep.rows(name, bad, lambda i: f"{_fmt(raw.iat[i])!r} is not a declared level",
                 f"write one of {', '.join(cov.levels)} or add the level to study.toml")
        return raw.reset_index(drop=True)
    vals, missing, bad = _to_number(s)
    rng = "0 or 1" if cov.kind == "binary" else f"a number within {bounds}"
    rep.rows(name, missing, lambda i: "value is empty (missing)",
             f"write {rng} as declared in study.toml (impute before export; missing values are not allowed)")
    rep.rows(name, bad, lambda i: f"{_fmt(raw.iat[i])!r} is not a number", f"write {rng} as declared in study.toml")
    ok = np.isfinite(vals)
    if cov.kind == "binary":
        wrong = ok & (vals != 0) & (vals != 1)
        rep.rows(name, wrong, lambda i: f"{_fmt(vals[i])!r} is not 0 or 1", "write 0 or 1 (binary covariate)")
    else:
        out = ok & ((vals < cov.lower) | (vals > cov.upper))
        rep.rows(name, out, lambda i: f"{_fmt(vals[i])} is outside {bounds} declared in study.toml",
                 f"correct the value, or widen the public bounds of {name} in study.toml")
        if cov.kind == "integer":
            frac = ok & ~out & (vals != np.round(vals))
            rep.rows(name, frac, lambda i: f"{_fmt(vals[i])} is not a whole number",
                     f"write a whole number within {bounds}, or declare kind = \"number\"")
    if cov.kind == "number":
        return pd.Series(vals, dtype="float64")
    return pd.Series(np.where(np.isfinite(vals), vals, 0).astype(np.int64))


def _require_columns(rep: _Reporter, frame: pd.DataFrame, columns: tuple[str, ...], fix: str) -> bool:
    ok = True
    for c in columns:
        if c not in frame.columns:
            rep.column_missing(c, fix)
            ok = False
    return ok


# --------------------------------------------------------------------------- the folder


def validate_folder(folder: Path) -> Validation:
    """Read and validate one institution folder; nothing is modified.

    Returns a :class:`Validation` listing every problem; when there are none, ``tables`` holds
    the typed tables (:class:`ValidatedTables`).
    """
    folder = Path(folder)
    result = Validation(folder)
    out = result.problems
    kind, reason = _probe(folder)
    if kind == "error":
        out.append(Problem(str(folder), None, None, f"cannot be read ({reason})", _READ_FIX))
        return result
    if kind != "folder":
        out.append(Problem(str(folder), None, None, "is not a folder", "give the institution folder holding people, items, interactions and study.toml"))
        return result
    try:
        os.listdir(folder)
    except OSError as err:
        out.append(Problem(str(folder), None, None, f"cannot be read ({err.strerror or type(err).__name__})",
                           _READ_FIX))
        return result
    study: Optional[Study] = None
    study_path = folder / STUDY_FILE
    if _probe(study_path)[0] == "missing":
        out.append(Problem(STUDY_FILE, None, None, f"missing in {folder}", "write study.toml as in docs/data-contract.md"))
    else:
        data = _read_bytes(study_path, out)
        try:
            if data is not None:
                study = _parse_study(data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            out.append(Problem(STUDY_FILE, None, None, "not UTF-8 text", "save it as UTF-8"))
        except _StudyError as err:
            out.append(err.problem)
    tables = {stem: _read_table(folder, stem, out) for stem in TABLES}
    people = items = inter = None
    if tables["people"] is not None and study is not None:
        people = _check_people(tables["people"], study, out)
    if tables["items"] is not None:
        items = _check_items(tables["items"], out)
    if tables["interactions"] is not None and study is not None:
        inter = _check_interactions(tables["interactions"], study, people, items, out)
    if not out and people is not None and items is not None and inter is not None and study is not None:
        result.tables = ValidatedTables(people, items, inter, study)
    return result


def _check_people(t: _Table, study: Study, out: list[Problem]) -> Optional[pd.DataFrame]:
    rep = _Reporter(out, t)
    f = t.frame
    fix_cov = "add one column per covariate declared in study.toml (or remove the declaration)"
    ok = _require_columns(rep, f, ("person_id",), "add a person_id column (one row per person)")
    ok &= _require_columns(rep, f, study.covariate_names, fix_cov)
    cols: dict[str, pd.Series] = {}
    if "person_id" in f.columns:
        cols["person_id"] = _check_ids(rep, f["person_id"], "person_id", "person").reset_index(drop=True)
    for cov in study.covariates:
        if cov.name in f.columns:
            cols[cov.name] = _check_covariate(rep, f[cov.name], cov)
    if not ok:
        return None
    return pd.DataFrame(cols)


def _check_items(t: _Table, out: list[Problem]) -> Optional[pd.DataFrame]:
    rep = _Reporter(out, t)
    f = t.frame
    ok = _require_columns(rep, f, REQUIRED_COLUMNS["items"], "add the column (items need item_id, name, description, category)")
    cols: dict[str, pd.Series] = {}
    if "item_id" in f.columns:
        cols["item_id"] = _check_ids(rep, f["item_id"], "item_id", "item").reset_index(drop=True)
    for c, what in (("name", "a short name"), ("description", "a text description"), ("category", "a category")):
        if c in f.columns:
            rep.rows(c, _missing_mask(f[c]), lambda i: "value is empty", f"give every item {what}")
            cols[c] = _text(f[c]).reset_index(drop=True)
    if not ok:
        return None
    return pd.DataFrame(cols)[list(REQUIRED_COLUMNS["items"])]


def _check_interactions(t: _Table, study: Study, people: Optional[pd.DataFrame], items: Optional[pd.DataFrame],
                        out: list[Problem]) -> Optional[pd.DataFrame]:
    rep = _Reporter(out, t)
    f = t.frame
    ok = _require_columns(rep, f, REQUIRED_COLUMNS["interactions"],
                          "add the column (interactions need person_id, item_id, exposed, engagement, outcome, timestamp)")
    cols: dict[str, pd.Series] = {}
    for c, ref, what in (("person_id", people, "person"), ("item_id", items, "item")):
        if c not in f.columns:
            continue
        ids = _id_text(f[c]).reset_index(drop=True)
        missing = _missing_mask(f[c])
        rep.rows(c, missing, lambda i: f"{what} is empty", f"give every row a {c}")
        bad = _bad_id_mask(f[c], missing)
        rep.rows(c, bad, lambda i: f"{_fmt(ids.iat[i])!r} is not an id", f"give every row a finite {c} (text or a whole number)")
        missing = missing | bad
        if ref is not None and c in ref.columns:
            table = "people" if what == "person" else "items"
            dangling = ~missing & ~ids.isin(ref[c]).to_numpy()
            rep.rows(c, dangling, lambda i: f"{what} {_fmt(ids.iat[i])!r} is not in the {table} file",
                     f"add the {what} to the {table} file or delete this row")
        cols[c] = ids
    if "person_id" in cols and "item_id" in cols:
        pair = cols["person_id"] + "\x1f" + cols["item_id"]
        dup = pair.duplicated(keep="first").to_numpy()
        if dup.any():
            firsts = {v: int(i) for i, v in zip(pair.index[~pair.duplicated()], pair[~pair.duplicated()])}
            rep.rows("item_id", dup,
                     lambda i: f"person {_fmt(cols['person_id'].iat[i])!r} and item {_fmt(cols['item_id'].iat[i])!r} repeat row {firsts[pair.iat[i]] + t.row_offset}",
                     "keep one row per person and item (the item a person was considered for, once)")
    exposed = None
    exposed_ok = np.ones(len(f), bool)
    if "exposed" in f.columns:
        raw = _text(f["exposed"])
        vals, missing, bad = _to_number(f["exposed"])
        rep.rows("exposed", missing | bad | (np.isfinite(vals) & (vals != 0) & (vals != 1)),
                 lambda i: f"{_fmt(raw.iat[i])!r} is not 0 or 1" if raw.iat[i] else "value is empty",
                 "write 1 if the item was recommended/assigned to the person, else 0")
        exposed = np.where(vals == 1, 1, 0).astype(np.int64)
        exposed_ok = (vals == 0) | (vals == 1)
        if exposed_ok.all() and not exposed.any():
            # nothing to train on: refuse here, before any run is planned or charged
            rep.out.append(Problem(t.name, None, "exposed", f"no row has exposed = 1 (0 of {len(f):,} rows): no "
                                   "person was recommended, assigned or shown an item, so there is nothing to train on",
                                   "include the rows where an item was recommended/assigned/shown (exposed = 1, with "
                                   "its engagement), or check that exposed is coded 1 for shown, 0 for not shown"))
        cols["exposed"] = pd.Series(exposed)
    if "engagement" in f.columns:
        raw = _text(f["engagement"])
        vals, missing, bad = _to_number(f["engagement"])
        lo, hi = study.engagement_bounds
        kind = study.engagement_kind
        want = "0 or 1 (click)" if kind == "click" else f"a rating within [{_fmt(lo)}, {_fmt(hi)}]"
        rep.rows("engagement", bad, lambda i: f"{_fmt(raw.iat[i])!r} is not a number", f"write {want} as declared in study.toml")
        okv = np.isfinite(vals)
        if kind == "click":
            wrong = okv & (vals != 0) & (vals != 1)
            rep.rows("engagement", wrong, lambda i: f"{_fmt(vals[i])} is not a click (0 or 1)", "write 0 or 1, as study.toml declares kind = \"click\"")
        else:
            wrong = okv & ((vals < lo) | (vals > hi))
            rep.rows("engagement", wrong, lambda i: f"{_fmt(vals[i])} is outside [{_fmt(lo)}, {_fmt(hi)}] declared in study.toml",
                     "correct the rating or the engagement bounds in study.toml")
        if exposed is not None:
            need = exposed_ok & (exposed == 1) & missing
            rep.rows("engagement", need, lambda i: "value is empty but exposed = 1",
                     f"write the observed engagement, {want}, for every exposed row")
            extra = exposed_ok & (exposed == 0) & ~missing
            rep.rows("engagement", extra, lambda i: f"{_fmt(raw.iat[i])!r} given but exposed = 0",
                     "leave engagement empty when the item was not shown (exposed = 0)")
            vals = np.where(exposed == 1, vals, np.nan)
        cols["engagement"] = pd.Series(vals, dtype="float64")
    if "outcome" in f.columns:
        raw = _text(f["outcome"])
        vals, missing, bad = _to_number(f["outcome"])
        lo, hi = study.outcome_bounds
        want = f"a number within [{_fmt(lo)}, {_fmt(hi)}] ({study.outcome_unit})"
        rep.rows("outcome", missing, lambda i: "value is empty", f"write the measured {study.outcome_name}, {want}; drop rows without a measurement")
        rep.rows("outcome", bad, lambda i: f"{_fmt(raw.iat[i])!r} is not a number", f"write {want}")
        wrong = np.isfinite(vals) & ((vals < lo) | (vals > hi))
        rep.rows("outcome", wrong, lambda i: f"{_fmt(vals[i])} is outside [{_fmt(lo)}, {_fmt(hi)}] declared in study.toml",
                 "correct the value, or widen outcome.min/outcome.max in study.toml")
        cols["outcome"] = pd.Series(vals, dtype="float64")
    if "timestamp" in f.columns:
        cols["timestamp"] = _check_timestamps(rep, f["timestamp"])
    if "propensity" in f.columns:  # optional: the institution's logger's P(exposed = 1 | person) per row
        raw = _text(f["propensity"])
        vals, missing, bad = _to_number(f["propensity"])
        fix = ("write the probability the institution's recommender gave this exposure, in (0, 1] "
               "(or drop the column: the causal run's pooled propensity is used)")
        rep.rows("propensity", missing, lambda i: "value is empty", fix)
        rep.rows("propensity", bad, lambda i: f"{_fmt(raw.iat[i])!r} is not a number", fix)
        wrong = np.isfinite(vals) & ((vals <= 0) | (vals > 1))
        rep.rows("propensity", wrong, lambda i: f"{_fmt(vals[i])} is outside (0, 1]", fix)
        cols["propensity"] = pd.Series(vals, dtype="float64")
    if not ok:
        return None
    keep = list(REQUIRED_COLUMNS["interactions"]) + (["propensity"] if "propensity" in cols else [])
    return pd.DataFrame(cols)[keep]


def _check_timestamps(rep: _Reporter, s: pd.Series) -> pd.Series:
    """The timestamp column as naive ``datetime64[ns]`` (UTC where an offset or time zone was
    given, as written otherwise); NaT where a problem was reported.

    Text (CSV, or a Parquet text column) must be strict ISO 8601 (:data:`_ISO_RE`) with a year in
    :data:`TIMESTAMP_YEARS`; a Parquet timestamp/date column of any unit is range-checked
    *before* conversion to nanoseconds (a year-2300 microsecond value would otherwise wrap to
    1715 silently)."""
    lo_year, hi_year = TIMESTAMP_YEARS
    span = f"the accepted range {lo_year}-01-01 to {hi_year}-12-31"
    range_fix = "correct the date (a mistyped year?); timestamps say when the person was considered"
    missing = _missing_mask(s)
    rep.rows("timestamp", missing, lambda i: "value is empty", "write when the person was considered, e.g. 2024-03-05")
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        if getattr(s.dt, "tz", None) is not None:
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        s = s.reset_index(drop=True)
        lo = np.datetime64(f"{lo_year}-01-01T00:00:00", "s")
        hi = np.datetime64(f"{hi_year + 1}-01-01T00:00:00", "s")
        raw = s.to_numpy()  # the column's own unit: no conversion yet, so no overflow
        present = ~missing
        out = present & ((raw < lo) | (raw >= hi))
        rep.rows("timestamp", out, lambda i: f"{pd.Timestamp(raw[i])} is outside {span}", range_fix)
        keep = present & ~out
        ts = np.full(len(s), np.datetime64("NaT"), dtype="datetime64[ns]")
        ts[keep] = raw[keep].astype("datetime64[ns]")
        return pd.Series(ts, dtype="datetime64[ns]")
    raw = _text(s).reset_index(drop=True)
    fix = ("write e.g. 2024-03-05 or 2024-03-05T14:30:00 (YYYY-MM-DD, two-digit month and day)"
           if rep.t.is_csv else "store a timestamp or date column, or ISO 8601 text such as 2024-03-05T14:30:00")
    form_ok = ~missing & raw.str.fullmatch(_ISO_RE.pattern).fillna(False).to_numpy(dtype=bool)
    rep.rows("timestamp", ~missing & ~form_ok, lambda i: f"{_fmt(raw.iat[i])!r} is not an ISO 8601 date/time", fix)
    year = raw.str.slice(0, 4)  # four ASCII digits wherever form_ok: compared as text, no parsing
    out = form_ok & ((year < f"{lo_year:04d}") | (year > f"{hi_year:04d}")).to_numpy(dtype=bool)
    rep.rows("timestamp", out, lambda i: f"{_fmt(raw.iat[i])!r} is outside {span}", range_fix)
    keep = form_ok & ~out
    ts = np.full(len(s), np.datetime64("NaT"), dtype="datetime64[ns]")
    if keep.any():
        # times with an offset are converted to UTC; times without one are kept as written
        parsed = pd.to_datetime(raw[keep].str.replace(",", ".", regex=False), format="ISO8601",
                                errors="coerce", utc=True)
        vals = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
        invalid = np.zeros(len(s), bool)
        invalid[np.flatnonzero(keep)[np.isnat(vals)]] = True
        rep.rows("timestamp", invalid, lambda i: f"{_fmt(raw.iat[i])!r} is not a real date/time (no such month, day or hour)", fix)
        ts[keep] = vals
    return pd.Series(ts, dtype="datetime64[ns]")
