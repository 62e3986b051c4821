"""ProgressBar: ETA from the rate after the first (compiling) step, TTY redraw, log throttling."""

import io
import re

import jax
import numpy as np
import pytest

from mllm_jax.train.progress import ProgressBar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Clock:
    """A clock the test sets by hand: rich reads it whenever it renders, not once per update."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _lines(stream):
    return stream.getvalue().splitlines()


def _printed_steps(stream):
    return [int(re.search(r"(\d+)/\d+", line).group(1)) for line in _lines(stream)]


def test_eta_and_rate_exclude_the_first_step_which_includes_compilation():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(100, description="train", stream=stream, clock=clock, min_interval_s=0)
    # Step 1 takes 60 s (compilation), steps 2..11 take 1 s each: the rate is 1 it/s, not 11/70.
    clock.now = 60.0
    bar.update(1)
    clock.now = 70.0
    bar.update(11, {"loss": np.float32(2.34567), "tokens": 1024})
    last = _lines(stream)[-1]
    assert re.match(r"train +11/100 ", last)
    assert "11% elapsed 0:01:10 ETA 0:01:29 1.00 it/s loss=2.346 tokens=1024" in last


def test_before_a_second_update_the_rate_and_eta_are_shown_as_unknown():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(4, stream=stream, clock=clock)
    clock.now = 5.0
    bar.update(1)
    (line,) = _lines(stream)
    assert re.search(r"1/4 .* 25% elapsed 0:00:05 ETA -:--:-- -- it/s", line)


def test_a_resumed_run_shows_the_global_step_and_measures_from_its_first_update():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(1000, initial_step=500, stream=stream, clock=clock, min_interval_s=0)
    clock.now = 100.0
    bar.update(501)
    clock.now = 180.0
    bar.update(503)
    # 2 steps in 80 s: 40 s per step (slower than rich's default 30 s window), 497 steps left.
    assert re.search(r"503/1000 .* 50% elapsed 0:03:00 ETA 5:31:20 40.00 s/it", _lines(stream)[-1])


def test_without_a_terminal_lines_are_printed_at_most_every_interval_and_at_the_end():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(6, stream=stream, clock=clock, min_interval_s=10.0)
    for step, now in zip(range(1, 7), [1.0, 2.0, 5.0, 11.0, 12.0, 13.0], strict=True):
        clock.now = now
        bar.update(step)
    # Step 1 is the first line, step 4 comes 10 s after it, step 6 is the last step.
    assert _printed_steps(stream) == [1, 4, 6]
    bar.close()
    assert _printed_steps(stream) == [1, 4, 6]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_log_lines_are_not_wrapped_to_80_columns():
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, clock=_Clock())
    metrics = {f"metric_with_a_long_name_{i}": i for i in range(6)}
    bar.update(1, metrics)
    (line,) = _lines(stream)
    assert line.rstrip().endswith("metric_with_a_long_name_5=5") and len(line) > 160


def test_close_prints_the_last_update_when_the_run_stops_early():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(100, stream=stream, clock=clock, min_interval_s=60.0)
    for step in (1, 2, 3):
        clock.now = float(step)
        bar.update(step)
    assert _printed_steps(stream) == [1]
    bar.close()
    bar.close()
    assert _printed_steps(stream) == [1, 3]
    with pytest.raises(RuntimeError, match="closed"):
        bar.update(4)


def test_on_a_terminal_updates_redraw_one_line_in_place(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    stream, clock = _Terminal(), _Clock()
    bar = ProgressBar(10, description="train", stream=stream, clock=clock, min_interval_s=60.0)
    for step in range(1, 11):
        clock.now = float(step)
        bar.update(step, {"loss": 1 / step})
    bar.close()
    output = stream.getvalue()
    assert output.count("\n") == 1 and output.count("\r") >= 10
    last_drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.split("\r")[-1])
    assert re.match(
        r"train 10/10 .* 100% elapsed 0:00:10 ETA 0:00:00 1.00 it/s loss=0.1\n$", last_drawn
    )


def test_only_process_zero_prints_by_default(monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    stream = io.StringIO()
    bar = ProgressBar(2, stream=stream, clock=_Clock())
    bar.update(1)
    bar.update(2)
    bar.close()
    assert stream.getvalue() == ""
    bar = ProgressBar(2, stream=stream, clock=_Clock(), enabled=True)
    bar.update(2)
    assert _printed_steps(stream) == [2]


def test_total_steps_must_be_positive():
    with pytest.raises(ValueError, match="total_steps must be positive"):
        ProgressBar(0, stream=io.StringIO())
