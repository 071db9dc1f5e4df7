# deltakit: the two commands a newcomer needs are `make demo` and `make test`.
# Both create the virtual environment first. TORCH picks the PyTorch requirement: users get a normal
# range; CI on a machine with a local CPU wheel pins it (see .ci/run).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch>=2.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One stamp per TORCH requirement: asking for another one installs it, even into an existing .venv.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

.PHONY: demo test test-all lint typecheck check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	rm -f $(VENV)/.torch-*
	touch $(TORCH_STAMP)

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo-output
	$(BIN)/deltakit demo --dir demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "" tests

lint: $(STAMP)
	$(BIN)/ruff check deltakit tests benchmarks
	$(BIN)/ruff format --check deltakit tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/apply.py

clean:
	rm -rf $(VENV) demo-output benchmarks/work build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
