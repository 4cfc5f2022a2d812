# Everything a fresh machine with Python 3.11+ and make needs: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench openapi clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

## run: a DMQ node on sip:127.0.0.1:5060 (a bus of one) on defaults
run: $(STAMP)
	$(BIN)/dmq-gateway serve $(ARGS)

## lint: ruff (lint + format check) and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy app

## test: lint, then the whole suite (interop tests need the kamailio package)
test: lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## openapi: regenerate openapi/openapi.json and openapi/websocket.json from the code
openapi: $(STAMP)
	$(BIN)/python -m app.api.openapi_export

## bench: the KDMQ throughput benchmark, ours vs Kamailio (needs kamailio and sipp)
bench: $(STAMP)
	$(BIN)/python -m bench.kdmq_throughput

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
