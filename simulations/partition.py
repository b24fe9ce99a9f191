"""Non-IID partitioning of persons across institutions, and per-person train/test splits.

Persons, not ratings, are partitioned: a person (with all their records) lives at exactly one
institution, which is what person-level DP assumes. Skew works like the Dirichlet label
partitioner of flwr-datasets, applied to a person-level group label (written here because
flwr-datasets partitions a HuggingFace `datasets.Dataset` row by row, and our rows are
ratings, not persons).
"""

from __future__ import annotations

import numpy as np

__all__ = ["partition_persons", "split_person_ratings", "skew_to_alpha"]

from fedrec.common.ratings import split_person_ratings  # noqa: E402  (re-export: one split for all)


def skew_to_alpha(skew: float) -> float:
    """Dirichlet concentration for a skew in [0, 1]: 0 -> 1e2 (near IID), 0.5 -> 1, 1 -> 1e-2."""
    return float(10 ** (2.0 - 4.0 * skew))


def partition_persons(
    groups: np.ndarray,
    n_institutions: int,
    *,
    skew: float,
    seed: int,
    min_persons: int = 5,
) -> np.ndarray:
    """Assign each person (row of ``groups``) to an institution in ``[0, n_institutions)``.

    ``groups`` is a per-person label (e.g. dominant genre, age band). With skew 0 every group
    is spread evenly; with skew near 1 each group concentrates at few institutions, so
    institutions differ in case-mix and size. Each institution keeps at least ``min_persons``.
    """
    rng = np.random.default_rng(seed)
    n = len(groups)
    if n < n_institutions * min_persons:
        raise ValueError(
            f"{n} persons cannot fill {n_institutions} institutions with {min_persons} each"
        )
    alpha = skew_to_alpha(skew)
    owner = np.empty(n, dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        p = rng.dirichlet(np.full(n_institutions, alpha))
        owner[idx] = rng.choice(n_institutions, size=len(idx), p=p)
    # top up institutions below the minimum from the largest ones
    counts = np.bincount(owner, minlength=n_institutions)
    for k in np.flatnonzero(counts < min_persons):
        while counts[k] < min_persons:
            donor = int(np.argmax(counts))
            moved = rng.choice(np.flatnonzero(owner == donor))
            owner[moved] = k
            counts[donor] -= 1
            counts[k] += 1
    return owner
