# Two entry points, each doing all set-up itself: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup tools mlflow-tools demo test test-slow test-all lint docs unit integration faults boundscheck clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + "); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# promtool for the tests of deploy/prometheus: apt-get installs Debian's `prometheus` package when
# promtool is missing (without starting its service); does nothing when promtool is on PATH.
# actionlint for the tests of .github/workflows: built with `go install` into the cache's bin/
# podman, runc and mmdebstrap for the image test (tests/integration/test_image.py builds
# deploy/Dockerfile with deploy/tools/build-image.sh and runs it): Debian's packages when missing
# the PostgreSQL server for `local-postgres` and the tests of `sink postgres`: Debian's package
# when no initdb is installed (its own cluster never started)
tools:
	@sh deploy/tools/install-postgres.sh
	@sh deploy/tools/install-promtool.sh
	@sh deploy/tools/install-actionlint.sh
	@sh deploy/tools/install-podman.sh

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

# lint-imports: the package's layers ([tool.importlinter] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check stream_scorer tests
	$(BIN)/ruff format --check stream_scorer tests
	$(BIN)/mypy stream_scorer tests
	$(BIN)/lint-imports

# the manual (docs/mkdocs.yml): its reference pages regenerated from the code, then the site built
# with --strict (a broken link or anchor fails) into build/manual/; nothing is fetched
docs: $(STAMP)
	$(BIN)/python -m stream_scorer.devtools.manual docs/manual/reference
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -f docs/mkdocs.yml

# `make test` (what .ci/run and CI run; about 10 min here): lint; every test but the slow tier and
# the faults on TEST_WORKERS processes (pytest-xdist; a module's tests stay on one worker, each
# worker starts its own broker and registry); the fault suite's kill -9 runs alone (no other test
# may share the CPUs while faults are injected); then the manual (after the tests: `docs`
# rewrites the generated pages, whose freshness a unit test checks as committed).
# `make test-slow`: the slow tier (bounds checks, session and idle timeouts waited out, longer
# variants of faster tests) on TEST_WORKERS processes, then the rest of the fault suite alone
# (broker kill and restarts, whose recovery times it measures, rolling restarts, a zombie,
# fencing, rollouts). `make test-all`: both, every test once.
# --no-loadscope-reorder: files go out in collection order, the integration modules (few tests,
# long fixtures) first and the many short unit modules last to fill in; xdist's default sends the
# files with the most tests first, which left a long integration module running alone at the end.
# A failing (or empty: pytest's exit 5) step fails the target.
# 3 processes on this 2-core machine: the integration tests wait on brokers and timeouts for about
# a third of their time (vmstat: ~30% idle at 2); at 3 the parallel tier took 414 s, at 2 515 s
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
FAST_TESTS := -m "not slow and not boundscheck and not faults"
FAST_FAULTS := -m "faults and not slow"
SLOW_TESTS := -m "(slow or boundscheck) and not faults"
SLOW_FAULTS := -m "faults and slow"
test: setup mlflow-tools lint
	$(BIN)/pytest $(FAST_TESTS) $(XDIST) --durations=25
	$(BIN)/pytest $(FAST_FAULTS) --durations=5
	$(MAKE) --no-print-directory docs

test-slow: setup mlflow-tools
	$(BIN)/pytest $(SLOW_TESTS) $(XDIST) --durations=12
	$(BIN)/pytest $(SLOW_FAULTS) --durations=12

test-all: test test-slow

# the tiers alone: unit (no server, ~3 min on one process), integration (real broker), faults (minutes),
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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache models build/manual
