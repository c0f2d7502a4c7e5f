# agentstore — `make run` and `make test` work on a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/agentstore/v1/*.proto)
# The Python client distribution (agentstore-client): stubs, .proto copies, agentstore.client.
PYCLIENT := clients/python
STUBS    := $(PYCLIENT)/src/agentstore/v1
# protoc runs in a venv of its own, pinned to the version whose gencode is the stubs' floor.
PROTOC_ENV   := $(VENV)/protoc
PROTOC_STAMP := $(PROTOC_ENV)/.installed-stamp
# npm packages (protoc-gen-es, connect-es, grpc-js, tsc) for `make clients`, quickstarts, tests/interop.
NODE_STAMP := node_modules/.installed-stamp
# Debian packages for the Go stubs (`make clients`) and for compiling the Go quickstart in tests.
# golang/protobuf 1.5 (not the 1.3 apt would pick for grpc): 1.3 cannot marshal the APIv2 stubs.
GO_DEBS := protoc-gen-go protoc-gen-go-grpc golang-go golang-google-grpc-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev

.PHONY: venv run test test-unit test-integration test-interop lint protos buf-lint buf-breaking clean bench bench-venv bench-peers bench-callgrind bench-profile-claims h2load valgrind node clients go-tools

# The benchmark's own environment (bench/pyproject.toml): the server from this checkout with its
# runtime dependencies only, plus the harness and its tools. Never the service's `dev` extra.
BENCH_VENV  := bench/.venv
BENCH_BIN   := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
# npm ci writes it: Graphile Worker, a queue_peers peer (bench/queue_peers/package-lock.json).
BENCH_NODE  := bench/queue_peers/node_modules/.package-lock.json

$(STAMP): pyproject.toml $(PYCLIENT)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The server was the `agentstore` distribution before the split: drop it from older venvs.
	$(BIN)/python -m pip uninstall --quiet --yes agentstore
	rm -rf src/agentstore.egg-info
	$(BIN)/python -m pip install --quiet -e ./$(PYCLIENT) -e '.[dev]'
	touch $(STAMP)

$(PROTOC_STAMP): $(STAMP) $(PYCLIENT)/requirements-protoc.txt
	$(PYTHON) -m venv $(PROTOC_ENV)
	$(PROTOC_ENV)/bin/python -m pip install --quiet -r $(PYCLIENT)/requirements-protoc.txt
	touch $(PROTOC_STAMP)

venv: $(STAMP) $(PROTOC_STAMP)

$(NODE_STAMP): package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

## node: install the npm packages pinned by package-lock.json into node_modules
node: $(NODE_STAMP)

## go-tools: install Go, protoc-gen-go and protoc-gen-go-grpc from Debian (needs root; CI runs it)
go-tools:
	@if dpkg -s $(GO_DEBS) >/dev/null 2>&1; then \
		echo "go-tools: already installed"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(GO_DEBS); \
	fi

## run: set up the venv and start `agentstore dev` (embedded PostgreSQL + Redis, 127.0.0.1:50051)
run: venv
	$(BIN)/agentstore dev

## test: set up the venv and run the whole suite against real PostgreSQL and Redis
test: venv node
	$(BIN)/pytest

test-unit: venv
	$(BIN)/pytest tests/unit

test-integration: venv
	$(BIN)/pytest tests/integration

## test-interop: Node, TypeScript and Go against a live server; the generated stubs; the quickstarts
test-interop: venv node
	$(BIN)/pytest tests/interop

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
	$(BENCH_BIN)/python -m pip install --quiet -e ./$(PYCLIENT) -e '.[embedded]' -e ./bench
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
	$(BIN)/ruff check src tests bench $(PYCLIENT)/src
	$(BIN)/ruff format --check src tests bench $(PYCLIENT)/src
	$(BIN)/mypy src $(PYCLIENT)/src

buf-lint: venv
	$(BIN)/buf lint

## buf-breaking: check protos/ against the latest v* release tag (README: the contract's promise)
# The tagged tree is extracted with git archive, so this works in clones and worktrees alike.
buf-breaking: venv
	@tag=$$(git tag --list 'v*' --sort=-v:refname | head -n 1); \
	if [ -z "$$tag" ]; then \
		echo "buf-breaking: no v* release tag yet, nothing to compare against"; \
	else \
		echo "buf-breaking: protos/ against $$tag"; \
		against=$$(mktemp -d) && trap 'rm -rf "$$against"' EXIT && \
		git archive "$$tag" buf.yaml protos | tar -x -C "$$against" && \
		$(BIN)/buf breaking --against "$$against"; \
	fi

## protos: regenerate the Python stubs and .pyi files in clients/python/src/agentstore/v1 (and copy the .protos there)
# The mypy plugins come from the dev venv on PATH.
protos: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PROTOC_ENV)/bin/python -m grpc_tools.protoc -I protos \
		--python_out=$(PYCLIENT)/src --grpc_python_out=$(PYCLIENT)/src \
		--mypy_out=$(PYCLIENT)/src --mypy_grpc_out=$(PYCLIENT)/src $(PROTOS)
	rm -f $(STUBS)/*.proto
	cp $(PROTOS) $(STUBS)/

## clients: regenerate the TypeScript (clients/typescript/src/gen) and Go (clients/go) stubs (buf.gen.yaml)
clients: venv node
	rm -rf clients/typescript/src/gen clients/go/agentstore
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" $(BIN)/buf generate
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" $(BIN)/buf generate --template clients/third_party/buf.gen.yaml

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
