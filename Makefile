# Everything a fresh machine needs (Python 3.11+, node/npm, the package registries).
#   make demo   - set up, then run the demo on a local anvil with the embedded DuckDB
#   make test   - set up, then lint, type-check and run the test suite
#   make setup  - only the set-up: .venv (Python packages), contracts/ and tests/ts/ (npm ci)
#   make bench  - the benchmark scenarios (quick profile); make gas, make compare: see README
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench gas compare clean

setup: $(VENV)/.installed contracts/node_modules/.installed tests/ts/node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

contracts/node_modules/.installed: contracts/package.json contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The official x402 TypeScript client, only for an interoperability test.
tests/ts/node_modules/.installed: tests/ts/package.json tests/ts/package-lock.json
	cd tests/ts && npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: setup
	$(BIN)/x402-engine demo

lint: setup
	$(BIN)/ruff check engine tests benchmarks
	$(BIN)/ruff format --check engine tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/x402-engine bench --quick

gas: setup
	$(BIN)/python -m benchmarks.gas

# x402-engine pay against our service and the official SDK's facilitator on one anvil
compare: setup
	$(BIN)/python -m benchmarks.compare_facilitators

clean:
	rm -rf $(VENV) contracts/node_modules tests/ts/node_modules .pytest_cache .mypy_cache \
		.ruff_cache .hypothesis bench-results
