"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def simulated_institution(tmp_path_factory) -> Callable[..., Path]:
    """A factory: ``simulated_institution(domain, people=..., seed=...)`` writes one simulated
    institution's folder (people.csv, interactions, study.toml; no skew) under a fresh temporary
    folder and returns its path. Folders are cached per (domain, people, seed) for the session:
    a test that changes a folder's files must copy it first."""
    from fedrec.common.datasets import write_institution
    from fedrec.simulations.domains import domain_federation

    made: dict[tuple[str, int, int], Path] = {}

    def make(domain: str, *, people: int, seed: int) -> Path:
        key = (domain, people, seed)
        if key not in made:
            insts, _ = domain_federation(domain, institutions=1, people=people, seed=seed, skew=0.0)
            root = tmp_path_factory.mktemp(f"{domain}-{people}-{seed}")
            made[key] = write_institution(root / insts[0].name, insts[0])
        return made[key]

    return make
