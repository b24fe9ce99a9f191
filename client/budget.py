"""``fedrec-client budget``: what the institution's privacy ledger says was spent and remains.

One table row per (run, model, task) in the order they first charged the ledger: releases
(rounds / steps) recorded, how many are still only ``charged`` (a crash between charge and
release; they count as spent), ε of that group alone, and the **cumulative** ε after it —
composition is sub-additive, so the cumulative column, not the sum of the "alone" column, is
what the cap is compared with. Below: total spent (PRV, with RDP as the cross-check), cap
and remaining. ε is derived from the recorded events on every call; nothing is cached.

A non-private release (a ``nonprivate`` ledger row, allowed only by an institution policy for
simulations) has ε = ∞: its group and every cumulative value after it print as
"∞ (non-private)", never 0, and the remaining budget is 0 with the reason. The summary's
numbers stay floats (``math.inf``).
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.accountant import NonPrivateEvent, epsilon_pair
from fedrec.common.privacy.ledger import LedgerRow, PrivacyLedger

__all__ = ["show_budget", "budget_summary", "format_epsilon"]

NON_PRIVATE = "∞ (non-private)"


def format_epsilon(eps: float, nd: int = 3) -> str:
    """ε for people: ∞ says "non-private" (ε = ∞ must never read as 0 or as a number)."""
    return NON_PRIVATE if math.isinf(eps) else f"{eps:.{nd}f}"


def budget_summary(ledger: PrivacyLedger, *, delta: float | None = None) -> dict:
    """The numbers the table shows, as a dict (also used by the audit)."""
    cap = ledger.cap()
    d = float(delta) if delta is not None else (cap.delta if cap else None)
    if d is None:
        raise FedrecInputError(f"{ledger.path}: the ledger has no cap; pass --delta to choose δ")
    rows = ledger.rows()
    groups: dict[tuple[str, str, str], list[LedgerRow]] = {}
    for r in rows:
        groups.setdefault((r.run_id, r.model, r.task), []).append(r)
    out_groups = []
    prefix: list = []
    for (run_id, model, task), grp in groups.items():
        evs = [r.event for r in grp]
        prefix = prefix + evs
        alone = epsilon_pair(evs, delta=d)
        cum = epsilon_pair(prefix, delta=d)
        out_groups.append(
            {
                "run_id": run_id,
                "model": model,
                "task": task,
                "releases": len(grp),
                "non_private": sum(isinstance(r.event, NonPrivateEvent) for r in grp),
                "unreleased": sum(r.status == "charged" for r in grp),
                "rounds": sorted({r.round for r in grp}),
                "epsilon_alone": alone[0],
                "epsilon_alone_rdp": alone[1],
                "epsilon_cumulative": cum[0],
                "epsilon_cumulative_rdp": cum[1],
                "first": grp[0].charged_at,
                "last": grp[-1].charged_at,
            }
        )
    total = epsilon_pair([r.event for r in rows], delta=d)
    remaining = None
    if cap is not None:
        at_cap = total[0] if d == cap.delta else epsilon_pair([r.event for r in rows], delta=cap.delta)[0]
        remaining = max(0.0, cap.epsilon - at_cap)  # 0.0 when ε = ∞
    non_private = sum(isinstance(r.event, NonPrivateEvent) for r in rows)
    return {
        "institution": ledger.institution,
        "ledger": str(ledger.path),
        "delta": d,
        "cap": None if cap is None else {"epsilon": cap.epsilon, "delta": cap.delta},
        "groups": out_groups,
        "spent_prv": total[0],
        "spent_rdp": total[1],
        "remaining": remaining,
        "unreleased": sum(r.status == "charged" for r in rows),
        "non_private": non_private,
        "remaining_reason": (
            f"{non_private} non-private release(s) recorded: spent ε = ∞, nothing can be released privately"
            if non_private else None
        ),
    }


def show_budget(path: Path, *, delta: float | None, console: Console) -> int:
    """Print the budget table; 0 on success, 2 (one-line error) for a missing/foreign file."""
    err = Console(stderr=True)
    try:
        ledger = PrivacyLedger(path)
        s = budget_summary(ledger, delta=delta)
    except FedrecInputError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    cap = s["cap"]
    title = f"Privacy budget of {s['institution']} — ε at δ={s['delta']:g}"
    table = Table(
        title=title,
        caption=(
            f"ledger {s['ledger']} · n = releases (rounds/steps), unrel. = charged but never marked "
            "released (counted), ε alone = this group by itself, ε cum. = everything up to it (PRV)"
        ),
    )
    for col, just in [
        ("run", "left"),
        ("model", "left"),
        ("task", "left"),
        ("n", "right"),
        ("unrel.", "right"),
        ("ε alone", "right"),
        ("ε cum.", "right"),
        ("ε cum. RDP", "right"),
        ("left", "right"),
        ("last charge UTC", "left"),
    ]:
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for g in s["groups"]:
        same_delta = cap is not None and cap["delta"] == s["delta"]
        if not same_delta:
            rem = ""
        elif math.isinf(g["epsilon_cumulative"]):
            rem = "none"
        else:
            rem = f"{max(0.0, cap['epsilon'] - g['epsilon_cumulative']):.3f}"
        table.add_row(
            g["run_id"],
            g["model"],
            g["task"],
            str(g["releases"]),
            str(g["unreleased"]) if g["unreleased"] else "",
            format_epsilon(g["epsilon_alone"]),
            format_epsilon(g["epsilon_cumulative"]),
            format_epsilon(g["epsilon_cumulative_rdp"]),
            rem,
            g["last"][:16].replace("T", " "),
        )
    if not s["groups"]:
        table.add_row("(no releases yet)", "", "", "0", "", "0.000", "0.000", "0.000",
                      "" if cap is None else f"{cap['epsilon']:.3f}", "")
    console.print(table)
    if cap is None:
        console.print(f"spent ε = {format_epsilon(s['spent_prv'])} (PRV), {format_epsilon(s['spent_rdp'])} (RDP); "
                      "no cap set")
    elif s["non_private"]:
        console.print(
            f"spent ε = [bold]{NON_PRIVATE}[/] at δ = {s['delta']:g}; cap ε = {cap['epsilon']:g} at "
            f"δ = {cap['delta']:g}, remaining ε = [bold]none[/] ({s['remaining_reason']})",
            highlight=False,
        )
    else:
        console.print(
            f"spent ε = [bold]{s['spent_prv']:.3f}[/] (PRV; RDP cross-check {s['spent_rdp']:.3f}) "
            f"at δ = {s['delta']:g}; cap ε = {cap['epsilon']:g} at δ = {cap['delta']:g}, "
            f"remaining ε = [bold]{s['remaining']:.3f}[/]",
            highlight=False,
        )
    if s["unreleased"]:
        console.print(
            f"[yellow]{s['unreleased']} release(s) were charged but never marked released "
            "(a crash between charge and release); they count as spent.[/]"
        )
    return 0
