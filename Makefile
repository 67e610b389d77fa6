# Everyday commands; README.md explains them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-setup test-repeat kill9-rounds lint bench broker clean

$(BIN)/stream-fm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	# Compile the kernels into numba's cache now, so the first replay or worker does not.
	$(BIN)/stream-fm compile
	touch $@

install: $(BIN)/stream-fm

demo: install
	$(BIN)/stream-fm demo

# What the tests need beyond Python (Debian packages, the Kafka jars, deploy/ validators).
test-setup: install
	scripts/setup-tests
	$(BIN)/python -m stream_fm.tools.broker --fetch-only

test: test-setup
	$(BIN)/python -m pytest

# The flake budget: the integration and fault suites N times in one run (make test-repeat N=5).
N ?= 5
test-repeat: test-setup
	$(BIN)/python -m pytest tests/integration --repeat $(N)

# The kill -9 scenario N rounds per client, a new seed each round (make kill9-rounds N=30).
kill9-rounds: test-setup
	$(BIN)/python -m pytest -s tests/integration/test_faults.py -k test_1_kill9_at_20 --repeat $(N)

lint: install
	$(BIN)/ruff check stream_fm tests
	$(BIN)/ruff format --check stream_fm tests
	$(BIN)/mypy

bench: install
	$(BIN)/stream-fm bench --json bench-results.json

broker: install
	$(BIN)/python -m stream_fm.tools.broker

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache checkpoints
