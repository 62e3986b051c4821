"""Shared test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    found = jax.devices()
    assert len(found) == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest.py)"
    return found
