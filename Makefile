# RecMesh developer commands. `make up` and `make test` work from a fresh clone:
# both create .venv and install the project when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up down status test test-fast lint protos protos-check bench chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev,train]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/recmesh up

down: $(STAMP)
	$(BIN)/recmesh down

status: $(STAMP)
	$(BIN)/recmesh status

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy .

protos: $(STAMP)
	$(BIN)/recmesh protos

protos-check: $(STAMP)
	$(BIN)/recmesh protos --check

# Benchmarks: the whole mesh as processes (a small seeded artifact set trained for the run),
# per-stage p50/p99 and end to end at a fixed rate; writes docs/benchmarks.md (~4 minutes).
# Override with BENCH_ARGS, e.g. make bench BENCH_ARGS="--rate 100 --duration 60".
bench: $(STAMP)
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

# Chaos suite: the whole mesh under locust load, one fault at a time (~10 minutes).
# Writes docs/chaos.md, docs/chaos/report.json and docs/chaos/*.png; fails when a bar is missed.
chaos: $(STAMP)
	$(BIN)/python -m chaos

clean:
	rm -rf var
