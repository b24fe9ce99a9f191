"""``fedrec-client check-data DIR``: validate an institution folder and print a summary.

Every problem is printed on one line (file, row, column, fix) to stderr and the exit code is
2; a valid folder prints a summary (people, items, interactions, exposure rate, engagement,
outcome range) and exits 0. The folder is only read, never modified. The checks are
``fedrec.common.schema.validate_folder``, the same the loaders run before any training: unreadable
files, non-ISO or out-of-range timestamps and a folder without exposed rows are reported here,
each on one line, rather than failing a run after its privacy budget was charged.

The summary is shown to the institution's own IT staff on their own machine: it is not a
release, so it carries no DP noise and is never sent anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedrec.common.schema import ValidatedTables, validate_folder

__all__ = ["run_check"]


def run_check(folder: Path, *, console: Console, err_console: Console) -> int:
    """Validate ``folder``; print problems (one line each) or a summary. Returns the exit code."""
    folder = Path(folder)
    result = validate_folder(folder)
    if not result.ok:
        for p in result.problems:
            err_console.print(p.line(), markup=False, highlight=False, soft_wrap=True)
        n = len(result.problems)
        err_console.print(f"{folder}: {n} problem{'s' if n != 1 else ''}; nothing was modified.",
                          markup=False, highlight=False, soft_wrap=True)
        return 2
    assert result.tables is not None
    console.print(_summary(folder, result.tables))
    console.print(f"{folder}: valid (contract version {result.tables.study.contract}).", markup=False, highlight=False)
    return 0


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


def _summary(folder: Path, t: ValidatedTables) -> Table:
    s, inter = t.study, t.interactions
    exposed = inter["exposed"].to_numpy() == 1
    rows_per_person = inter.groupby("person_id").size()
    eng = inter["engagement"].to_numpy()[exposed]
    out = inter["outcome"].to_numpy()
    table = Table(title=f"{folder.name}: {s.domain} ({s.person_unit}s)", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("people", f"{len(t.people):,} ({len(s.covariates)} covariates: {', '.join(s.covariate_names)})")
    table.add_row("items", f"{len(t.items):,} in {t.items['category'].nunique()} categories")
    table.add_row("interactions", f"{len(inter):,} ({rows_per_person.mean():.1f} per person with rows; "
                                  f"{len(t.people) - len(rows_per_person):,} people without rows)")
    table.add_row("exposure rate", f"{exposed.mean():.1%} of rows exposed ({int(exposed.sum()):,})")
    if eng.size:
        if s.engagement_kind == "click":
            table.add_row("engagement", f"click-through {eng.mean():.1%} of exposed rows")
        else:
            table.add_row("engagement", f"rating mean {eng.mean():.2f}, range [{_num(eng.min())}, {_num(eng.max())}] "
                                        f"of [{_num(s.engagement_bounds[0])}, {_num(s.engagement_bounds[1])}]")
    lo, hi = s.outcome_bounds
    table.add_row("outcome", f"{s.outcome_name} ({s.outcome_unit}, {s.outcome_better} is better): observed "
                             f"[{_num(float(np.min(out)))}, {_num(float(np.max(out)))}], declared [{_num(lo)}, {_num(hi)}]")
    ts = inter["timestamp"]
    table.add_row("period", f"{ts.min():%Y-%m-%d} to {ts.max():%Y-%m-%d}")
    return table
