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
from scipy.stats import norm

from fedrec.common.causal.recommend import design_benefit, scaled_design, shrinkage_caveat, top_k
from fedrec.common.datasets import load_institution
from fedrec.common.errors import FedrecInputError

__all__ = ["read_cate_models", "recommendations", "run_recommend"]

_RERUN = "fix: give the causal.json a `fedrec-sim causal` run (or the causal ServerApp) wrote"


def read_cate_models(path: Path, items: Sequence[str] | None = None
                     ) -> tuple[dict[str, dict[str, float]], dict, dict[str, object] | None, dict[str, float]]:
    """The CATE coefficients per item, the nuisance design, the coefficients' covariances
    as the file holds them (``cate_cov``, unchecked: :func:`_checked_covs`; None when any item
    lacks one: files from before they were written) and each item's ``cate_shrinkage`` (where
    the file has a finite one) from one read of a ``causal.json``.

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
    nuisance = report.get("nuisance_design") if isinstance(report, dict) else None
    if not isinstance(rows, dict) or not isinstance(nuisance, dict):
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
    shrinkage = {it: float(rows[it]["cate_shrinkage"]) for it in wanted
                 if isinstance(rows[it].get("cate_shrinkage"), (int, float)) and math.isfinite(rows[it]["cate_shrinkage"])}
    if not all("cate_cov" in rows[it] for it in wanted):
        return models, nuisance, None, shrinkage
    return models, nuisance, {it: rows[it]["cate_cov"] for it in wanted}, shrinkage


def _checked_covs(path: Path, raw: dict[str, object], models: dict[str, dict[str, float]]) -> dict[str, np.ndarray]:
    """``cate_cov`` per item as arrays, or :class:`FedrecInputError` for one that is not a
    finite square matrix of its coefficients' size."""
    covs = {}
    for it, value in raw.items():
        p = len(models[it])
        try:
            cov = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            cov = np.full((0, 0), np.nan)
        if cov.shape != (p, p) or not np.all(np.isfinite(cov)):
            raise FedrecInputError(f"{path}: items.{it}.cate_cov is not a finite {p}x{p} matrix; {_RERUN}")
        covs[it] = cov
    return covs


def _estimator(rows: dict) -> str:
    return next((str(r.get("estimator")) for r in rows.values() if isinstance(r, dict) and "estimator" in r), "?")


