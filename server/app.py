"""The fedrec Flower ServerApp: federated MF training through secure sums.

Per run: wait for every institution, agree on the public item catalogue, then for each round
ask all institutions for their DP item-side update through the sum protocol (SecAgg+ by
default: the server sees only the sum), apply the equal-weight mean, and — in simulations —
collect held-out metrics. Writes ``metrics.json`` and ``config.json`` to ``results-dir``.

A round whose sum cannot be formed (too few contributors, protocol failure) raises: the run
stops loudly rather than silently keeping the old model.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrec.common.jsonio import write_json
from fedrec.common.config import RunConfig
from fedrec.common.metrics import add_sums, finalize
from fedrec.common.models.item_prior import apply_prior_mean, fit_prior_mean
from fedrec.server.aggregation import (
    PlainSum,
    RoundFailed,
    RoundResult,
    SumProtocol,
    numpy_to_arrays,
    reply_metrics,
    split_replies,
)
from fedrec.server.exchange import send_and_receive

log = logging.getLogger(__name__)

__all__ = ["app", "make_sum_protocol", "wait_for_nodes"]

app = ServerApp()


def make_sum_protocol(cfg: RunConfig, **secagg_kwargs) -> SumProtocol:
    """SecAgg+ unless the run explicitly turned it off (tests and benchmark peers only);
    ``secagg_kwargs`` go to :meth:`SecAggPlusSum.from_config` (e.g. ``clip_range``)."""
    if not cfg.secagg.enabled:
        log.warning("secure aggregation is OFF: the server sees every institution's update")
        return PlainSum(straggler_grace=None if cfg.secagg.straggler_grace < 0 else cfg.secagg.straggler_grace)
    from fedrec.server.secagg_workflow import SecAggPlusSum

    return SecAggPlusSum.from_config(cfg, **secagg_kwargs)


def wait_for_nodes(grid: Grid, n: int, *, timeout: float = 120.0) -> list[int]:
    """All ``n`` institutions, or a clear error (FedAvg's sampler races the first round)."""
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes[:n]
        if time.monotonic() - start > timeout:
            raise RoundFailed(f"only {len(nodes)} of {n} institutions connected within {timeout:.0f} s")
        time.sleep(0.2)


@dataclass(frozen=True)
class Catalogue:
    """What the institutions agreed on: the public item table's size and metadata features."""

    n_items: int
    institution_names: dict[str, str]
    #: public item metadata as numbers (``item_prior.catalogue_features``), ``[n_items, f]``
    features: np.ndarray


@dataclass(frozen=True)
class ItemStepSizes:
    """Post-processing of the DP item-count round: per-item step sizes and what they rest on."""

    precond: np.ndarray
    #: the securely summed DP weighted item counts
    counts: np.ndarray
    #: variance of the noise in each summed gradient coordinate (public: Σ_k (σ_k C)²)
    noise_var: float
    #: variance of the noise in each summed count (public)
    count_noise_var: float
    #: the nodes whose count release went into the sum (each one a charged release)
    contributors: tuple[int, ...] = ()


def agree_on_catalogue(grid: Grid, nodes: list[int]) -> Catalogue:
    """The public catalogue every institution must hold (same ids, order and metadata)."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.catalogue") for n in nodes]
    # the simulation engine serves the nodes one after another: the wait grows with their number
    replies = list(send_and_receive(grid, msgs, timeout=300 + 0.5 * len(nodes)))
    ok, _, failed = split_replies(replies)
    if failed or len(ok) < len(nodes):
        raise RoundFailed(f"catalogue query failed at nodes {sorted(set(nodes) - set(ok))}")
    seen = {(int(m.content["catalogue"]["n-items"]), str(m.content["catalogue"]["sha256"])) for m in ok.values()}
    if len(seen) != 1:
        raise RoundFailed(f"institutions disagree on the item catalogue: {sorted(seen)}")
    names = {str(n): str(m.content["catalogue"].get("institution", n)) for n, m in ok.items()}
    n_items = seen.pop()[0]
    first = next(iter(ok.values()))
    features = (first.content["public"]["item-features"].numpy() if "public" in first.content.array_records
                else np.zeros((n_items, 0), np.float32))
    return Catalogue(n_items=n_items, institution_names=names, features=features.reshape(n_items, -1))


def item_step_sizes(
    grid: Grid, nodes: list[int], protocol: SumProtocol, cfg: RunConfig, min_contributors: int,
    epsilon: dict[str, float],
) -> ItemStepSizes:
    """Secure sum of the institutions' DP item counts -> public per-item step sizes.

    Post-processing only: the Wiener gain uses the counts' sum and the variance of the
    gradient noise the institutions declare (a public function of their DP settings).
    """
    # public quantization range: a person adds at most w_u <= 1 to a count, so an institution's
    # count is at most its number of persons; 1e6 covers any partner (clamping is reported)
    content = RecordDict({"config": ConfigRecord({"server-round": 0, "secagg.clip-range": 1.0e6})})
    res = protocol.run_round(
        grid, nodes, message_type="query.counts", content=content, server_round=0, min_contributors=min_contributors
    )
    if res.total is None:
        raise RoundFailed("item-count round: no contribution")
    # noise variance of each summed gradient coordinate: Σ_k (σ_k C)², as each declares
    noise_var = sum(m.get("noise-var", 0.0) for m in res.metrics.values())
    count_noise_var = sum(m.get("count-noise-var", 0.0) for m in res.metrics.values())
    record_epsilon(epsilon, res)
    counts = res.total["counts"]
    from fedrec.common.models.mf import preconditioner  # torch: imported when a training run needs it

    return ItemStepSizes(
        precond=preconditioner(counts, cfg.train.item_reg, noise_var, cfg.train.item_prior_var),
        counts=counts, noise_var=noise_var, count_noise_var=count_noise_var,
        contributors=tuple(res.contributors),
    )


def prior_mean_update(
    update: dict[str, np.ndarray], steps: ItemStepSizes, catalogue: Catalogue, cfg: RunConfig
) -> dict[str, np.ndarray]:
    """Round 1 under DP: centre the item-bias prior on public metadata instead of 0.

    Post-processing only (public catalogue features, the DP counts and the DP round-1 sum;
    see ``common/models/item_prior.py``). Round 1 starts from item biases 0 and each
    institution takes one preconditioned step, so the summed update is the Wiener-shrunk
    estimate with gain ``lr · server_lr · P_i N_i``.
    """
    if cfg.train.item_prior_mean != "metadata" or steps.noise_var <= 0 or cfg.train.local_steps != 1:
        return update
    gain = np.clip(cfg.train.lr * cfg.train.server_lr * steps.precond * np.maximum(steps.counts, 0.0), 0.0, 1.0)
    prior = fit_prior_mean(update["item_bias"], gain, steps.counts, catalogue.features,
                           count_noise_var=steps.count_noise_var)
    return {**update, "item_bias": apply_prior_mean(update["item_bias"], gain, prior)}


def initial_adapter_arrays(seed: int) -> dict[str, np.ndarray]:
    """The adapter's initial LoRA + head tensors (public: the pretrained encoder's shapes and a
    seeded LoRA initialisation); every client loads what the server sends each round."""
    import torch

    from fedrec.common.models.adapter import AdapterConfig, TextAdapter

    torch.manual_seed(seed)
    return {k: np.asarray(v, np.float32) for k, v in TextAdapter(AdapterConfig()).to_numpy().items()}


def count_releases(releases: dict[str, dict], institution_names: dict[str, str], nodes) -> None:
    """One more accepted (charged) release for each of ``nodes`` in the run's audit record."""
    for node in nodes:
        releases.setdefault(institution_names.get(str(node), str(node)), {"count": 0, "ledger_head": None})["count"] += 1


