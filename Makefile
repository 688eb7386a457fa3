# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

# torch is pinned first: that pin takes the local CPU build (a bare `torch` pulls GBs of CUDA).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py --out $(DEMO_DIR)

test: setup
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

lint: setup
	$(PY) -m ruff check src tests benchmarks examples

bench: setup
	$(PY) benchmarks/hypergrad.py

clean:
	rm -rf $(VENV) .pytest_cache runs
