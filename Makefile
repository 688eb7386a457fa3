# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow test-all lint bench clean

setup: $(STAMP)

# torch is pinned first: that pin takes the local CPU build (a bare `torch` pulls GBs of CUDA).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

# The main job: learn an MLP's per-tensor learning rates on real MNIST while it trains.
demo: setup
	@$(PY) -m bilevel data verify mnist >/dev/null 2>&1 || $(PY) -m bilevel data fetch mnist
	@out=runs/demo-$$(date +%Y%m%d-%H%M%S); \
	$(PY) -m bilevel run mnist_lr/mlp.yaml --out $$out && \
	$(PY) -m bilevel report $$out --out $$out/report && \
	echo "" && echo "results:  $$out/summary.json, $$out/metrics.jsonl (TensorBoard: $$out/tb)" && \
	echo "plots:    $$out/report/curves.png  $$out/report/hyperparameters.png" && \
	echo "table:    $$out/report/summary.md"

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

# Everything, slow tests included; installs Ray Tune for the --engine ray tests.
test-all: setup
	$(PY) -m pip install -q 'ray[tune]'
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -n 2

lint: setup
	$(PY) -m ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/hypergrad.py

clean:
	rm -rf $(VENV) .pytest_cache runs
