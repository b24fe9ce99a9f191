"""Reproducibility over SecAgg+ (issue 33): in a simulation, ``sim.noise-seed`` also seeds the
SecAgg+ stochastic rounding (per node, round and slot), so two simulations with the same seed
give identical metrics (two same-seed ``fedrec-sim run`` over SecAgg+:
tests/integration/test_sweep.py::test_two_simulations_with_the_same_seed_give_identical_metrics);
a deployed node keeps the OS CSPRNG (client/secagg_mod.rounding_rng)."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, RecordDict

from fedrec.client.secagg_mod import rounding_rng
from fedrec.common.secagg._quantize import QuantParams, quantize


def _ctx(node_config: dict, seed: int) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={"sim.noise-seed": seed})


SIM = {"partition-id": 1, "num-partitions": 3}
REC = {"round": 2, "slot": 1}


def test_rounding_is_seeded_only_on_a_simulated_node_with_a_seed():
    q = QuantParams(step=0.01, levels=1000, bits=32, bound=10.0)
    x = np.random.default_rng(0).uniform(-1, 1, 5000)
    same = [quantize(x, q, rounding_rng(_ctx(SIM, 5), REC)) for _ in range(2)]
    assert np.array_equal(same[0], same[1])
    other_round = quantize(x, q, rounding_rng(_ctx(SIM, 5), {"round": 3, "slot": 2}))
    other_node = quantize(x, q, rounding_rng(_ctx({**SIM, "partition-id": 2}, 5), REC))
    assert not np.array_equal(same[0], other_round) and not np.array_equal(same[0], other_node)
    # deployment (no partition-id) and seed -1: the CSPRNG, never a derived seed
    assert rounding_rng(_ctx({"data-dir": "/x"}, 5), REC) is None
    assert rounding_rng(_ctx(SIM, -1), REC) is None
    fresh = [quantize(x, q, rounding_rng(_ctx({"data-dir": "/x"}, 5), REC)) for _ in range(2)]
    assert not np.array_equal(fresh[0], fresh[1])
