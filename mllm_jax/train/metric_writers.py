"""Per-step scalar metrics to a JSON-lines file and to TensorBoard event files.

One ``MetricWriter.write(step, metrics)`` call appends one JSON object ``{"step": step, ...}`` to
``logdir/metrics.jsonl`` and one TensorBoard event with a scalar summary per key under
``logdir/tensorboard/``. The JSONL file is opened in append mode, so a resumed run continues the
file of the run it resumes; steps the crashed run logged after its last checkpoint appear twice.

Non-finite floats are written to JSON as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (strict JSON has no such numbers; ``null`` would lose which one it was), and
``read_jsonl`` turns them back into floats. TensorBoard stores them as float32 NaN/inf.

TensorBoard events are written with ``tensorboard``'s own event-file writer and protos, which work
without TensorFlow installed; ``logdir`` must then be a local path.

Only process 0 writes; on the other processes of a multi-host run every method is a no-op and no
file is created.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

logger = logging.getLogger(__name__)

_NON_FINITE_TO_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_TO_NON_FINITE = {text: float(text) for text in _NON_FINITE_TO_JSON.values()}


def _to_number(key: str, value: Any) -> int | float:
    """A Python int or float from a Python, NumPy or JAX scalar; bools become 0/1."""
    array = np.asarray(value)
    if array.shape != ():
        raise ValueError(f"metric {key!r} must be a scalar, got shape {array.shape}")
    if array.dtype.kind in "biu":
        return int(array)
    if array.dtype.kind == "f":
        return float(array)
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}")


def _json_value(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE_TO_JSON[repr(value)]
    return value


def _drop_incomplete_last_line(path: pathlib.Path) -> None:
    """Truncates a final line without newline: the record a killed process was writing."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
    logger.warning(
        "%s: dropped an incomplete last record (%d bytes) left by an interrupted run",
        path,
        size - keep,
    )


class MetricWriter:
    """Appends ``{"step": step, **metrics}`` to a JSONL file and scalars to TensorBoard.

    Use as a context manager or call ``close``. Not thread-safe.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        jsonl_name: str = "metrics.jsonl",
        tensorboard: bool = True,
    ):
        self.logdir = pathlib.Path(logdir)
        self.jsonl_path = self.logdir / jsonl_name
        self.tensorboard_dir = self.logdir / "tensorboard"
        self.active = jax.process_index() == 0
        self._closed = False
        self._jsonl = None
        self._events = None
        if not self.active:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        _drop_incomplete_last_line(self.jsonl_path)
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if tensorboard:
            self._events = EventFileWriter(str(self.tensorboard_dir))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar ``metrics`` (Python, NumPy or JAX scalars) at ``step``; flushes files."""
        if not self.active:
            return
        if self._closed:
            raise RuntimeError(f"MetricWriter for {self.logdir} is closed")
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step argument, not a metric name")
        step = _to_number("step", step)
        if not isinstance(step, int):
            raise TypeError(f"step must be an integer, got {step!r}")
        values = {key: _to_number(key, value) for key, value in metrics.items()}
        record = {"step": step, **{key: _json_value(value) for key, value in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            summary = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=key, simple_value=float(value))
                    for key, value in values.items()
                ]
            )
            self._events.add_event(
                event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
            )
            self._events.flush()

    def close(self) -> None:
        """Flushes and closes the files; further ``write`` calls raise. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
        if self._events is not None:
            self._events.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file, in file order, with non-finite values as floats.

    Raises ``ValueError`` naming the file and line of a line that is not a JSON object.
    """
    path = pathlib.Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {line!r}")
            records.append(
                {
                    key: _JSON_TO_NON_FINITE.get(value, value) if isinstance(value, str) else value
                    for key, value in record.items()
                }
            )
    return records
