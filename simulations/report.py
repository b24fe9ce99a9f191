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


COLOURS = {"health": "tab:red", "education": "tab:blue", "finance": "tab:green"}


def _colour(domain: str) -> str:
    return COLOURS.get(domain, "tab:gray")


#: how the recommendation models' lines differ (colour: domain; line style and marker: noise mode)
MODEL_NAMES = {"mf": "MF", "hybrid": "hybrid (LLM adapter)"}
MODEL_FACE = {"mf": None, "hybrid": "none"}  # hollow markers for the hybrid


def _rec_models(rows) -> list[str]:
    """The trained recommendation models in the rows (MF first), not the stay-alone reference."""
    found = {r["model"] for r in rows if r["task"] == "rec" and r.get("status") == "ok" and r["model"] != "alone"}
    return sorted(found, key=lambda m: (m != "mf", m))


def _mode_lines(ax, agg, task, domain, model, label, *, errorbars: bool = True, colour: str | None = None) -> list:
    """One line per noise mode (solid local, dashed distributed) of ``agg`` against ε; its xs."""
    xs_all: list[float] = []
    for mode in ("local", "distributed"):
        xs, ys, sds = _series(agg, task, domain, model, mode)
        if not xs:
            continue
        xs_all += xs
        style = dict(color=colour or _colour(domain), linestyle=MODE_STYLE[mode], marker=MODE_MARK[mode],
                     label=label.format(domain=domain, mode=mode, model=MODEL_NAMES.get(model, model)))
        if MODEL_FACE.get(model):
            style["markerfacecolor"] = MODEL_FACE[model]
        if errorbars:
            ax.errorbar(xs, ys, yerr=sds, capsize=3, **style)
        else:
            ax.plot(xs, ys, **style)
    return xs_all


def _rec_quality(rows, plt):
    rec_domains = _domains(rows, "rec")
    fig, axes = plt.subplots(1, len(REC_METRICS), figsize=(6.2 * len(REC_METRICS), 4.4), squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], REC_METRICS.items()):
        agg = aggregate(rows, metric)
        xs_all = []
        for d in rec_domains:
            for model in _rec_models(rows):
                xs_all += _mode_lines(ax, agg, "rec", d, model, "{domain}, {model}, {mode} noise")
                np_ = _ref(agg, "rec", d, model, "none", math.inf)
                if np_ is not None:
                    name = "" if model == "mf" else f"{MODEL_NAMES.get(model, model)} "
                    ax.axhline(np_, color=_colour(d), linestyle=":", linewidth=1.2 if model == "mf" else 2.0,
                               label=f"{d}: {name}non-private (ε = ∞)")
            alone = _ref(agg, "rec", d, "alone", "none", 0.0)
            if alone is not None:
                ax.axhline(alone, color=_colour(d), linestyle="-.", linewidth=1.0, alpha=0.7,
                           label=f"{d}: each institution alone (nothing released)")
        _style_ax(ax, xs_all, f"{metric.upper() if metric == 'rmse' else 'NDCG@10'} of the federated models vs ε "
                              "(mean ± sd over seeds)", ylabel)
        ax.legend(fontsize=6.5)
    fig.suptitle("Recommendation quality vs the privacy budget (held-out data, last round)", fontsize=10)
    return fig


def _epsilon_spent(rows, plt):
    agg = aggregate(rows, "epsilon_spent_max")
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    xs_all = []
    for d in _domains(rows, "rec"):
        for model in _rec_models(rows):
            xs_all += _mode_lines(ax, agg, "rec", d, model, "{domain}, {model}, {mode} noise: largest ε spent",
                                  errorbars=False)
    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        ax.plot([lo, hi], [lo, hi], color="crimson", linestyle="--", label="budget cap (= the run's ε)")
        ax.set_yscale("log")
    _style_ax(ax, xs_all, "Privacy budget spent per institution vs its cap", "ε spent (largest over institutions, "
              "PRV accountant, log scale)")
    ax.legend(fontsize=6.5)
    return fig


def _causal_accuracy(rows, plt):
    c_domains = _domains(rows, "causal")
    specs = [("ate_abs_error", "Mean |ATE error| over items", "|estimate − true ATE| ({unit})"),
             ("ci_width", "95% CI width, mean over items", "CI width ({unit})")]
    fig, axes = plt.subplots(len(specs), len(c_domains), figsize=(5.0 * len(c_domains), 3.9 * len(specs)),
                             squeeze=False)
    for i, (metric, title, ylabel) in enumerate(specs):
        agg = aggregate(rows, metric)
        for j, d in enumerate(c_domains):
            ax = axes[i][j]
            xs_all = _mode_lines(ax, agg, "causal", d, "aipw", "{mode} noise")
            np_ = _ref(agg, "causal", d, "aipw", "none", math.inf)
            if np_ is not None:
                ax.axhline(np_, color="black", linestyle=":", label="non-private (ε = ∞)")
            _style_ax(ax, xs_all, f"{d}: {title}", ylabel.format(unit=OUTCOME_UNITS.get(d, "outcome units")))
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    return fig


