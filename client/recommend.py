"""``fedrec-client recommend``: an institution ranks items for its own people by the estimated
benefit of the CATE models a causal run released (``causal.json``).

Privacy: applying released coefficients to the institution's own covariates is post-processing.
It reads no one else's data, sends nothing, and charges nothing to the ledger; the output file
holds per-person recommendations and stays at the institution like the data it came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from fedrec.common.causal.recommend import benefit_scores, top_k
from fedrec.common.datasets import load_institution
from fedrec.common.errors import FedrecInputError

__all__ = ["read_cate_models", "recommendations", "run_recommend"]

_RERUN = "fix: give the causal.json a `fedrec-sim causal` run (or the causal ServerApp) wrote"


def read_cate_models(path: Path, items: Sequence[str] | None = None) -> tuple[dict[str, dict[str, float]], dict]:
    """The CATE coefficients per item and the nuisance design from a ``causal.json``.

    ``items``: the items to rank (None: every item the file has a CATE model for). Raises
    :class:`FedrecInputError` (one line naming the file and the fix) for a missing or malformed
    file, an item without a CATE model, or a non-finite coefficient."""
    path = Path(path)
    if not path.is_file():
        raise FedrecInputError(f"{path}: no such file; {_RERUN}")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FedrecInputError(f"{path}: not valid JSON ({err}); {_RERUN}") from None
    rows = report.get("items") if isinstance(report, dict) else None
    design = report.get("nuisance_design") if isinstance(report, dict) else None
    if not isinstance(rows, dict) or not isinstance(design, dict):
        raise FedrecInputError(f"{path}: no 'items' / 'nuisance_design' section; {_RERUN}")
    have = [it for it, row in rows.items() if isinstance(row, dict) and isinstance(row.get("cate_coef"), dict)]
    wanted = list(items) if items else have
    if not wanted:
        raise FedrecInputError(f"{path}: no item has a CATE model (the {_estimator(rows)} estimator fits no "
                               "outcome models); fix: rerun `fedrec-sim causal` with --estimator aipw or ra")
    for it in wanted:
        if it not in rows:
            raise FedrecInputError(f"{path}: no item {it!r} (items: {', '.join(rows)}); fix: --items from that list")
        if it not in have:
            raise FedrecInputError(f"{path}: item {it!r} has no CATE model (estimator {_estimator(rows)}); "
                                   "fix: rerun `fedrec-sim causal` with --estimator aipw or ra, or leave it out")
    models: dict[str, dict[str, float]] = {}
    for it in wanted:
        coef = rows[it]["cate_coef"]
        bad = [name for name, v in coef.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise FedrecInputError(f"{path}: items.{it}.cate_coef.{bad[0]} is not a finite number; {_RERUN}")
        models[it] = {str(name): float(v) for name, v in coef.items()}
    return models, design


def _estimator(rows: dict) -> str:
    return next((str(r.get("estimator")) for r in rows.values() if isinstance(r, dict) and "estimator" in r), "?")


def recommendations(causal_json: Path, folder: Path, *, k: int = 3, items: Sequence[str] | None = None
                    ) -> pd.DataFrame:
    """Each person's top-``k`` items by estimated benefit: columns ``person_id``, ``rank``
    (1 = best), ``item_id``, ``estimated_effect`` (CATE, outcome units) and
    ``estimated_benefit`` (the same, negated when the study's outcome is better lower).

    Post-processing of released coefficients on this institution's own covariates: no budget."""
    from fedrec.client.statistics import raw_design  # the design columns the estimate used

    if k < 1:
        raise FedrecInputError(f"--k {k}: must be at least 1; fix: e.g. --k 3")
    models, design = read_cate_models(causal_json, items)
    data = load_institution(folder)
    x_raw, cols = raw_design(data, design.get("covariates"), tuple(design.get("derived") or ()))
    names = {"intercept"} | {c[0] for c in cols}
    for it, coef in models.items():
        missing = sorted(names - set(coef))
        extra = sorted(set(coef) - names)
        if missing or extra:
            what = f"has no coefficient for {missing[0]!r}" if missing else f"uses {extra[0]!r}"
            raise FedrecInputError(
                f"{causal_json}: the CATE model of {it!r} {what}, which does not match the design of "
                f"{Path(folder).name}/study.toml; fix: use the study declaration the estimate was made with")
    order = list(models)
    benefit = benefit_scores(x_raw, cols, models, order, data.study.outcome_better)
    sign = 1.0 if data.study.outcome_better == "higher" else -1.0
    best = top_k(benefit, k)
    kk = best.shape[1]
    people = data.people["person_id"].astype(str).to_numpy()
    picked = np.take_along_axis(benefit, best, axis=1)
    return pd.DataFrame({
        "person_id": np.repeat(people, kk),
        "rank": np.tile(np.arange(1, kk + 1), len(people)),
        "item_id": np.asarray(order, dtype=object)[best].reshape(-1),
        "estimated_effect": (sign * picked).reshape(-1),
        "estimated_benefit": picked.reshape(-1),
    })


def run_recommend(causal_json: Path, folder: Path, *, k: int, items: Sequence[str] | None, out: Path | None,
                  console: Console) -> int:
    """CLI body: write the recommendations CSV atomically and print how often each item comes first."""
    recs = recommendations(causal_json, folder, k=k, items=items)
    out = Path(out) if out else Path(f"recommendations-{Path(folder).name}.csv")
    if out.is_dir():
        raise FedrecInputError(f"--out {out}: is a folder; fix: give a file name, e.g. {out / 'recommendations.csv'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    recs.to_csv(tmp, index=False)
    tmp.replace(out)  # atomic: a crash never leaves half a file
    first = recs[recs["rank"] == 1]
    table = Table(title=f"{Path(folder).name}: top-1 recommendation by estimated benefit ({len(first)} people)")
    for col in ("item", "people (top-1)", "share", "mean estimated effect (top-1 people)"):
        table.add_column(col, justify="left" if col == "item" else "right")
    for it in first["item_id"].value_counts().index:  # most often first, first
        grp = first[first["item_id"] == it]
        table.add_row(str(it), str(len(grp)), f"{len(grp) / max(len(first), 1):.1%}", f"{grp['estimated_effect'].mean():.4g}")
    console.print(table)
    console.print("CATE from the run's DP models; applying them is post-processing (no budget spent, "
                  f"nothing sent). {len(recs)} rows -> {out}", markup=False)
    return 0