def record_epsilon(epsilon: dict[str, float], res: RoundResult) -> None:
    """Keep each institution's latest reported ε (the ledger's total, so never decreasing)."""
    for node, m in res.metrics.items():
        if "epsilon" in m:
            epsilon[str(node)] = m["epsilon"]


def evaluate_round(grid: Grid, nodes: list[int], arrays: dict[str, np.ndarray], server_round: int,
                   steps: ItemStepSizes | None = None, hybrid: bool = False) -> dict[str, float]:
    """Held-out metrics summed over institutions (simulation only; see eval.metrics-release).
    A hybrid run also sends the public DP item counts and their noise variance (its popularity
    component: post-processing of a DP release)."""
    content = RecordDict({"arrays": numpy_to_arrays(arrays), "config": ConfigRecord({"server-round": server_round})})
    if hybrid and steps is not None:
        content["hybrid"] = numpy_to_arrays({"counts": np.asarray(steps.counts, np.float32)})
        content["hybrid-config"] = ConfigRecord({"count-noise-var": float(steps.count_noise_var)})
    msgs = [Message(content, dst_node_id=n, message_type="evaluate") for n in nodes]
    ok, _, _ = split_replies(send_and_receive(grid, msgs, timeout=600))
    return finalize(add_sums(reply_metrics(m) for m in ok.values()))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    with reported_failure(cfg.data.results_dir):
        run_training(grid, cfg)


@contextmanager
def reported_failure(results_dir: str):
    """A run that cannot complete (too few institutions, a refused plan) ends with one line in
    the log and ``failure.json`` in the results folder — which the CLIs print — not a traceback."""
    try:
        yield
    except RoundFailed as err:
        log.error("run failed: %s", err)
        if results_dir:
            Path(results_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(results_dir) / "failure.json", {"reason": str(err)})


