"""MovieLens as a federation: persons partitioned non-IID across institutions, each person's
ratings split train/test (seeded), written as institution folders the client reads.

Group label for the non-IID partition: each person's most-rated genre, so institutions differ
in taste mix (a cinema club of horror fans vs one of drama fans) and in size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.common.ratings import Ratings, load_movielens, write_institution_ratings
from fedrec.simulations.partition import partition_persons, split_person_ratings

__all__ = ["MovieLensSplit", "movielens_split", "write_movielens_federation"]


@dataclass(frozen=True)
class MovieLensSplit:
    ratings: Ratings
    test: np.ndarray  # bool per rating row
    owner: np.ndarray  # institution per person


def person_groups(r: Ratings) -> np.ndarray:
    first_genre = r.items["genres"].fillna("(none)").str.split("|").str[0].to_numpy()
    genre_of_row = first_genre[r.item]
    df = pd.DataFrame({"person": r.person, "genre": genre_of_row})
    top = df.groupby("person")["genre"].agg(lambda s: s.value_counts().index[0])
    return top.reindex(range(r.n_persons)).to_numpy()


def movielens_split(*, institutions: int, skew: float, test_fraction: float, seed: int) -> MovieLensSplit:
    r = load_movielens()
    test = split_person_ratings(r.person, test_fraction=test_fraction, seed=seed)
    owner = partition_persons(person_groups(r), institutions, skew=skew, seed=seed + 1)
    return MovieLensSplit(ratings=r, test=test, owner=owner)


def write_movielens_federation(root: Path, *, institutions: int, skew: float, test_fraction: float, seed: int) -> list[Path]:
    """Write ``root/institution_XX`` folders; return them in partition order."""
    s = movielens_split(institutions=institutions, skew=skew, test_fraction=test_fraction, seed=seed)
    r = s.ratings
    catalogue = r.items  # public: item_id, title, year, genres
    folders = []
    for k in range(institutions):
        rows = s.owner[r.person] == k
        folder = root / f"institution_{k:02d}"
        tr, te = rows & ~s.test, rows & s.test
        write_institution_ratings(
            folder,
            person_ids=r.person_ids,
            item_ids=r.item_ids,
            train=(r.person[tr], r.item[tr], r.rating[tr]),
            test=(r.person[te], r.item[te], r.rating[te]),
            catalogue=catalogue,
        )
        folders.append(folder)
    return folders
