# Two entry points, each doing all set-up itself: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup tools mlflow-tools demo test lint unit integration faults boundscheck clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# promtool for the tests of deploy/prometheus: apt-get installs Debian's `prometheus` package when
# promtool is missing (without starting its service); does nothing when promtool is on PATH.
# actionlint for the tests of .github/workflows: built with `go install` into the cache's bin/
tools:
	@sh deploy/tools/install-promtool.sh
	@sh deploy/tools/install-actionlint.sh

# an MLflow tracking server for the model-registry tests (and `stream-scorer local-mlflow start`),
# in its own virtualenv under ~/.cache/stream-scorer/mlflow-tools (not the project's: mlflow is no
# dependency of the worker); idempotent
mlflow-tools: $(STAMP)
	@$(BIN)/stream-scorer local-mlflow fetch >/dev/null

# virtualenv, the package, Apache Kafka's broker jars and Apicurio Registry (through Maven, cached
# outside the repo), tools
setup: $(STAMP) tools
	$(BIN)/stream-scorer local-kafka fetch
	$(BIN)/stream-scorer local-registry fetch

# DEMO_ARGS="--format confluent": the same with a local Schema Registry and framed events
demo: setup
	$(BIN)/stream-scorer demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check stream_scorer tests
	$(BIN)/ruff format --check stream_scorer tests
	$(BIN)/mypy stream_scorer tests

# everything: lint, then every tier (unit, integration, faults, boundscheck)
test: setup mlflow-tools lint
	$(BIN)/pytest

# the tiers alone: unit (no server, under a minute), integration (real broker), faults (minutes),
# boundscheck (the numba kernel's tests compiled with bounds checks; no server, slow)
unit: $(STAMP)
	$(BIN)/pytest -m "unit and not boundscheck"

boundscheck: $(STAMP)
	$(BIN)/pytest -m boundscheck

integration: setup mlflow-tools
	$(BIN)/pytest -m "integration and not faults"

faults: setup
	$(BIN)/pytest -m faults

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache models
