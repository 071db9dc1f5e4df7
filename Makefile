# deltakit: the two commands a newcomer needs are `make demo` and `make test`.
# Both create the virtual environment first. TORCH picks the PyTorch requirement and TORCH_INDEX where
# it comes from: users get a normal range of CPU builds; CI on a machine with a local CPU wheel pins it
# and uses only its configured index (see .ci/run).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch>=2.1
# auto: a CPU build pip already has (find-links), else PyTorch's CPU index if it answers within a few
# seconds, else the configured index, said aloud (on Linux PyPI's torch bundles CUDA: gigabytes). An
# index URL adds that index (for one CUDA version, https://download.pytorch.org/whl/cu128); empty:
# the configured index alone. tools/install_torch.py chooses and says what it chose.
TORCH_INDEX ?= auto
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One stamp per torch requirement and index: asking for another one installs it, even into an existing .venv.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH) $(TORCH_INDEX)' | cksum | cut -d' ' -f1)

.PHONY: demo test test-all test-slow lint typecheck check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/python tools/install_torch.py --requirement "$(TORCH)" --index "$(TORCH_INDEX)"
	rm -f $(VENV)/.torch-*
	touch $(TORCH_STAMP)

$(STAMP): pyproject.toml $(TORCH_STAMP)
	@# this project's distribution was named "deltakit" before 0.2: one import package, one installer
	$(BIN)/python -m pip uninstall --quiet --yes deltakit 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo-output
	$(BIN)/deltakit demo --dir demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "" tests

# the slow tests alone (the GGUF tests against llama.cpp build it once, a few minutes, then reuse it)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow tests

lint: $(STAMP)
	$(BIN)/ruff check deltakit service tests benchmarks tools
	$(BIN)/ruff format --check deltakit service tests benchmarks tools

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
	$(BIN)/python benchmarks/hub_bytes.py
	$(BIN)/python benchmarks/to_gguf.py
	$(BIN)/python benchmarks/ray_apply.py

clean:
	rm -rf $(VENV) demo-output benchmarks/work build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
