"""A small ratings institution with titled items, for the adapter and hybrid tests (not a test
module): 24 catalogue items with titles, years and genres; the given ratings split into
train and test (each person's first rating is their test item)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ["Comedy", "Drama", "Horror|Thriller", "Animation|Children", "Documentary", "Sci-Fi|Action"]
N_ITEMS = 24


def write_titled_institution(root: Path, ratings: list[tuple[int, int, float]]) -> Path:
    """Write ``root/items.parquet`` (items 1-24) and ``ratings_{train,test}.parquet`` from
    ``ratings`` (person, item, rating); return ``root`` (created)."""
    root.mkdir(parents=True)
    items = pd.DataFrame({"item_id": np.arange(1, N_ITEMS + 1),
                          "title": [f"Film number {i}" for i in range(1, N_ITEMS + 1)],
                          "year": 1990.0 + np.arange(N_ITEMS) % 20,
                          "genres": [GENRES[i % len(GENRES)] for i in range(N_ITEMS)]})
    items.to_parquet(root / "items.parquet", index=False)
    df = pd.DataFrame(ratings, columns=["person_id", "item_id", "rating"])
    test = df.groupby("person_id").head(1)
    df.drop(test.index).to_parquet(root / "ratings_train.parquet", index=False)
    test.to_parquet(root / "ratings_test.parquet", index=False)
    return root
