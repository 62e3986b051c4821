"""A one-line training progress display on ``rich.progress``: steps, bar, percent, times, rate.

    train  150/1000 ━━━━━━━━━━━━━━━━━━━━  15% elapsed 0:02:10 ETA 0:14:10 1.00 it/s loss=2.345

The rate, and so the ETA, comes from rich's speed estimate, which measures from the first update
on: the steps before it include XLA compilation and would make the estimate far too pessimistic.
Until a second update arrives the rate and ETA are shown as unknown.

On an interactive terminal rich redraws the line in place. Elsewhere (CI logs, files) rich would
print only once, at the end, so a plain line is printed at most every ``min_interval_s``, on the
update that reaches ``total_steps``, and on ``close`` if the last update was not printed yet.

Only JAX process 0 prints, unless ``enabled`` says otherwise.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

# Log lines are never wrapped: rich would otherwise fit them into 80 columns.
_LOG_LINE_WIDTH = 10_000


class _RateColumn(ProgressColumn):
    """Steps per second, or seconds per step when slower than one step a second."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        if not speed:
            return Text("-- it/s")
        if speed >= 1:
            return Text(f"{speed:.2f} it/s")
        return Text(f"{1 / speed:.2f} s/it")


def _format_metric(value: Any) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class ProgressBar:
    """Progress of a run of ``total_steps`` steps; ``update`` after each step, then ``close``.

    ``step`` passed to ``update`` is the number of steps completed so far (the global step), so a
    run resumed at ``initial_step`` shows its true position. ``clock`` returns seconds and is
    injectable for tests; ``enabled`` defaults to ``jax.process_index() == 0``.
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
        enabled: bool | None = None,
    ):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if enabled is None:
            enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._console = Console(file=stream, stderr=stream is None, quiet=not enabled)
        if not self._console.is_interactive:
            self._console.width = _LOG_LINE_WIDTH
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            MofNCompleteColumn(),
            BarColumn(bar_width=20),
            TaskProgressColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            _RateColumn(),
            TextColumn(
                "{task.fields[metrics]}",
                markup=False,
                table_column=Column(no_wrap=True, overflow="ellipsis"),
            ),
            console=self._console,
            get_time=clock,
            refresh_per_second=2,
            # Never age samples out: rich's sample deque (the last 1000 updates) bounds the window,
            # and the first sample, which includes compilation, only marks the window's start.
            speed_estimate_period=math.inf,
        )
        self._task = self._progress.add_task(
            description, total=total_steps, completed=initial_step, metrics=""
        )
        self._last_print_time: float | None = None
        self._unprinted = False
        self._closed = False
        if self._console.is_interactive:
            self._progress.start()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Records that ``step`` steps are done and shows the line if it is due."""
        if self._closed:
            raise RuntimeError("ProgressBar is closed")
        text = " ".join(f"{key}={_format_metric(v)}" for key, v in (metrics or {}).items())
        self._progress.update(self._task, completed=step, metrics=text)
        if self._console.is_interactive:
            self._progress.refresh()
            return
        now = self._clock()
        if (
            self._last_print_time is None
            or now - self._last_print_time >= self.min_interval_s
            or step >= self.total_steps
        ):
            self._print_line(now)
        else:
            self._unprinted = True

    def _print_line(self, now: float) -> None:
        self._console.print(self._progress)
        self._last_print_time = now
        self._unprinted = False

    def close(self) -> None:
        """Ends the line on a terminal, or prints the last update if it was not printed."""
        if self._closed:
            return
        self._closed = True
        if self._console.is_interactive:
            self._progress.stop()
        elif self._unprinted:
            self._print_line(self._clock())