def _coverage(rows, plt):
    agg = aggregate(rows, "coverage")
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    xs_all = []
    for d in _domains(rows, "causal"):
        xs_all += _mode_lines(ax, agg, "causal", d, "aipw", "{domain}, {mode} noise", errorbars=False)
    ax.axhline(0.95, color="black", linestyle="--", label="nominal 95%")
    _style_ax(ax, xs_all, "CI coverage of the true ATE vs ε", "share of items whose 95% CI covers the true ATE")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=6.5, loc="lower right")
    return fig


POLICY_REFS = {"engagement": ("-.", "dimgray", "by engagement (no ε needed)"),
               "oracle": ("--", "black", "oracle (true benefit)"), "random": (":", "gray", "random item")}


def _policy_value(rows, plt):
    c_domains = _domains(rows, "causal")
    agg = {k: aggregate(rows, f"policy_value_{k}") for k in ("causal", *POLICY_REFS)}
    if not any(agg.values()):
        return None
    fig, axes = plt.subplots(1, len(c_domains), figsize=(5.0 * len(c_domains), 4.2), squeeze=False)
    for j, d in enumerate(c_domains):
        ax = axes[0][j]
        xs_all = _mode_lines(ax, agg["causal"], "causal", d, "aipw", "causal (by DP benefit), {mode} noise")
        for name, (style, col, label) in POLICY_REFS.items():
            vals = [v[0] for k, v in agg[name].items() if k[1] == d]
            if vals:
                ax.axhline(sum(vals) / len(vals), linestyle=style, color=col, label=label)
        np_ = _ref(agg["causal"], "causal", d, "aipw", "none", math.inf)
        if np_ is not None:
            ax.axhline(np_, color=_colour(d), linestyle=":", linewidth=1.2, label="causal, non-private")
        _style_ax(ax, xs_all, f"{d}: policy value of the top-1 recommendation",
                  f"mean true benefit ({OUTCOME_UNITS.get(d, 'outcome units')}, higher is better)")
        ax.legend(fontsize=6.5)
    return fig


#: every figure of the report: (file, builder, title, what it means, the task whose rows it needs)
FIGURES = [
    ("rec_quality.png", _rec_quality, "Recommendation quality vs privacy budget",
     "Held-out RMSE (left, lower is better) and NDCG@10 (right, 1 held-out item ranked against "
     "sampled negatives, higher is better) of the federated models after the last round — matrix "
     "factorisation (MF) and, where swept, the hybrid LLM adapter (hollow markers) — against the ε each "
     "institution spends on the whole run. Solid lines: local noise "
     "(each institution adds the full noise; holds even if secure aggregation broke); dashed: "
     "distributed noise (each adds a 1/n_min share behind SecAgg+). Dotted horizontal: the same "
     "federation without DP (ε = ∞); dash-dotted: each institution alone, nothing released — the bar "
     "the federation must clear. HR@10 is left out: with 8 items it is always 1.", "rec"),
    ("epsilon_spent.png", _epsilon_spent, "Privacy budget spent vs cap",
     "The largest ε any institution's ledger reported at the end of each run, against the run's "
     "budget (each simulated institution's cap). Points on or just under the red line: the run "
     "spent its budget and no more.", "rec"),
    ("causal_accuracy.png", _causal_accuracy, "Causal accuracy vs privacy budget",
     "Top row: mean absolute error of the federated AIPW estimate of each item's average treatment "
     "effect against the simulator's true effect; bottom row: the mean width of its 95% confidence "
     "interval (which includes the DP noise), both in the domain's outcome units, log scale. All "
     "items are estimated in one run and share the ε. Dotted: the same estimate without DP.", "causal"),
    ("coverage.png", _coverage, "Confidence-interval coverage",
     "The share of items (averaged over seeds) whose 95% CI contains the true effect. Near the "
     "dashed line the intervals are honest; well below it they are too narrow. With few seeds "
     "and 8 items per run, each point moves in steps of 1/8.", "causal"),
    ("policy_value.png", _policy_value, "Causal vs engagement recommendations",
     "The mean true benefit each person gets from the one item recommended to them (outcome "
     "oriented so that larger is better), graded with the simulator's true effects. Causal: "
     "items ranked by the benefit the DP CATE models estimate; engagement: ranked by expected "
     "engagement (what an engagement-trained recommender does at best); oracle: the true best "
     "item; random: an item at random.", "causal"),
]