def recommendations(causal_json: Path, folder: Path, *, k: int = 3, items: Sequence[str] | None = None,
                    status_quo: str = "none", rank_all: bool = False) -> pd.DataFrame:
    """Each person's top-``k`` items by estimated benefit: columns ``person_id``, ``rank``
    (1 = best), ``item_id``, ``estimated_effect`` (CATE, outcome units) and
    ``estimated_benefit`` (the same, negated when the study's outcome is better lower), and,
    when causal.json carries the models' covariances, ``effect_ci_low`` / ``effect_ci_high``
    (pointwise 95% CI of the CATE: sampling, X'y and Gram noise; docs/causal.md, CATE coverage),
    and ``cate_shrinkage`` (the item's, from causal.json: at >= ``CATE_SHRINKAGE_CAVEAT`` the
    DP ridge's bias makes that CI under-cover).

    Safe by default (issue 29): a person gets an item only where its effect's 95% interval lies
    on the benefit side of the status quo (``status_quo``: ``none`` = no item, ``current`` = what
    the person takes now: an item already taken is not recommended again), never an item whose
    ATE interval shows harm or whose shrunk CATE model is not backed by its ATE
    (:func:`fedrec.common.causal.recommend.item_blocks`); estimated effects are cut to the range
    the outcome bounds allow. A person with no such item gets one row with an empty ``item_id``
    and the ``reason``. ``rank_all``: the plain top-``k`` by estimated benefit (no abstention).

    Post-processing of released coefficients on this institution's own covariates: no budget."""
    from fedrec.common.causal.recommend import (benefit_intervals, check_status_quo, effect_limit, item_blocks,
                                                safe_top_k)

    check_status_quo(status_quo)
    from fedrec.client.statistics import raw_design  # the design columns the estimate used

    if k < 1:
        raise FedrecInputError(f"--k {k}: must be at least 1; fix: e.g. --k 3")
    models, nuisance, raw_covs, shrinkage = read_cate_models(causal_json, items)
    data = load_institution(folder)
    x_raw, cols = raw_design(data, nuisance.get("covariates"), tuple(nuisance.get("derived") or ()))
    expected = {"intercept"} | {c[0] for c in cols}
    for it, coef in models.items():
        missing = sorted(expected - set(coef))
        extra = sorted(set(coef) - expected)
        if missing or extra:
            what = f"has no coefficient for {missing[0]!r}" if missing else f"uses {extra[0]!r}"
            raise FedrecInputError(
                f"{causal_json}: the CATE model of {it!r} {what}, which does not match the design of "
                f"{Path(folder).name}/study.toml; fix: use the study declaration the estimate was made with")
    covs = None if raw_covs is None else _checked_covs(causal_json, raw_covs, models)
    order = list(models)
    x, names = scaled_design(x_raw, cols)
    if not rank_all:
        if covs is None:
            raise FedrecInputError(f"{causal_json}: no cate_cov (the CATE models' covariances), so no interval to "
                                   "decide on; fix: rerun `fedrec-sim causal`, or pass --rank-all for the plain ranking")
        better = data.study.outcome_better
        sign = 1.0 if better == "higher" else -1.0
        ben, half = benefit_intervals(x, names, models, covs, order, better, limit=effect_limit(data.study.outcome_bounds))
        rows = json.loads(Path(causal_json).read_text())["items"]
        blocks = item_blocks(rows, order, better, shrinkage)
        taken = None
        if status_quo == "current":
            inter = data.interactions[data.interactions["exposed"] == 1]
            pos = {p: i for i, p in enumerate(data.people["person_id"].astype(str))}
            taken = np.zeros(ben.shape, dtype=bool)
            col = {it: j for j, it in enumerate(order)}
            for p, it in zip(inter["person_id"].astype(str), inter["item_id"].astype(str)):
                if it in col and p in pos:
                    taken[pos[p], col[it]] = True
        picks, reasons = safe_top_k(ben, half, order, k, blocks=blocks, taken=taken)
        people = data.people["person_id"].astype(str).to_numpy()
        out = []
        for i, pid in enumerate(people):
            chosen = [j for j in picks[i] if j >= 0]
            if not chosen:
                out.append({"person_id": pid, "rank": 1, "item_id": "", "estimated_effect": np.nan,
                            "estimated_benefit": np.nan, "effect_ci_low": np.nan, "effect_ci_high": np.nan,
                            "reason": reasons[i]})
            for r, j in enumerate(chosen, start=1):
                eff = sign * ben[i, j]
                out.append({"person_id": pid, "rank": r, "item_id": order[j], "estimated_effect": eff,
                            "estimated_benefit": ben[i, j], "effect_ci_low": eff - half[i, j],
                            "effect_ci_high": eff + half[i, j], "reason": ""})
        table = pd.DataFrame(out)
        if shrinkage and set(shrinkage) >= set(order):
            table["cate_shrinkage"] = table["item_id"].map(shrinkage).astype(float)
        table.attrs["cate_shrinkage"] = shrinkage
        table.attrs["blocks"] = blocks
        table.attrs["status_quo"] = status_quo
        return table
    benefit = design_benefit(x, names, models, order, data.study.outcome_better)
    sign = 1.0 if data.study.outcome_better == "higher" else -1.0
    best = top_k(benefit, k)
    kk = best.shape[1]
    people = data.people["person_id"].astype(str).to_numpy()
    picked = np.take_along_axis(benefit, best, axis=1)
    table = pd.DataFrame({
        "person_id": np.repeat(people, kk),
        "rank": np.tile(np.arange(1, kk + 1), len(people)),
        "item_id": np.asarray(order, dtype=object)[best].reshape(-1),
        "estimated_effect": (sign * picked).reshape(-1),
        "estimated_benefit": picked.reshape(-1),
    })
    if covs is not None:
        # covariances are in cate_coef's key order; the design is in the folder's column order
        se = np.column_stack([np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, _reorder(covs[it], list(models[it]), names),
                                                           x), 0.0)) for it in order])
        half = float(norm.ppf(0.975)) * np.take_along_axis(se, best, axis=1).reshape(-1)
        table["effect_ci_low"] = table["estimated_effect"] - half
        table["effect_ci_high"] = table["estimated_effect"] + half
    if shrinkage and set(shrinkage) >= set(order):  # each row's item's shrinkage: >= 0.8, its CI under-covers
        table["cate_shrinkage"] = table["item_id"].map(shrinkage).astype(float)
    table.attrs["cate_shrinkage"] = shrinkage  # for the caller's caveat (run_recommend)
    return table


def _reorder(cov: np.ndarray, keys: list[str], names: list[str]) -> np.ndarray:
    """``cov`` (rows/columns in ``keys`` order) with rows/columns in ``names`` order."""
    idx = [keys.index(n) for n in names]
    return cov[np.ix_(idx, idx)]


def run_recommend(causal_json: Path, folder: Path, *, k: int, items: Sequence[str] | None, out: Path | None,
                  console: Console, status_quo: str = "none", rank_all: bool = False) -> int:
    """CLI body: write the recommendations CSV atomically and print how often each item comes first."""
    recs = recommendations(causal_json, folder, k=k, items=items, status_quo=status_quo, rank_all=rank_all)
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
        table.add_row(str(it) or "no recommendation", str(len(grp)), f"{len(grp) / max(len(first), 1):.1%}",
                      f"{grp['estimated_effect'].mean():.4g}" if str(it) else "-")
    console.print(table)
    if "reason" in recs:
        none = first[first["item_id"] == ""]
        for why, grp in none.groupby("reason"):
            console.print(f"no recommendation for {len(grp)} people: {why}", markup=False)
        for it, why in recs.attrs.get("blocks", {}).items():
            console.print(f"{it} is recommended to no one: {why}", markup=False)
    caveat = shrinkage_caveat(recs.attrs.get("cate_shrinkage", {}))
    if caveat and "effect_ci_low" in recs:
        console.print(caveat, markup=False)
    console.print("CATE from the run's DP models; applying them is post-processing (no budget spent, "
                  f"nothing sent). {len(recs)} rows -> {out}", markup=False)
    return 0
