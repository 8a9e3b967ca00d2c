# Two entry points, each doing all set-up itself: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint unit clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# virtualenv, the package, and Apache Kafka's broker jars (through Maven, cached outside the repo)
setup: $(STAMP)
	$(BIN)/stream-scorer local-kafka fetch

demo: setup
	$(BIN)/stream-scorer demo

lint: $(STAMP)
	$(BIN)/ruff check stream_scorer tests
	$(BIN)/ruff format --check stream_scorer tests
	$(BIN)/mypy stream_scorer

test: setup lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache models
