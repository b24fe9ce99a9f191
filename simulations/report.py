"""The sweep's report: plots, a self-contained ``report.html`` and ``report.md`` beside it.

``report.html`` is the page an analyst forwards: the setup, what each figure means, the figures
inline (PNG as ``data:`` URIs — no external URL, no script, no stylesheet link), and the tables
(mean ± standard deviation over the seeds). ``report.md`` has the same text and tables and links
the PNGs in ``plots/``.

Every plot has a title, labelled axes with units and a legend; ε is on a log axis, the
non-private (ε = ∞) result and the stay-alone reference are drawn as horizontal lines, and the
ε-spent plot draws each run's budget cap.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["write_report", "aggregate", "make_plots"]

REC_METRICS = {"rmse": "RMSE (rating units, lower is better)", "ndcg10": "NDCG@10 (0-1, higher is better)"}
OUTCOME_UNITS = {"health": "kg of weight change", "education": "test-score points", "finance": "USD per year"}
MODE_STYLE = {"local": "-", "distributed": "--", "none": ":"}
MODE_MARK = {"local": "o", "distributed": "s", "none": "^"}


def _f(v) -> float | None:
    if v in ("", None):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if not math.isnan(x) else None


def aggregate(rows: list[dict], metric: str) -> dict:
    """{(task, domain, model, noise_mode, epsilon): (mean, sd, n)} of ``metric`` over seeds (ok rows)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("status") != "ok":
            continue
        v = _f(r.get(metric))
        if v is None:
            continue
        groups[(r["task"], r["domain"], r["model"], r["noise_mode"], float(r["epsilon"]))].append(v)
    out = {}
    for k, vs in groups.items():
        m = sum(vs) / len(vs)
        sd = math.sqrt(sum((v - m) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else 0.0
        out[k] = (m, sd, len(vs))
    return out


def _domains(rows, task):
    return sorted({r["domain"] for r in rows if r["task"] == task and r.get("status") == "ok"})


def _series(agg, task, domain, model, mode):
    pts = sorted((k[4], v) for k, v in agg.items() if k[:4] == (task, domain, model, mode) and math.isfinite(k[4])
                 and k[4] > 0)
    return [p[0] for p in pts], [p[1][0] for p in pts], [p[1][1] for p in pts]


def _ref(agg, task, domain, model, mode, eps):
    v = agg.get((task, domain, model, mode, eps))
    return None if v is None else v[0]


def _style_ax(ax, xs_all, title, ylabel):
    ax.set_xscale("log")
    ticks = sorted(set(xs_all))
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("ε per institution for the whole run (log scale)")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def make_plots(rows: list[dict], folder: Path) -> list[tuple[str, str, str]]:
    """Write the plots; return [(file, title, what it means)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, str, str]] = []
    colours = {d: c for d, c in zip(("health", "education", "finance"), ("tab:red", "tab:blue", "tab:green"))}

    def colour(d):
        return colours.get(d, "tab:gray")

    # ---------------------------------------------------------------- recommendation quality
    rec_domains = _domains(rows, "rec")
    if rec_domains:
        fig, axes = plt.subplots(1, len(REC_METRICS), figsize=(6.2 * len(REC_METRICS), 4.4), squeeze=False)
        for ax, (metric, ylabel) in zip(axes[0], REC_METRICS.items()):
            agg = aggregate(rows, metric)
            xs_all = []
            for d in rec_domains:
                for mode in ("local", "distributed"):
                    xs, ys, sds = _series(agg, "rec", d, "mf", mode)
                    if xs:
                        xs_all += xs
                        ax.errorbar(xs, ys, yerr=sds, color=colour(d), linestyle=MODE_STYLE[mode],
                                    marker=MODE_MARK[mode], capsize=3, label=f"{d}, MF, {mode} noise")
                np_ = _ref(agg, "rec", d, "mf", "none", math.inf)
                if np_ is not None:
                    ax.axhline(np_, color=colour(d), linestyle=":", linewidth=1.2, label=f"{d}: non-private (ε = ∞)")
                alone = _ref(agg, "rec", d, "alone", "none", 0.0)
                if alone is not None:
                    ax.axhline(alone, color=colour(d), linestyle="-.", linewidth=1.0, alpha=0.7,
                               label=f"{d}: each institution alone (nothing released)")
            _style_ax(ax, xs_all, f"{metric.upper() if metric == 'rmse' else 'NDCG@10'} of the federated MF vs ε "
                                  "(mean ± sd over seeds)", ylabel)
            ax.legend(fontsize=6.5)
        fig.tight_layout()
        fig.savefig(folder / "rec_quality.png", dpi=100)
        plt.close(fig)
        figs.append(("rec_quality.png", "Recommendation quality vs privacy budget",
                     "Held-out RMSE (left, lower is better) and NDCG@10 (right, 1 held-out item ranked against "
                     "sampled negatives, higher is better) of the federated matrix-factorisation model after the "
                     "last round, against the ε each institution spends on the whole run. Solid lines: local noise "
                     "(each institution adds the full noise; holds even if secure aggregation broke); dashed: "
                     "distributed noise (each adds a 1/n_min share behind SecAgg+). Dotted horizontal: the same "
                     "federation without DP (ε = ∞); dash-dotted: each institution alone, nothing released — the bar "
                     "the federation must clear. HR@10 is left out: with 8 items it is always 1."))

        # ε spent vs the cap (the ledgers' own figure)
        agg = aggregate(rows, "epsilon_spent_max")
        fig, ax = plt.subplots(figsize=(6.2, 4.4))
        xs_all = []
        for d in rec_domains:
            for mode in ("local", "distributed"):
                xs, ys, _ = _series(agg, "rec", d, "mf", mode)
                if xs:
                    xs_all += xs
                    ax.plot(xs, ys, color=colour(d), linestyle=MODE_STYLE[mode], marker=MODE_MARK[mode],
                            label=f"{d}, {mode} noise: largest ε spent")
        if xs_all:
            lo, hi = min(xs_all), max(xs_all)
            ax.plot([lo, hi], [lo, hi], color="crimson", linestyle="--", label="budget cap (= the run's ε)")
            ax.set_yscale("log")
        _style_ax(ax, xs_all, "Privacy budget spent per institution vs its cap", "ε spent (largest over institutions, "
                  "PRV accountant, log scale)")
        ax.legend(fontsize=6.5)
        fig.tight_layout()
        fig.savefig(folder / "epsilon_spent.png", dpi=100)
        plt.close(fig)
        figs.append(("epsilon_spent.png", "Privacy budget spent vs cap",
                     "The largest ε any institution's ledger reported at the end of each run, against the run's "
                     "budget (each simulated institution's cap). Points on or just under the red line: the run "
                     "spent its budget and no more."))

    # ---------------------------------------------------------------- causal accuracy
    c_domains = _domains(rows, "causal")
    if c_domains:
        specs = [("ate_abs_error", "Mean |ATE error| over items", "|estimate − true ATE| ({unit})", True),
                 ("ci_width", "95% CI width, mean over items", "CI width ({unit})", True)]
        fig, axes = plt.subplots(len(specs), len(c_domains), figsize=(5.0 * len(c_domains), 3.9 * len(specs)),
                                 squeeze=False)
        for i, (metric, title, ylabel, _) in enumerate(specs):
            agg = aggregate(rows, metric)
            for j, d in enumerate(c_domains):
                ax = axes[i][j]
                xs_all = []
                for mode in ("local", "distributed"):
                    xs, ys, sds = _series(agg, "causal", d, "aipw", mode)
                    if xs:
                        xs_all += xs
                        ax.errorbar(xs, ys, yerr=sds, color=colour(d), linestyle=MODE_STYLE[mode],
                                    marker=MODE_MARK[mode], capsize=3, label=f"{mode} noise")
                np_ = _ref(agg, "causal", d, "aipw", "none", math.inf)
                if np_ is not None:
                    ax.axhline(np_, color="black", linestyle=":", label="non-private (ε = ∞)")
                _style_ax(ax, xs_all, f"{d}: {title}", ylabel.format(unit=OUTCOME_UNITS.get(d, "outcome units")))
                ax.set_yscale("log")
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "causal_accuracy.png", dpi=100)
        plt.close(fig)
        figs.append(("causal_accuracy.png", "Causal accuracy vs privacy budget",
                     "Top row: mean absolute error of the federated AIPW estimate of each item's average treatment "
                     "effect against the simulator's true effect; bottom row: the mean width of its 95% confidence "
                     "interval (which includes the DP noise), both in the domain's outcome units, log scale. All "
                     "items are estimated in one run and share the ε. Dotted: the same estimate without DP."))

        agg = aggregate(rows, "coverage")
        fig, ax = plt.subplots(figsize=(6.6, 4.4))
        xs_all = []
        for d in c_domains:
            for mode in ("local", "distributed"):
                xs, ys, _ = _series(agg, "causal", d, "aipw", mode)
                if xs:
                    xs_all += xs
                    ax.plot(xs, ys, color=colour(d), linestyle=MODE_STYLE[mode], marker=MODE_MARK[mode],
                            label=f"{d}, {mode} noise")
        ax.axhline(0.95, color="black", linestyle="--", label="nominal 95%")
        _style_ax(ax, xs_all, "CI coverage of the true ATE vs ε", "share of items whose 95% CI covers the true ATE")
        ax.set_ylim(-0.02, 1.05)
        ax.legend(fontsize=6.5, loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / "coverage.png", dpi=100)
        plt.close(fig)
        figs.append(("coverage.png", "Confidence-interval coverage",
                     "The share of items (averaged over seeds) whose 95% CI contains the true effect. Near the "
                     "dashed line the intervals are honest; well below it they are too narrow. With few seeds "
                     "and 8 items per run, each point moves in steps of 1/8."))

        agg = {k: aggregate(rows, f"policy_value_{k}") for k in ("causal", "engagement", "oracle", "random")}
        if any(agg[k] for k in agg):
            fig, axes = plt.subplots(1, len(c_domains), figsize=(5.0 * len(c_domains), 4.2), squeeze=False)
            for j, d in enumerate(c_domains):
                ax = axes[0][j]
                xs_all = []
                for mode in ("local", "distributed"):
                    xs, ys, sds = _series(agg["causal"], "causal", d, "aipw", mode)
                    if xs:
                        xs_all += xs
                        ax.errorbar(xs, ys, yerr=sds, color=colour(d), linestyle=MODE_STYLE[mode],
                                    marker=MODE_MARK[mode], capsize=3, label=f"causal (by DP benefit), {mode} noise")
                for name, style, col in (("engagement", "-.", "dimgray"), ("oracle", "--", "black"),
                                         ("random", ":", "gray")):
                    vals = [v[0] for k, v in agg[name].items() if k[1] == d]
                    if vals:
                        ax.axhline(sum(vals) / len(vals), linestyle=style, color=col,
                                   label={"engagement": "by engagement (no ε needed)", "oracle": "oracle (true benefit)",
                                          "random": "random item"}[name])
                np_ = _ref(agg["causal"], "causal", d, "aipw", "none", math.inf)
                if np_ is not None:
                    ax.axhline(np_, color=colour(d), linestyle=":", linewidth=1.2, label="causal, non-private")
                _style_ax(ax, xs_all, f"{d}: policy value of the top-1 recommendation",
                          f"mean true benefit ({OUTCOME_UNITS.get(d, 'outcome units')}, higher is better)")
                ax.legend(fontsize=6.5)
            fig.tight_layout()
            fig.savefig(folder / "policy_value.png", dpi=100)
            plt.close(fig)
            figs.append(("policy_value.png", "Causal vs engagement recommendations",
                         "The mean true benefit each person gets from the one item recommended to them (outcome "
                         "oriented so that larger is better), graded with the simulator's true effects. Causal: "
                         "items ranked by the benefit the DP CATE models estimate; engagement: ranked by expected "
                         "engagement (what an engagement-trained recommender does at best); oracle: the true best "
                         "item; random: an item at random."))
    return figs


# ------------------------------------------------------------------------------------ tables
def _fmt(v: tuple | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    m, sd, n = v
    return f"{m:.{digits}g} ± {sd:.2g}" if n > 1 else f"{m:.{digits}g}"


def _eps_label(e: float) -> str:
    if math.isinf(e):
        return "∞ (non-private)"
    if e == 0:
        return "0 (alone)"
    return f"{e:g}"


def tables(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    rec_cols = [("rmse", "RMSE"), ("mae", "MAE"), ("ndcg10", "NDCG@10"), ("epsilon_spent_max", "ε spent (max)")]
    caus_cols = [("ate_abs_error", "|ATE error|"), ("ci_width", "CI width"), ("coverage", "coverage"),
                 ("policy_value_causal", "policy value: causal"), ("policy_value_engagement", "… engagement"),
                 ("policy_value_oracle", "… oracle")]
    for task, cols, title in (("rec", rec_cols, "Recommendation quality (MF, last round; mean ± sd over seeds)"),
                              ("causal", caus_cols, "Causal estimation (all items per run; mean ± sd over seeds)")):
        aggs = {k: aggregate(rows, k) for k, _ in cols}
        keys = sorted({k for a in aggs.values() for k in a if k[0] == task},
                      key=lambda k: (k[1], k[2] != "alone", k[3], k[4]))
        if not keys:
            continue
        body = []
        for k in keys:
            n = max((aggs[c][k][2] for c, _ in cols if k in aggs[c]), default=0)
            body.append([k[1], k[2], k[3], _eps_label(k[4]), str(n)] + [_fmt(aggs[c].get(k)) for c, _ in cols])
        out.append((title, ["domain", "model", "noise", "ε", "seeds"] + [h for _, h in cols], body))
    return out


def _setup_lines(meta: dict, rows: list[dict]) -> list[str]:
    g, f = meta.get("grid", {}), meta.get("fixed", {})
    failed = [r for r in rows if r.get("status") != "ok"]
    lines = [
        f"Command: `{meta.get('command', '')}` (commit {meta.get('commit', 'unknown')})",
        f"Grid: domains {', '.join(g.get('domains', []))}; ε {', '.join(str(e) for e in g.get('epsilons', []))}; "
        f"noise modes {', '.join(g.get('noise_modes', []))}; tasks {', '.join(g.get('tasks', []))}; models "
        f"{', '.join(g.get('models', []))}; seeds 0..{int(g.get('seeds', 1)) - 1}.",
        f"Each federation: {f.get('institutions')} simulated institutions, {f.get('people')} people in all "
        f"(case-mix skew {f.get('skew')}); MF trained for {f.get('rounds')} rounds over SecAgg+ (Flower simulation "
        "engine); causal effects by the federated AIPW protocol in-process (same client and server code).",
        "ε is per institution for the whole run (δ = 1e-5), at the level of one person with all their records. "
        "Seed s fixes the federation, the splits and every release's DP noise (simulation only), so each number "
        "can be reproduced by re-running its cell.",
        f"Rows: {len(rows)} ({len(failed)} failed)." if rows else "Rows: none yet.",
    ]
    lines += [f"Note: {n}" for n in meta.get("notes", [])]
    return lines


def write_report(out: Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    figs = make_plots(rows, out / "plots")
    tabs = tables(rows)
    setup = _setup_lines(meta, rows)
    # ---------------------------------------------------------------- markdown
    md = ["# fedrec privacy-budget sweep", "", "## Setup", ""] + [f"- {s}" for s in setup] + [""]
    md += ["## Figures", ""]
    for fname, title, text in figs:
        md += [f"### {title}", "", f"![{title}](plots/{fname})", "", text, ""]
    md += ["## Tables", ""]
    for title, head, body in tabs:
        md += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(r) + " |" for r in body] + [""]
    md += ["One row per cell and seed: `results.csv`. Failed cells re-run when the same command is run again."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    # ---------------------------------------------------------------- html
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>fedrec privacy-budget sweep</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}"
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}"
             "td:nth-child(-n+4){text-align:left}img{max-width:100%;border:1px solid #eee}"
             "figcaption{font-size:0.9em;color:#444;margin:0.3em 0 1.5em}</style>",
             "</head>", "<body>", "<h1>fedrec privacy-budget sweep</h1>", "<h2>Setup</h2>", "<ul>"]
    parts += [f"<li>{_md_code(e(s))}</li>" for s in setup]
    parts += ["</ul>", "<h2>Figures</h2>"]
    for fname, title, text in figs:
        data = base64.b64encode((out / "plots" / fname).read_bytes()).decode("ascii")
        parts += [f"<h3>{e(title)}</h3>", "<figure>", f'<img src="data:image/png;base64,{data}" alt="{e(title)}">',
                  f"<figcaption>{e(text)}</figcaption>", "</figure>"]
    parts.append("<h2>Tables</h2>")
    for title, head, body in tabs:
        parts += [f"<h3>{e(title)}</h3>", "<table>", "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                  + "</tr></thead>", "<tbody>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body]
        parts += ["</tbody>", "</table>"]
    parts += ["<p>One row per cell and seed: <code>results.csv</code> beside this page. Failed cells re-run when "
              "the same command is run again.</p>", "</body>", "</html>"]
    (out / "report.html").write_text("\n".join(parts) + "\n")
    return out / "report.html", out / "report.md"


def _md_code(text: str) -> str:
    """`code` spans of the setup lines as <code> (text already escaped)."""
    pieces = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))
