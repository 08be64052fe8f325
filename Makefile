# Two commands on a fresh machine: `make test` and `make reproduce-table1`.
# Every target installs what it needs first (stamp file .venv/.installed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch is installed before the project so that pip never swaps it for another build.
# On this CPU machine torch==2.13.0 is taken from the local wheel; on a GPU machine the same spec
# from PyPI is the CUDA build. Override with e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= quick
DATA ?= synthetic
DATA_ROOT ?=
PYTEST_ARGS ?=

.PHONY: install test lint bench reproduce-table1 demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check datamodules spn lightning_modules experiments tests benchmarks

bench: install
	$(PY) -m benchmarks

reproduce-table1: install
	$(VENV)/bin/mammospn table1 --profile $(PROFILE) --data $(DATA) $(if $(DATA_ROOT),--data-root $(DATA_ROOT),)

demo: install
	$(VENV)/bin/mammospn demo

clean:
	rm -rf $(VENV) build *.egg-info
