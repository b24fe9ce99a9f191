"""``fedrec-sim sweep``: what each privacy budget costs, per domain, as a table and pictures.

The grid is domains x ε x noise modes x seeds x models x tasks. Each (cell, seed) is one unit
of work with its own result file ``OUT/cells/<id>.json``, written atomically when it finishes:

* **rec** cells are real Flower simulations (:func:`fedrec.simulations.run.run_simulation`: the
  ServerApp and ClientApp over SecAgg+, each simulated institution's policy and ledger under
  ``OUT/runs/<id>/``), MF trained for ``--rounds`` rounds; the last round's held-out RMSE, MAE
  and NDCG@10 are the cell's numbers. ε = inf is one non-private cell per (domain, seed) (noise
  mode ``none``); the stay-alone reference (``model = alone``: each institution fits its own
  people with nothing released, ε = 0) is computed in-process with the same client code.
* **causal** cells run the estimation protocol in-process
  (:func:`fedrec.simulations.causal_cli.estimate_inprocess`: the same client statistics and
  server combination code as the Flower run, the releases added in numpy). Why not a Flower run
  per cell: the protocol's result does not depend on the transport (SecAgg+ sums are exact), and a
  Flower run costs ~10 s of Ray start-up and ~15 message stages per cell; in-process a cell is
  1-12 s, so the causal half of a 5-seed, 3-domain grid takes minutes, not an hour. Every item
  of the domain is estimated in one run (the items share the ε, as ``fedrec-sim causal``
  does by default); the cell reports the mean |ATE error| and CI width over the items, the share
  of items whose 95% CI covers the true ATE, and the policy value (mean true benefit of the top-1
  item) of causal vs engagement recommendations.

Reproducible: seed ``s`` fixes the federation (``seed``), the splits and — through the
simulation-only ``sim.noise-seed`` — every release's DP noise, so a cell's numbers are the same
whenever it is re-run. Resumable: a cell whose file exists is skipped; Ctrl-C stops the pool and
loses nothing that finished (an interrupted rec cell's partial run folder is discarded and that
cell re-runs). Parallel: ``--jobs`` worker processes (default: the cores), one cell each; every
rec cell starts its own Ray (~8-10 s here), so on 2 cores two cells in flight overlap one
cell's start-up with the other's work.

Outputs in ``OUT``: ``results.csv`` (one row per cell and seed), ``plots/*.png``,
``report.html`` (self-contained) and ``report.md`` (simulations/report.py), ``sweep.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common.errors import FedrecInputError

__all__ = ["SweepSpec", "Cell", "plan_cells", "run_sweep", "CSV_COLUMNS", "sweep_command"]

DOMAINS = ("health", "education", "finance")
MODELS_AVAILABLE = ("mf", "hybrid")
MODELS_KNOWN = ("mf", "hybrid")
TASKS = ("rec", "causal")
NOISE_MODES = ("local", "distributed")
#: ``fedrec-sim sweep``'s fixed settings: a folder holds one sweep of these (its grid may grow)
FIXED = ("institutions", "rounds", "people", "skew")

CSV_COLUMNS = [
    "task", "domain", "model", "noise_mode", "epsilon", "seed", "institutions", "rounds", "people",
    "rmse", "mae", "ndcg10", "epsilon_spent_max",
    "ate_abs_error", "ate_rmse", "ci_width", "coverage",
    "policy_value_causal", "policy_value_engagement", "policy_value_oracle", "policy_value_random",
    "items", "wall_s", "status", "cell",
]


@dataclass(frozen=True)
class Cell:
    task: str          # rec | causal
    domain: str
    model: str         # mf | alone (rec), aipw (causal)
    noise_mode: str    # local | distributed | none (ε = inf, or nothing released)
    epsilon: float     # inf = non-private; 0 = nothing released (stay alone)
    seed: int

    @property
    def id(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        return f"{self.task}-{self.domain}-{self.model}-{self.noise_mode}-eps{eps}-seed{self.seed}"


@dataclass
class SweepSpec:
    domains: tuple[str, ...] = DOMAINS
    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
    seeds: int = 5
    models: tuple[str, ...] = ("mf",)
    tasks: tuple[str, ...] = TASKS
    noise_modes: tuple[str, ...] = NOISE_MODES
    institutions: int = 8
    rounds: int = 5
    people: int = 20000
    skew: float = 0.5
    notes: list[str] = field(default_factory=list)

    def fixed(self) -> dict:
        return {k: getattr(self, k) for k in FIXED}


def parse_list(text: str, flag: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = tuple(p.strip() for p in str(text).split(",") if p.strip())
    if not items:
        raise FedrecInputError(f"{flag}: empty; fix: give a comma-separated list, e.g. {','.join(allowed or ('a', 'b'))}")
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise FedrecInputError(f"{flag}: {', '.join(bad)} not known; fix: choose from {','.join(allowed)}")
    return tuple(dict.fromkeys(items))


def parse_epsilons(text: str, flag: str = "--epsilon") -> tuple[float, ...]:
    """``"0.5,1,inf"`` -> (0.5, 1.0, inf), sorted and deduplicated; every ε must be > 0 (one-line
    FedrecInputError naming ``flag`` otherwise). The one ε-list parser of the CLIs and benchmarks."""
    out = []
    for part in parse_list(text, flag):
        try:
            eps = float(part)
        except ValueError:
            raise FedrecInputError(f"{flag}: {part!r} is not a number; fix: e.g. {flag} 0.5,1,2,4,8,inf") from None
        if not eps > 0:
            raise FedrecInputError(f"{flag}: {part!r} must be > 0 ('inf' = the non-private reference)")
        out.append(eps)
    return tuple(sorted(set(out)))


def plan_cells(spec: SweepSpec) -> list[Cell]:
    """Every (cell, seed) of the grid, seed-major (a partial sweep holds whole seeds of everything)."""
    cells: list[Cell] = []
    for seed in range(spec.seeds):
        for domain in spec.domains:
            if "causal" in spec.tasks:
                for eps in spec.epsilons:
                    for mode in (spec.noise_modes if math.isfinite(eps) else ("none",)):
                        cells.append(Cell("causal", domain, "aipw", mode, eps, seed))
            if "rec" in spec.tasks:
                for model in spec.models:
                    if model not in MODELS_AVAILABLE:
                        continue
                    cells.append(Cell("rec", domain, "alone", "none", 0.0, seed))
                    for eps in spec.epsilons:
                        for mode in (spec.noise_modes if math.isfinite(eps) else ("none",)):
                            cells.append(Cell("rec", domain, model, mode, eps, seed))
    return list(dict.fromkeys(cells))


# ------------------------------------------------------------------------------------ cells
def _quiet_env() -> None:
    for var, val in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_USAGE_STATS_ENABLED", "0"), ("FEDREC_NO_PROGRESS", "1"), ("PYTHONWARNINGS", "ignore")):
        os.environ.setdefault(var, val)


def run_cell(cell: Cell, spec: dict, out: str) -> dict:
    """Run one cell (in a worker process); write ``cells/<id>.json`` atomically; return its row."""
    import warnings

    warnings.filterwarnings("ignore")
    _quiet_env()
    out_dir = Path(out)
    t0 = time.time()
    base = {"task": cell.task, "domain": cell.domain, "model": cell.model, "noise_mode": cell.noise_mode,
            "epsilon": cell.epsilon, "seed": cell.seed, "institutions": spec["institutions"],
            "rounds": spec["rounds"] if cell.task == "rec" and cell.model != "alone" else "",
            "people": spec["people"], "cell": cell.id}
    try:
        if cell.task == "causal":
            metrics = _causal_cell(cell, spec)
        elif cell.model == "alone":
            metrics = _alone_cell(cell, spec)
        else:
            metrics = _rec_cell(cell, spec, out_dir / "runs" / cell.id)
        row = {**base, **metrics, "status": "ok"}
    except Exception as err:  # noqa: BLE001 - one line per failed cell; the sweep goes on
        row = {**base, "status": f"failed: {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}"}
    row["wall_s"] = round(time.time() - t0, 1)
    _write_atomic(out_dir / "cells" / f"{cell.id}.json", row)
    return row


def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(v: Any):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def rec_config(cell: Cell, spec: dict):
    """The run config of a rec cell: seed fixes data, splits and (simulation-only) noise."""
    from fedrec.common.config import RunConfig

    flat = {"dataset": cell.domain, "institutions": spec["institutions"], "rounds": spec["rounds"],
            "people": spec["people"], "partition-skew": spec["skew"], "seed": cell.seed,
            "sim.noise-seed": cell.seed, "privacy.epsilon": cell.epsilon, "model": cell.model}
    if cell.noise_mode in NOISE_MODES:
        flat["privacy.noise-mode"] = cell.noise_mode
    return RunConfig().override(**flat)


def _rec_cell(cell: Cell, spec: dict, run_dir: Path) -> dict:
    from fedrec.simulations.run import one_actor_cpus, run_simulation

    if run_dir.exists():  # an interrupted attempt: its ledgers belong to a run that never finished
        shutil.rmtree(run_dir)
    hist = run_simulation(rec_config(cell, spec), run_dir, quiet=True, allow_non_private=math.isinf(cell.epsilon),
                          num_cpus_per_client=one_actor_cpus())  # one actor per cell: cells run side by side
    last = hist["rounds"][-1]
    eps = last.get("epsilon") or {}
    finite = [float(v) for v in eps.values() if math.isfinite(float(v))]
    return {"rmse": last.get("rmse"), "mae": last.get("mae"), "ndcg10": last.get("ndcg10"),
            "epsilon_spent_max": max(finite) if finite else ("" if math.isinf(cell.epsilon) else 0.0)}


def alone_metrics(data_root: Path, cfg) -> dict:
    """Each institution fits its own people (user side around the public offset), nothing
    released: the bar federation must clear. Same client code and held-out split as the run."""
    from fedrec.client.app import _load
    from fedrec.client.train import MFTrainer, evaluation_sums
    from fedrec.common.metrics import add_sums, finalize

    parts = []
    for k in range(cfg.data.institutions):
        folder = data_root / f"institution_{k:02d}"
        inst = _load(str(folder), tuple(sorted(cfg.to_flat().items())))
        d = inst.data
        t = MFTrainer(inst.ratings, d.n_items, cfg, bounds=d.bounds, seed=0)
        t.refit()
        parts.append(evaluation_sums(t, d.test_person, d.test_item, d.test_rating, inst.negatives, bounds=d.bounds,
                                     k=cfg.eval.k))
    m = finalize(add_sums(parts))
    return {"rmse": m.get("rmse"), "mae": m.get("mae"), "ndcg10": m.get("ndcg10"), "epsilon_spent_max": 0.0}


def _alone_cell(cell: Cell, spec: dict) -> dict:
    import tempfile

    from fedrec.simulations.run import prepare_data

    cfg = rec_config(Cell("rec", cell.domain, "mf", "local", 1.0, cell.seed), spec)
    with tempfile.TemporaryDirectory(prefix="fedrec-alone-") as work:
        root = prepare_data(cfg, Path(work))
        cfg = cfg.override(**{"data-dir": str(root)})
        return alone_metrics(root, cfg)


def causal_config(cell: Cell, spec: dict):
    from fedrec.common.causal.config import CausalConfig
    from fedrec.simulations.domains import get_domain

    study = get_domain(cell.domain).study()
    mode = cell.noise_mode if cell.noise_mode in NOISE_MODES else "local"
    return CausalConfig(epsilon=cell.epsilon, noise_mode=mode, n_min=spec["institutions"],
                        covariates=study.causal_covariates, derived=study.causal_derived)


def causal_summary(institutions, truth, cfg, result_items: dict) -> dict:
    """ATE error, CI width and coverage over the items; policy values (top-1) of the recommenders."""
    import numpy as np

    from fedrec.server.causal_recommend import policy_values

    items = list(result_items)
    err = np.array([result_items[i]["ate"] - float(truth.ate[i]) for i in items], dtype=float)
    width = np.array([result_items[i]["ci_high"] - result_items[i]["ci_low"] for i in items], dtype=float)
    cover = np.array([result_items[i]["ci_low"] <= float(truth.ate[i]) <= result_items[i]["ci_high"] for i in items])
    out = {"ate_abs_error": float(np.abs(err).mean()), "ate_rmse": float(np.sqrt((err**2).mean())),
           "ci_width": float(width.mean()), "coverage": float(cover.mean()), "items": len(items)}
    if all("cate_coef" in result_items[i] for i in items) and len(items) == len(truth.item_ids):
        pv = policy_values(institutions, truth, result_items, cfg.covariates, cfg.derived)
        out.update({f"policy_value_{k}": pv[k]["policy_value"] for k in ("causal", "engagement", "oracle", "random")})
    return out


def _causal_cell(cell: Cell, spec: dict) -> dict:
    import numpy as np

    from fedrec.common.causal.config import plan_budget
    from fedrec.common.config import derive_seed
    from fedrec.simulations.causal_cli import estimate_inprocess
    from fedrec.simulations.domains import domain_federation

    insts, truth = domain_federation(cell.domain, institutions=spec["institutions"], people=spec["people"],
                                     seed=cell.seed, skew=spec["skew"])
    cfg = causal_config(cell, spec)
    rng = np.random.default_rng(derive_seed(cell.seed, cell.domain, "causal", cell.noise_mode, cell.epsilon))
    res = estimate_inprocess(insts, cfg, rng=rng, plan=plan_budget(cfg))
    out = causal_summary(insts, truth, cfg, res.items)
    out["epsilon_spent_max"] = ""  # in-process: no ledger (the Flower run's ledgers are tested elsewhere)
    return out


# ------------------------------------------------------------------------------------ driver
def load_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "cells").glob("*.json")):
        try:
            rows.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a torn file cannot exist (atomic writes), but never let one stop the report
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    def key(r):
        eps = float(r["epsilon"]) if r.get("epsilon") not in ("", None) else 0.0
        return (r["task"], r["domain"], r["model"], r["noise_mode"], eps, int(r["seed"]))

    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=key):
            w.writerow({k: _csv_value(r.get(k, "")) for k in CSV_COLUMNS})
    os.replace(tmp, path)


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else repr(round(v, 6))
    return v


def check_folder(out: Path, spec: SweepSpec) -> None:
    """A folder holds one sweep's fixed settings; its grid may grow between runs."""
    meta = out / "sweep.json"
    if meta.exists():
        old = json.loads(meta.read_text()).get("fixed", {})
        diff = {k: (old.get(k), v) for k, v in spec.fixed().items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"--{k} {a} (now {b})" for k, (a, b) in diff.items())
            raise FedrecInputError(f"--out {out}: holds a sweep with {what}; fix: use the same settings to resume, "
                                   "or a new --out")


