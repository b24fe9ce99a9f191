"""Read institution data in the contract (CSV or Parquet), for simulations and deployment alike.

One loader: :func:`load_institution` validates a folder once (``fedrec.common.schema``) and
returns typed tables; :func:`load_federation` reads a folder of institution folders. The
simulated domains (``fedrec.simulations.domains``) build the same :class:`InstitutionData` in
memory and write it with :func:`write_institution`, so what a simulation trains on is what an
institution would load. :class:`GroundTruth` is what simulations grade against; it lives here
(a plain contract type) so that graders need not import the simulators.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedrec.common.errors import FedrecInputError
from fedrec.common.schema import STUDY_FILE, Study, validate_folder

__all__ = [
    "InstitutionData",
    "GroundTruth",
    "GROUND_TRUTH_DIR",
    "load_institution",
    "load_federation",
    "write_institution",
    "write_ground_truth",
    "read_ground_truth",
]

#: Folder name, beside the institution folders, holding a simulation's ground truth.
GROUND_TRUTH_DIR = "ground_truth"


@dataclass(frozen=True)
class InstitutionData:
    """One institution's validated tables (see ``ValidatedTables`` for the column types).

    ``people``: person_id + covariates; ``items``: item_id, name, description, category;
    ``interactions``: one row per (person, item considered) with person_id, item_id, exposed
    (0/1), engagement (NaN exactly where exposed = 0), outcome, timestamp.
    """

    name: str
    people: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    study: Study

    def covariate_matrix(self) -> np.ndarray:
        """People's covariates as a float matrix in ``study.design_columns()`` order
        (categories one-hot, first level dropped), rows in ``people`` order."""
        cols = []
        for c in self.study.covariates:
            if c.kind == "category":
                cols.extend((self.people[c.name] == lv).to_numpy(float) for lv in c.levels[1:])
            else:
                cols.append(self.people[c.name].to_numpy(float))
        return np.column_stack(cols) if cols else np.zeros((len(self.people), 0))

    def engagement_rows(self) -> pd.DataFrame:
        """Exposed rows only: person_id, item_id, engagement (the recommenders' training signal)."""
        rows = self.interactions[self.interactions["exposed"] == 1]
        return rows[["person_id", "item_id", "engagement"]].reset_index(drop=True)


def load_institution(folder: Path) -> InstitutionData:
    """Read and validate one institution folder.

    Raises :class:`FedrecInputError` whose message is the first problem's one line (file,
    row, column, fix); ``fedrec-client check-data`` lists them all.
    """
    folder = Path(folder)
    result = validate_folder(folder)
    if not result.ok:
        n = len(result.problems)
        more = f" ({n - 1} more: run fedrec-client check-data {folder})" if n > 1 else ""
        first = result.problems[0]
        where = "" if first.file == str(folder) else f"{folder.name}/"  # a problem with the folder itself
        raise FedrecInputError(f"{where}{first.line()}{more}")
    t = result.tables
    assert t is not None
    return InstitutionData(folder.name, t.people, t.items, t.interactions, t.study)


def load_federation(root: Path) -> list[InstitutionData]:
    """Load every institution folder (a sub-folder holding study.toml) under ``root``, in
    name order. Raises :class:`FedrecInputError` when there is none, or when the studies
    disagree (all institutions of a federation share one study declaration)."""
    root = Path(root)
    if not root.is_dir():
        raise FedrecInputError(f"{root}: no such folder; fix: give the folder holding one folder per institution")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / STUDY_FILE).is_file())
    if not folders:
        raise FedrecInputError(f"{root}: no institution folders (sub-folders with {STUDY_FILE}); "
                               "fix: point at the folder written by fedrec-sim generate, or add institution folders")
    data = [load_institution(f) for f in folders]
    first = data[0].study
    for d in data[1:]:
        if d.study != first:
            raise FedrecInputError(f"{d.name}/{STUDY_FILE}: differs from {data[0].name}/{STUDY_FILE}; "
                                   "fix: every institution of a federation declares the same study")
    return data


