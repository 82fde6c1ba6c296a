# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; on a GPU machine install your CUDA torch first and set TORCH= (empty).
TORCH ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
export SAFEBASIN_CACHE ?= $(CURDIR)/.cache/safebasin

.PHONY: setup demo train test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/safebasin demo

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not multiproc and not realmodel"

bench: setup
	$(PY) benchmarks/kernel_bench.py
	$(PY) benchmarks/anchor_penalty.py
	$(PY) benchmarks/lbfgs.py

clean:
	rm -rf $(VENV) .cache runs mlflow.db mlruns mlartifacts