def build_figures(rows: list[dict]) -> list[tuple[str, str, str, object]]:
    """The report's figures as matplotlib Figures: [(file, title, what it means, Figure)]
    (the caller saves and closes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for fname, builder, title, text, task in FIGURES:
        if not _domains(rows, task):
            continue
        fig = builder(rows, plt)
        if fig is not None:
            fig.tight_layout()
            out.append((fname, title, text, fig))
    return out


def make_plots(rows: list[dict], folder: Path) -> list[tuple[str, str, str]]:
    """Write the plots; return [(file, title, what it means)]."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figs = []
    for fname, title, text, fig in build_figures(rows):
        fig.savefig(folder / fname, dpi=100)
        plt.close(fig)
        figs.append((fname, title, text))
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
    """plots/*.png, report.md and the self-contained report.html (figures inline) in ``out``."""
    figs = make_plots(rows, out / "plots")
    blocks = _blocks(_setup_lines(meta, rows), figs, tables(rows))
    (out / "report.md").write_text("\n".join(_markdown(blocks)) + "\n")
    (out / "report.html").write_text("\n".join(_html(blocks, out)) + "\n")
    return out / "report.html", out / "report.md"


TITLE = "fedrec privacy-budget sweep"
FOOTER = ("One row per cell and seed: `results.csv`{where}. Failed cells re-run when the same command is run "
          "again.")


def _blocks(setup: list[str], figs: list[tuple[str, str, str]], tabs: list) -> list[tuple]:
    """The report's content once, as (kind, ...) blocks both renderers share: the sections
    Setup, Figures and Tables, then the footer."""
    blocks: list[tuple] = [("h1", TITLE), ("h2", "Setup"), ("list", setup), ("h2", "Figures")]
    blocks += [("figure", fname, title, text) for fname, title, text in figs]
    blocks.append(("h2", "Tables"))
    blocks += [("table", title, head, body) for title, head, body in tabs]
    blocks.append(("footer",))
    return blocks


def _markdown(blocks: list[tuple]) -> list[str]:
    md: list[str] = []
    for kind, *a in blocks:
        if kind in ("h1", "h2"):
            md += [("# " if kind == "h1" else "## ") + a[0], ""]
        elif kind == "list":
            md += [f"- {s}" for s in a[0]] + [""]
        elif kind == "figure":
            fname, title, text = a
            md += [f"### {title}", "", f"![{title}](plots/{fname})", "", text, ""]
        elif kind == "table":
            title, head, body = a
            md += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            md += ["| " + " | ".join(r) + " |" for r in body] + [""]
        elif kind == "footer":
            md.append(FOOTER.format(where=""))
    return md


STYLE = ("<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}"
         "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}"
         "td:nth-child(-n+4){text-align:left}img{max-width:100%;border:1px solid #eee}"
         "figcaption{font-size:0.9em;color:#444;margin:0.3em 0 1.5em}</style>")


def _html(blocks: list[tuple], out: Path) -> list[str]:
    """Self-contained: PNGs as data: URIs, an inline style, no script, no external URL."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(TITLE)}</title>", STYLE, "</head>", "<body>"]
    for kind, *a in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{e(a[0])}</{kind}>")
        elif kind == "list":
            parts += ["<ul>"] + [f"<li>{_md_code(e(s))}</li>" for s in a[0]] + ["</ul>"]
        elif kind == "figure":
            fname, title, text = a
            data = base64.b64encode((out / "plots" / fname).read_bytes()).decode("ascii")
            parts += [f"<h3>{e(title)}</h3>", "<figure>",
                      f'<img src="data:image/png;base64,{data}" alt="{e(title)}">',
                      f"<figcaption>{e(text)}</figcaption>", "</figure>"]
        elif kind == "table":
            title, head, body = a
            parts += [f"<h3>{e(title)}</h3>", "<table>",
                      "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body]
            parts += ["</tbody>", "</table>"]
        elif kind == "footer":
            parts.append(f"<p>{_md_code(e(FOOTER.format(where=' beside this page')))}</p>")
    return parts + ["</body>", "</html>"]


def _md_code(text: str) -> str:
    """`code` spans of the setup lines as <code> (text already escaped)."""
    pieces = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))
