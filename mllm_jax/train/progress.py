"""A one-line training progress display: steps, bar, percent, elapsed, ETA, rate, metrics.

    train  150/1000  [###.................]   15.0%  elapsed 02:10  ETA 14:10  1.00 it/s  loss=2.345

The step rate, and so the ETA, is measured from the first ``update`` on: the steps before it
include XLA compilation, which would make the early estimate far too pessimistic. Until a second
update arrives the rate and ETA are shown as unknown.

On a terminal the line is redrawn in place with ``'\\r'`` on every update. Elsewhere (CI logs,
files) a full line is printed at most every ``min_interval_s``, on the update that reaches
``total_steps``, and on ``close`` if the last update was not printed yet.

The bar prints on whatever process creates it; multi-host callers create it on process 0 only.
"""

from __future__ import annotations

import io
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

_BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """``MM:SS`` under an hour, ``H:MM:SS`` from one hour on (hours keep counting past 24)."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes:02d}:{secs:02d}"


def _format_rate(steps_per_second: float | None) -> str:
    if steps_per_second is None:
        return "-- it/s"
    if steps_per_second >= 1:
        return f"{steps_per_second:.2f} it/s"
    return f"{1 / steps_per_second:.2f} s/it"


def _format_metric(value: Any) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _terminal_columns(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


class ProgressBar:
    """Progress of a run of ``total_steps`` steps; ``update`` after each step, then ``close``.

    ``step`` passed to ``update`` is the number of steps completed so far (the global step), so a
    run resumed at ``initial_step`` shows its true position. ``clock`` returns seconds and is
    injectable for tests.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        initial_step: int = 0,
        description: str = "",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 30.0,
    ):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.total_steps = total_steps
        self.description = description
        self.min_interval_s = min_interval_s
        self._stream = sys.stderr if stream is None else stream
        self._is_tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._columns = _terminal_columns(self._stream) if self._is_tty else None
        self._clock = clock
        self._start_time = clock()
        self._step = initial_step
        self._now = self._start_time
        self._first_update: tuple[int, float] | None = None
        self._last_print_time: float | None = None
        self._pending_line: str | None = None
        self._drawn_width = 0
        self._closed = False

    @property
    def steps_per_second(self) -> float | None:
        """Steps per second since the first update, or None before the second update."""
        if self._first_update is None:
            return None
        first_step, first_time = self._first_update
        if self._step == first_step or self._now <= first_time:
            return None
        return (self._step - first_step) / (self._now - first_time)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until ``total_steps`` at the measured rate, or None while the rate is unknown."""
        rate = self.steps_per_second
        if not rate:
            return None
        return max(self.total_steps - self._step, 0) / rate

    def format_line(self, metrics: Mapping[str, Any] | None = None) -> str:
        """The progress line for the latest update and ``metrics``."""
        fraction = min(max(self._step / self.total_steps, 0.0), 1.0)
        filled = int(_BAR_WIDTH * fraction)
        eta = self.eta_seconds
        parts = [
            f"{self._step}/{self.total_steps}",
            "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "]",
            f"{100 * fraction:5.1f}%",
            f"elapsed {format_duration(self._now - self._start_time)}",
            f"ETA {'--:--' if eta is None else format_duration(eta)}",
            _format_rate(self.steps_per_second),
        ]
        if self.description:
            parts.insert(0, self.description)
        if metrics:
            parts.append(" ".join(f"{key}={_format_metric(v)}" for key, v in metrics.items()))
        return "  ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Records that ``step`` steps are done and shows the line if it is due."""
        if self._closed:
            raise RuntimeError("ProgressBar is closed")
        self._step = step
        self._now = self._clock()
        if self._first_update is None:
            self._first_update = (step, self._now)
        line = self.format_line(metrics)
        if self._is_tty:
            self._redraw(line)
            return
        due = (
            self._last_print_time is None
            or self._now - self._last_print_time >= self.min_interval_s
            or step >= self.total_steps
        )
        if due:
            self._print(line)
        else:
            self._pending_line = line

    def _redraw(self, line: str) -> None:
        if self._columns is not None:
            line = line[: self._columns - 1]
        self._stream.write("\r" + line.ljust(self._drawn_width))
        self._stream.flush()
        self._drawn_width = len(line)

    def _print(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()
        self._last_print_time = self._now
        self._pending_line = None

    def close(self) -> None:
        """Ends the line on a terminal, or prints the last update if it was not printed."""
        if self._closed:
            return
        self._closed = True
        if self._is_tty and self._drawn_width:
            self._stream.write("\n")
            self._stream.flush()
        elif self._pending_line is not None:
            self._print(self._pending_line)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
