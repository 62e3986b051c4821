"""A ``jax.profiler`` trace of a few chosen training steps, switched on from the config.

``training.profile_start_step = S`` and ``training.profile_num_steps = K`` trace steps S .. S+K-1
into ``<workdir>/profile`` (open it with TensorBoard's profile plugin or Perfetto/XProf). Pick S
past the first steps, which include compilation and warm-up. ``S = 0`` (the default) traces
nothing.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax


class StepProfiler:
    """Starts a trace before step ``start`` and stops it after step ``start + num_steps - 1``."""

    def __init__(self, start: int, num_steps: int, logdir: str | pathlib.Path):
        if start < 0 or (start and num_steps < 1):
            raise ValueError(
                f"training.profile_start_step={start} / profile_num_steps={num_steps}: the start "
                "must be >= 0 (0: no trace) and a trace needs at least one step"
            )
        self.start, self.stop = start, start + num_steps - 1
        self.logdir = pathlib.Path(logdir)
        self._tracing = False

    @classmethod
    def from_config(cls, training_config: Any, logdir: str | pathlib.Path) -> StepProfiler:
        """The profiler of ``training.profile_start_step`` / ``profile_num_steps`` (default off)."""
        return cls(
            int(training_config.get("profile_start_step", 0)),
            int(training_config.get("profile_num_steps", 3)),
            logdir,
        )

    def before_step(self, step: int) -> None:
        """Call before dispatching step ``step`` (1-based)."""
        if self.start and step == self.start and not self._tracing:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self._tracing = True

    def after_step(self, step: int, result: jax.Array) -> None:
        """Call after dispatching step ``step``; ``result`` is one of its outputs, waited on so
        the trace holds the step's device work and not only its dispatch."""
        if self._tracing and step >= self.stop:
            jax.block_until_ready(result)
            self.close()

    def close(self) -> None:
        """Stops a running trace (also when the run ends inside the traced steps)."""
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
            logging.info("profile of steps %d-%d written to %s", self.start, self.stop, self.logdir)