def write_meta(out: Path, spec: SweepSpec, command: str) -> None:
    meta = {"fixed": spec.fixed(), "grid": {"domains": list(spec.domains),
                                            "epsilons": ["inf" if math.isinf(e) else e for e in spec.epsilons],
                                            "seeds": spec.seeds, "models": list(spec.models), "tasks": list(spec.tasks),
                                            "noise_modes": list(spec.noise_modes)},
            "command": command, "commit": git_commit(), "notes": spec.notes}
    _write_atomic(out / "sweep.json", meta)


def git_commit() -> str:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_sweep(spec: SweepSpec, out: Path, *, jobs: int | None = None, console=None, command: str = "",
              progress: bool = True) -> dict:
    """Run the missing cells of the grid, then write results.csv, plots and the report.

    Returns ``{"ran": n, "skipped": n, "failed": n, "interrupted": bool, "rows": n}``.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_folder(out, spec)
    write_meta(out, spec, command)
    cells = plan_cells(spec)
    done = {f.stem for f in (out / "cells").glob("*.json")} if (out / "cells").is_dir() else set()
    ok_done = {r["cell"] for r in load_rows(out) if r.get("status") == "ok"}
    todo = [c for c in cells if c.id not in ok_done]
    skipped = len(cells) - len(todo)
    retry = [c.id for c in todo if c.id in done]
    if console is not None:
        console.print(f"sweep: {len(cells)} cells ({skipped} finished before, skipped; {len(todo)} to run"
                      + (f", {len(retry)} of them failed before" if retry else "") + f") -> {out}", highlight=False)
    jobs = max(1, min(jobs or (os.cpu_count() or 1), len(todo) or 1))
    stats = {"ran": 0, "skipped": skipped, "failed": 0, "interrupted": False}
    spec_d = asdict(spec)
    _quiet_env()
    bar = _bar(len(todo), enabled=progress and bool(todo))
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) if todo else None
    try:
        if pool is not None:
            pending = {pool.submit(run_cell, c, spec_d, str(out)): c for c in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    cell = pending.pop(fut)
                    try:
                        row = fut.result()
                    except Exception as err:  # noqa: BLE001 - a dead worker: the cell re-runs next time
                        row = {"status": f"failed: worker died ({type(err).__name__})"}
                    stats["ran"] += 1
                    if row.get("status") != "ok":
                        stats["failed"] += 1
                        if console is not None:
                            console.print(f"[yellow]{cell.id}[/]: {row.get('status')}", highlight=False)
                    bar.update(cell.id)
    except KeyboardInterrupt:
        stats["interrupted"] = True
    finally:
        bar.close()
        if pool is not None:
            _stop_pool(pool, stats["interrupted"])
    rows = load_rows(out)
    write_csv(rows, out / "results.csv")
    stats["rows"] = len(rows)
    from fedrec.simulations.report import write_report

    write_report(out, rows, json.loads((out / "sweep.json").read_text()))
    return stats


def _stop_pool(pool, interrupted: bool) -> None:
    if not interrupted:
        pool.shutdown(wait=True)
        return
    procs = list(getattr(pool, "_processes", {}).values())  # the workers this sweep started
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except (ProcessLookupError, OSError):
            pass
    for p in procs:
        p.join(timeout=10)


class _bar:
    """A progress bar on stderr (rich), one tick per finished cell."""

    def __init__(self, total: int, *, enabled: bool):
        self._p = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("[bold]sweep[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.fields[last]}"), console=Console(stderr=True))
        self._t = self._p.add_task("cells", total=total, last="")
        self._p.start()

    def update(self, last: str) -> None:
        if self._p is not None:
            self._p.update(self._t, advance=1, last=last)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def sweep_command(*, domains: str, epsilons: str, seeds: int, models: str, tasks: str, noise_modes: str,
                  institutions: int, rounds: int, people: int, jobs: int | None, out: Path, console,
                  quiet: bool = False, command: str = "") -> int:
    """Parse, run, summarise (the CLI's body). One line and exit 1 on bad input."""
    spec = SweepSpec(domains=parse_list(domains, "--domains", DOMAINS), epsilons=parse_epsilons(epsilons),
                     seeds=seeds, models=parse_list(models, "--models", MODELS_KNOWN),
                     tasks=parse_list(tasks, "--tasks", TASKS), noise_modes=parse_list(noise_modes, "--noise-modes", NOISE_MODES),
                     institutions=institutions, rounds=rounds, people=people)
    if seeds < 1:
        raise FedrecInputError("--seeds must be >= 1")
    if institutions < 2:
        raise FedrecInputError("--institutions must be >= 2 (secure aggregation needs a sum of several)")
    if rounds < 1 or people < 10 * institutions:
        raise FedrecInputError("--rounds must be >= 1 and --people at least 10 per institution")
    if jobs is not None and jobs < 1:
        raise FedrecInputError("--jobs must be >= 1")
    from fedrec.simulations.ray_cluster import RAY_ADDRESS_ENV

    if os.environ.get(RAY_ADDRESS_ENV):
        # Flower sizes each run's actor pool to the whole cluster: two runs at once would wait on
        # each other's actors, so on a cluster the cells run one after the other, each using all of it
        if jobs is not None and jobs > 1:
            raise FedrecInputError(f"--jobs {jobs} with --ray-address: each cell's Flower run uses the whole cluster; "
                                   "fix: leave --jobs out (cells run one at a time on the cluster)")
        jobs = 1
    missing = [m for m in spec.models if m not in MODELS_AVAILABLE]
    if missing and "rec" in spec.tasks:
        note = f"--models {','.join(missing)}: not available; its rows are left out"
        spec.notes.append(note)
        console.print(f"[yellow]note[/]: {note}", highlight=False)
        if not [m for m in spec.models if m in MODELS_AVAILABLE] and spec.tasks == ("rec",):
            raise FedrecInputError(f"--models {','.join(spec.models)}: none available; fix: add mf")
    stats = run_sweep(spec, out, jobs=jobs, console=console, command=command, progress=not quiet)
    line = (f"{stats['ran']} cells run, {stats['skipped']} reused, {stats['failed']} failed; "
            f"{stats['rows']} rows in {out / 'results.csv'}")
    if stats["interrupted"]:
        console.print(f"[yellow]interrupted[/]: {line}; re-run the same command to resume", highlight=False)
        return 130
    console.print(f"[bold green]done[/] {line}", highlight=False)
    console.print(f"report: {out / 'report.html'} (and report.md, plots/)", highlight=False)
    return 1 if stats["failed"] else 0
