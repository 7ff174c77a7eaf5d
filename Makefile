# Two commands for a fresh machine with only Python and pip:
#   make test   creates .venv, installs eco_optax with its test extras, runs the whole suite
#               (a plain `pytest` skips the tests marked slow)
#   make demo   creates .venv, installs, runs the benchmark (python -m benchmarks)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: install test test-min demo step clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n 2 --dist worksteal -q -m 'slow or not slow'

# The suite at the lower bounds of pyproject.toml (run before each release; about 10 minutes).
test-min:
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install --upgrade pip
	.venv-min/bin/python -m pip install $$($(PYTHON) .ci/min_requirements.py) -e ".[dev]"
	XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv-min/bin/python -m pytest -n 2 --dist worksteal -q -m 'slow or not slow'

demo: install
	$(BIN)/python -m benchmarks $(DEMO_ARGS)

step: install
	$(BIN)/python -m benchmarks.step

clean:
	rm -rf $(VENV) .venv-min results .pytest_cache