def write_institution(folder: Path, data: InstitutionData, *, fmt: Literal["csv", "parquet"] = "csv") -> Path:
    """Write ``data`` as a contract folder (study.toml + three tables). Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STUDY_FILE).write_text(data.study.to_toml(), encoding="utf-8")
    inter = data.interactions.copy()
    for name, frame in (("people", data.people), ("items", data.items), ("interactions", inter)):
        if fmt == "csv":
            if name == "interactions":
                frame = frame.assign(timestamp=frame["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
                eng = frame["engagement"]
                if (eng.dropna() == eng.dropna().round()).all():  # whole ratings/clicks: write "4", not "4.0"
                    frame = frame.assign(engagement=eng.astype("Int64"))
            frame.to_csv(folder / f"{name}.csv", index=False, lineterminator="\n")
        else:
            frame.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


@dataclass(frozen=True)
class GroundTruth:
    """What a simulation knows and an estimator must recover.

    Rows are people across the whole federation (``person_ids``, with ``institution`` the
    index of each person's institution), columns are items (``item_ids``).

    - ``cate[i, j]``: the true effect on person i's outcome of exposing them to item j (the
      outcome's units; additive across items);
    - ``propensity[i, j]``: the logging policy's probability of exposing person i to item j
      when considered (true propensity score);
    - ``expected_engagement[i, j]``: expected engagement if exposed (what a recommender
      trained on engagement tries to predict);
    - ``better``: ``"higher"`` or ``"lower"`` outcome is a benefit (it orients best_item).
    """

    domain: str
    policy: str
    better: Literal["higher", "lower"]
    item_ids: tuple[str, ...]
    person_ids: np.ndarray
    institution: np.ndarray
    cate: np.ndarray
    propensity: np.ndarray
    expected_engagement: np.ndarray

    @property
    def ate(self) -> pd.Series:
        """True average treatment effect per item over the federation's people (sample ATE)."""
        return pd.Series(self.cate.mean(axis=0), index=pd.Index(self.item_ids, name="item_id"), name="ate")

    def ate_by_institution(self) -> pd.DataFrame:
        """True ATE per institution (rows) and item (columns)."""
        frame = pd.DataFrame(self.cate, columns=list(self.item_ids))
        frame.insert(0, "institution", self.institution)
        return frame.groupby("institution").mean()

    @property
    def benefit(self) -> np.ndarray:
        """``cate`` oriented so that larger is better (negated when better = lower)."""
        return self.cate if self.better == "higher" else -self.cate

    @property
    def best_item(self) -> np.ndarray:
        """Each person's best item by true benefit (item_id per person)."""
        return np.asarray(self.item_ids, dtype=object)[self.benefit.argmax(axis=1)]

    @property
    def most_engaging_item(self) -> np.ndarray:
        """Each person's item with the highest expected engagement (what engagement ranks first)."""
        return np.asarray(self.item_ids, dtype=object)[self.expected_engagement.argmax(axis=1)]

    def cate_frame(self) -> pd.DataFrame:
        """Long table: person_id, institution, item_id, cate, propensity, expected_engagement."""
        n, j = self.cate.shape
        return pd.DataFrame({
            "person_id": np.repeat(self.person_ids.astype(str), j),
            "institution": np.repeat(self.institution.astype(np.int64), j),
            "item_id": np.tile(np.asarray(self.item_ids, dtype=str), n),
            "cate": self.cate.ravel(),
            "propensity": self.propensity.ravel(),
            "expected_engagement": self.expected_engagement.ravel(),
        })


def write_ground_truth(folder: Path, truth: GroundTruth, *, meta: dict | None = None) -> Path:
    """Write ``truth`` into ``folder``: truth.json (meta), ate.csv, best_item.csv, cate.parquet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"domain": truth.domain, "policy": truth.policy, "better": truth.better,
            "item_ids": list(truth.item_ids), "people": int(len(truth.person_ids))}
    info.update(meta or {})
    (folder / "truth.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    ate = truth.ate.reset_index()
    ate["mean_propensity"] = truth.propensity.mean(axis=0)
    ate["mean_expected_engagement"] = truth.expected_engagement.mean(axis=0)
    ate.to_csv(folder / "ate.csv", index=False, lineterminator="\n", float_format="%.6f")
    benefit = truth.benefit
    pd.DataFrame({
        "person_id": truth.person_ids.astype(str),
        "institution": truth.institution.astype(np.int64),
        "best_item": truth.best_item.astype(str),
        "best_cate": truth.cate[np.arange(len(benefit)), benefit.argmax(axis=1)],
        "most_engaging_item": truth.most_engaging_item.astype(str),
    }).to_csv(folder / "best_item.csv", index=False, lineterminator="\n", float_format="%.6f")
    truth.cate_frame().to_parquet(folder / "cate.parquet", index=False)
    return folder


def read_ground_truth(folder: Path) -> GroundTruth:
    """Read a ground_truth folder written by :func:`write_ground_truth`."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
        long = pd.read_parquet(folder / "cate.parquet")
    except (OSError, ValueError) as err:
        raise FedrecInputError(f"{folder}: not a ground_truth folder ({type(err).__name__}); "
                               "fix: give the ground_truth folder written by fedrec-sim generate") from None
    items = tuple(info["item_ids"])
    j = len(items)
    n = len(long) // j
    def grid(col: str) -> np.ndarray:
        return long[col].to_numpy(float).reshape(n, j)
    return GroundTruth(
        domain=info["domain"], policy=info["policy"], better=info["better"], item_ids=items,
        person_ids=long["person_id"].to_numpy(str)[::j], institution=long["institution"].to_numpy(np.int64)[::j],
        cate=grid("cate"), propensity=grid("propensity"), expected_engagement=grid("expected_engagement"),
    )

