# fedrec — all set-up on a fresh machine happens through these targets.
PY ?= python3
# a privacy product does not call home: Flower and Ray telemetry off for everything make starts
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast mutants bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	# torch first, pinned: the CPU wheel (a bare requirement may pull a multi-GB CUDA build)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[data,llm,test]"
	touch $(STAMP)

venv: $(STAMP)

## demo: the whole mission on the embedded default (simulations/demo.py) — a simulated health
## federation of 8 institutions: MF under DP over SecAgg+, causal effects with CIs and
## recommendations, each institution's ledger, the audit, results/demo/report.html. Each demo is
## a fresh federation (the command replaces an earlier results/demo): its ledgers start empty.
demo: $(STAMP)
	$(BIN)/fedrec-sim demo --out results/demo

## test: the whole suite (unit, integration with real Flower runs, e2e)
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

## mutants: break the privacy code on purpose (tests/mutation/mutants.toml), each in a scratch
## copy; every mutant must make its named tests fail (also run by `make test`)
mutants: $(STAMP)
	$(BIN)/python tests/mutation/run_mutants.py

## bench: every benchmark, full size, JSON to results/bench/
bench: $(STAMP)
	mkdir -p results/bench
	for b in benchmarks/*.py; do n=$$(basename $$b .py); echo "== $$n"; $(BIN)/python $$b > results/bench/$$n.json || exit 1; done

clean:
	rm -rf $(VENV) results build *.egg-info
