"""``fedrec-sim generate``: write a simulated federation in the institution data contract.

Output: ``OUT/institution_00`` ... (each: study.toml, people.csv, items.csv, interactions.csv)
and ``OUT/ground_truth/`` (truth.json, ate.csv, best_item.csv, cate.parquet). Same seed, same
bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedrec.common.datasets import GROUND_TRUTH_DIR, write_ground_truth, write_institution
from fedrec.common.errors import FedrecInputError
from fedrec.simulations.domains import get_domain, simulate

__all__ = ["generate"]


def _prepare(out: Path) -> None:
    """Refuse to overwrite anything but an earlier generate output."""
    if out.exists() and not out.is_dir():
        raise FedrecInputError(f"--out {out}: is a file; fix: give a folder path")
    if out.is_dir():
        ours = {p.name for p in out.iterdir()}
        foreign = {n for n in ours if not (n.startswith("institution_") or n == GROUND_TRUTH_DIR)}
        if foreign:
            raise FedrecInputError(f"--out {out}: holds other files ({', '.join(sorted(foreign)[:3])}); "
                                   "fix: give an empty or new folder")
        for n in ours:
            shutil.rmtree(out / n)
    out.mkdir(parents=True, exist_ok=True)


def generate(domain: str, *, institutions: int, people: int, seed: int, skew: float, out: Path,
             console: Console, policy: str = "confounded") -> Path:
    """Simulate ``domain`` and write one folder per institution plus ``ground_truth/``.

    ``policy`` is the logging policy (``confounded`` or ``randomized``). Returns ``out``.
    Raises FedrecInputError for bad arguments (unknown domain, skew outside [0, 1], ...).
    """
    out = Path(out)
    spec = get_domain(domain)
    if out.exists() and not out.is_dir():
        raise FedrecInputError(f"--out {out}: is a file; fix: give a folder path")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{domain}: drawing {people:,} people", total=4 + institutions)
        sim = simulate(spec, institutions=institutions, people=people, seed=seed, skew=skew, policy=policy,
                       progress=lambda msg: bar.update(task, advance=1, description=f"{domain}: {msg}"))
        _prepare(out)  # only once the arguments proved valid
        for inst in sim.institutions:
            write_institution(out / inst.name, inst)
            bar.update(task, advance=1, description=f"{domain}: wrote {inst.name}")
        write_ground_truth(out / GROUND_TRUTH_DIR, sim.truth, meta={
            "seed": seed, "skew": skew, "institutions": institutions, "source": spec.source,
            "outcome": sim.institutions[0].study.outcome_name, "unit": sim.institutions[0].study.outcome_unit,
        })
        bar.update(task, advance=1)
    n_rows = sum(len(i.interactions) for i in sim.institutions)
    console.print(f"{domain}: {institutions} institutions, {people:,} {spec.person_unit}s, {n_rows:,} interactions "
                  f"-> {out} (ground truth in {out / GROUND_TRUTH_DIR})", highlight=False, soft_wrap=True)
    return out