def run_training(grid: Grid, cfg: RunConfig) -> dict:
    results_dir = Path(cfg.data.results_dir) if cfg.data.results_dir else None
    nodes = wait_for_nodes(grid, cfg.data.institutions)
    catalogue = agree_on_catalogue(grid, nodes)
    n_items, institution_names = catalogue.n_items, catalogue.institution_names
    adapter = cfg.train.model == "adapter"
    dim = cfg.train.mf_dim
    if adapter:  # LoRA + head tensors of the public pretrained encoder (docs/adapter.md)
        global_arrays = initial_adapter_arrays(cfg.data.seed)
    else:
        global_arrays = {"item_bias": np.zeros(n_items, np.float32)}
        if dim:
            rng = np.random.default_rng(cfg.data.seed)
            global_arrays["item_factors"] = (0.1 * rng.standard_normal((n_items, dim))).astype(np.float32)
    protocol = make_sum_protocol(cfg)
    # the run's own record for the audit: its run id (the one every client charges its ledger
    # under) and, per institution, how many replies the server accepted (each one a charged release)
    run_id = str(grid.run.run_id)
    releases: dict[str, dict] = {name: {"count": 0, "ledger_head": None} for name in institution_names.values()}
    history: dict = {"rounds": [], "config": cfg.to_flat(), "institutions": institution_names, "releases": releases}
    if results_dir:
        results_dir.mkdir(parents=True, exist_ok=True)
        write_json(results_dir / "config.json", {**cfg.to_flat(), "run-id": run_id})
    simulate = cfg.eval.metrics_release == "simulation"
    min_contributors = max(1, math.ceil((1 - cfg.secagg.max_dropout_fraction) * len(nodes)))
    if cfg.privacy.noise_mode == "distributed":
        min_contributors = max(min_contributors, cfg.n_min)
    epsilon: dict[str, float] = {}
    steps = None if adapter else item_step_sizes(grid, nodes, protocol, cfg, min_contributors, epsilon)
    count_releases(releases, institution_names, steps.contributors if steps else ())  # a charged release too
    # a noiseless delta coordinate is a step of at most the rating range (Newton step on a
    # mean residual), times lr/q; 10 covers any 0.5-5 or 1-5 scale with room to spare (the
    # adapter's step is lr times a clipped gradient sum plus its noise over a public denominator:
    # the same range holds)
    train_range = 10.0 * cfg.train.lr * max(1, cfg.train.local_steps)
    progress = _Progress(cfg.train.rounds)
    for r in range(1, cfg.train.rounds + 1):
        t0 = time.monotonic()
        content = RecordDict(
            {
                "arrays": numpy_to_arrays(global_arrays),
                "config": ConfigRecord({"server-round": r, "secagg.clip-range": train_range}),
            }
        )
        if steps is not None:
            content["precond"] = numpy_to_arrays({"precond": steps.precond})
        res = protocol.run_round(
            grid, nodes, message_type="train", content=content, server_round=r, min_contributors=min_contributors
        )
        if res.total is None:
            raise RoundFailed(f"round {r}: no contribution")
        if adapter:  # each institution's delta is a step over the public denominator: average them
            update = {k: cfg.train.server_lr * res.total[k] / len(res.contributors) for k in global_arrays}
        else:  # MF deltas are on the scale of a sum over persons: add them
            update = {k: cfg.train.server_lr * res.total[k] for k in global_arrays}
        if r == 1 and steps is not None:
            update = prior_mean_update(update, steps, catalogue, cfg)
        global_arrays = {k: (v + update[k]).astype(np.float32) for k, v in global_arrays.items()}
        record_epsilon(epsilon, res)
        count_releases(releases, institution_names, res.contributors)
        row: dict = {
            "round": r,
            "contributors": len(res.contributors),
            "dropped": res.dropped,
            "refusals": {str(k): v for k, v in res.refusals.items()},
            "epsilon": dict(epsilon),
            "seconds": time.monotonic() - t0,
        }
        if simulate:
            row.update(evaluate_round(grid, nodes, global_arrays, r, steps, hybrid=cfg.train.model == "hybrid"))
        history["rounds"].append(row)
        if results_dir:
            write_json(results_dir / "metrics.json", history)
        progress.update(row)
    progress.close()
    return history


class _Progress:
    """A progress line per round on stderr (rich when available)."""

    def __init__(self, total: int):
        import os

        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("[bold]fedrec[/] round {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
            disable=os.environ.get("FEDREC_NO_PROGRESS") == "1",
        )
        self._task = self._p.add_task("train", total=total, info="")
        self._p.start()

    def update(self, row: dict) -> None:
        parts = []
        for key in ("rmse", "ndcg10"):
            if key in row:
                parts.append(f"{key} {row[key]:.4f}")
        if row["epsilon"]:
            parts.append(f"ε max {max(row['epsilon'].values()):.2f}")
        self._p.update(self._task, advance=1, info="  ".join(parts))

    def close(self) -> None:
        self._p.stop()


