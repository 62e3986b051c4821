"""Shared test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import tempfile

# Tests run on the CPU; libtpu (installed for the AOT tests) must not go probing for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound: XLA:CPU without its LLVM optimisation passes compiles the tests'
# programs 2-3x faster (measured: a scan-vs-unrolled decoder test plus the ViT tests, 74 s -> 33 s)
# and runs their tiny steps about as fast. Numerics are unchanged up to float rounding: every
# tolerance in the suite holds either way. Benchmarks (tools/) run with full optimisation.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    found = jax.devices()
    assert len(found) == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest.py)"
    return found


# One persistent XLA compilation cache per test session: tests that build the same program
# (same model, shapes and mesh) compile it once. Under pytest-xdist (`make test` runs two
# workers) the workers share it, so a module's fixtures compile once whichever worker runs it.
_XDIST_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _XDIST_RUN:
    _CACHE_DIR = os.path.join(tempfile.gettempdir(), f"mllm_jax_xla_cache_{_XDIST_RUN}")
    os.makedirs(_CACHE_DIR, exist_ok=True)
else:
    _CACHE_DIR = tempfile.mkdtemp(prefix="mllm_jax_xla_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
# Derived data (the stdlib corpus) is cached there too, not in the user's ~/.cache; subprocesses
# (CLI tests, multi-process runs) inherit it.
os.environ.setdefault("MLLM_JAX_CACHE_DIR", os.path.join(_CACHE_DIR, "mllm_jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
