# Everyday commands; README.md explains them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-setup lint bench broker clean

$(BIN)/stream-fm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
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
