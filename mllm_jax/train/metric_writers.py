"""Per-step scalar metrics to a JSON-lines file and to TensorBoard event files.

One ``MetricWriter.write(step, metrics)`` call appends one JSON object ``{"step": step, ...}`` to
``logdir/metrics.jsonl`` and one scalar per key to TensorBoard under ``logdir/tensorboard/``
(written with ``tensorboardX``). The JSONL file is opened in append mode, so a resumed run
continues the file of the run it resumes. A run resumed from the checkpoint at step N passes
``resume_step=N``: the records after step N that the interrupted run wrote are dropped from the
JSONL file, and TensorBoard hides that run's events from step N + 1 on (tensorboardX's
``purge_step``), so every step shows one value.

Non-finite floats are written to JSON as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (strict JSON has no such numbers; ``null`` would lose which one it was), and
``read_jsonl`` turns them back into floats. TensorBoard stores them as float32 NaN/inf.

The JSONL half is written here rather than with a library: the strict-JSON non-finite encoding,
the resume rewrite and ``read_jsonl``'s file:line errors are what callers rely on, and no
installed writer (tensorboardX, clu) provides them.

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
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter

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


def _parsed_lines(path: pathlib.Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line of a JSONL file with its JSON object; errors name the file and line."""
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
            yield line, record


def _drop_records_after(path: pathlib.Path, last_step: int) -> None:
    """Rewrites the JSONL file without the records whose step is after ``last_step``."""
    if not path.exists():
        return
    parsed = list(_parsed_lines(path))
    kept = [line for line, record in parsed if record["step"] <= last_step]
    if len(kept) == len(parsed):
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)
    logger.warning(
        "%s: dropped %d records after step %d, left by the interrupted run",
        path,
        len(parsed) - len(kept),
        last_step,
    )


class MetricWriter:
    """Appends ``{"step": step, **metrics}`` to a JSONL file and scalars to TensorBoard.

    ``resume_step``: the step the run resumes from; later records and events of the interrupted
    run are dropped (JSONL) or hidden (TensorBoard). Use as a context manager or call ``close``.
    Not thread-safe.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        jsonl_name: str = "metrics.jsonl",
        tensorboard: bool = True,
        resume_step: int | None = None,
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
        if resume_step is not None:
            _drop_records_after(self.jsonl_path, resume_step)
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if tensorboard:
            self._events = SummaryWriter(
                str(self.tensorboard_dir),
                purge_step=None if resume_step is None else resume_step + 1,
                # tensorboardX names files by the second only: a writer opened in the same second
                # as the last one would overwrite its file. The suffix keeps them apart, in order.
                filename_suffix=f".{time.time_ns()}",
            )

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
            for key, value in values.items():
                self._events.add_scalar(key, float(value), global_step=step)
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
    return [
        {
            key: _JSON_TO_NON_FINITE.get(value, value) if isinstance(value, str) else value
            for key, value in record.items()
        }
        for _, record in _parsed_lines(pathlib.Path(path))
    ]


def read_run_history(logdir: str | os.PathLike[str], this_run: list[dict]) -> list[dict]:
    """The whole run's records, one per step, from ``logdir/metrics.jsonl``.

    ``this_run`` (``TrainResult.history``) lacks the steps a resumed run did before it resumed;
    it is returned as is when the file does not exist (processes other than 0) or is empty.
    """
    path = pathlib.Path(logdir) / "metrics.jsonl"
    if not path.exists():
        return this_run
    records = {record["step"]: record for record in read_jsonl(path)}
    return [records[step] for step in sorted(records)] or this_run
