"""Keeps a run's console to progress, metrics and results: library INFO chatter is dropped.

Orbax logs a dozen INFO lines per checkpoint save through ``absl.logging`` (one logger, "absl",
for every absl user), and JAX logs its backend probing at INFO. ``quiet_library_logs`` drops
records below WARNING that come from those libraries' source files; their warnings and errors,
and every message of mllm_jax itself, still print.
"""

from __future__ import annotations

import logging

QUIET_PACKAGES = ("/orbax/", "/jax/_src/", "/grain/", "/tensorflow_datasets/")


class LibraryInfoFilter(logging.Filter):
    """Passes WARNING and above, and records not emitted from ``QUIET_PACKAGES`` files."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(package in record.pathname for package in QUIET_PACKAGES)


def quiet_library_logs() -> None:
    """Installs ``LibraryInfoFilter`` on the absl logger and lifts JAX's loggers to WARNING."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, LibraryInfoFilter) for f in absl_logger.filters):
        absl_logger.addFilter(LibraryInfoFilter())
    for name in ("jax", "orbax", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)
