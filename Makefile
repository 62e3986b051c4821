# Two entry points: `make demo` (the main job) and `make test` (the suite). Both create .venv
# and install the project into it on first use (and again when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo
# A jemalloc that keeps freed pages removes most page-fault overhead of XLA on CPU
# (see docs/performance.md); used only when the system has it.
, := ,
JEMALLOC := $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2)
RUN_ENV := $(if $(JEMALLOC),LD_PRELOAD=$(JEMALLOC) MALLOC_CONF=oversize_threshold:0$(,)dirty_decay_ms:-1$(,)muzzy_decay_ms:-1$(,)retain:true)

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(RUN_ENV) $(PY) -m mllm_jax.train --config configs/base.py:size=tiny --workdir $(WORKDIR)

test: $(STAMP)
	$(RUN_ENV) $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) workdirs .pytest_cache
