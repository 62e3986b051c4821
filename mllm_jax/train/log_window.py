"""The steps between two log records, kept on the device until a record is due.

The train loop never waits for the step it just dispatched: it dispatches step after step (JAX
runs ahead asynchronously) and hands each step's metrics, still device arrays, to a
``LogWindow``. The run-ahead is bounded: adding step k waits for step k - ``MAX_STEPS_AHEAD``,
long finished on an accelerator that keeps up, but a cap on the queue of dispatched steps on
XLA:CPU, where a multi-device step with collectives deadlocked with ~64 steps queued (jax
0.10.2). Only when a record is written, a checkpoint is about to be saved, or the run ends does
the window fetch the metrics: that one host sync per window is where the non-finite guard raises
and where step time is measured, as wall time over the window divided by its steps (big_vision
and MaxText time their steps the same way).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mllm_jax.train import mfu as mfu_lib
from mllm_jax.train import step as step_lib

MAX_STEPS_AHEAD = 8
# Step metrics the record summarises over the window itself (or leaves out).
_WINDOW_KEYS = ("loss", "grad_norm", "num_targets", "finite")


class LogWindow:
    """Device metrics, data seconds and example/token counts of the steps since the last record."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._metrics: list[Mapping[str, jax.Array]] = []
        self._data_seconds = 0.0
        self._counts = np.zeros(2)
        self._started = time.perf_counter()

    def __len__(self) -> int:
        return len(self._steps)

    def restart_clock(self) -> None:
        """Starts timing anew (after compilation, evaluation or a save, which are not steps)."""
        self._started = time.perf_counter()

    def add(self, step: int, metrics: Mapping[str, jax.Array], data_seconds: float, counts) -> None:
        """Records step ``step``'s unfetched metrics and the host time its batch took."""
        self._steps.append(step)
        self._metrics.append(metrics)
        self._data_seconds += data_seconds
        self._counts += counts
        if len(self._metrics) > MAX_STEPS_AHEAD:
            jax.block_until_ready(self._metrics[-1 - MAX_STEPS_AHEAD]["loss"])

    def check_finite(self) -> None:
        """Blocks on the window's steps; raises for the first one whose update was skipped.

        Raises:
          FloatingPointError: from ``step.check_finite``, naming the step and parameter paths.
        """
        finite = jax.device_get([m["finite"] for m in self._metrics])
        for step, ok, metrics in zip(self._steps, finite, self._metrics, strict=True):
            if not bool(ok):
                step_lib.check_finite(jax.device_get(metrics), step)

    def record(self, flops_per_step: float | None, peak_flops: float | None) -> dict:
        """The log record of the window (mean loss, rates, MFU) and a fresh, empty window.

        Call ``check_finite`` first; this fetches the last step's metrics and stops the clock.
        """
        last = self._metrics[-1]
        host = jax.device_get({k: v for k, v in last.items() if k != "grads_finite"})
        losses = jax.device_get([m["loss"] for m in self._metrics])
        seconds = time.perf_counter() - self._started
        num_steps = len(self._steps)
        record = {
            "step": self._steps[-1],
            # The mean over the steps since the last record, not one noisy batch.
            "loss": float(np.mean(losses)),
            "grad_norm": float(host["grad_norm"]),
        }
        # Learning rates and the loss function's own metrics (MoE load, FuseMix's τ), last step.
        record |= {k: float(v) for k, v in host.items() if k not in _WINDOW_KEYS}
        if seconds > 0:
            record["step_time_s"] = seconds / num_steps
            record["data_time_s"] = self._data_seconds / num_steps
            record["examples_per_sec"] = self._counts[0] / seconds
            if self._counts[1]:
                record["tokens_per_sec"] = self._counts[1] / seconds
            if flops_per_step:
                record["flops_per_sec"] = flops_per_step * num_steps / seconds
                if peak_flops:
                    record["mfu"] = mfu_lib.model_flops_utilization(
                        flops_per_step, record["step_time_s"], peak_flops
                    )
        self.__init__()
        return record


def window_step_seconds(history: list[dict[str, Any]]) -> float | None:
    """Mean seconds per step over the timed windows of ``history`` (records of ``LogWindow``).

    The run's first record is left out: its one step waits for the device to warm up. ``None``
    when no other window was timed.
    """
    total_steps, total_seconds = 0, 0.0
    for previous, record in zip(history, history[1:], strict=False):
        if "step_time_s" in record:
            length = record["step"] - previous["step"]
            total_steps += length
            total_seconds += length * record["step_time_s"]
    return total_seconds / total_steps if total_steps else None
