"""ProgressBar: ETA from the rate after the first (compiling) step, TTY redraw, log throttling."""

import io

import numpy as np
import pytest

from mllm_jax.train.progress import ProgressBar, format_duration


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _clock(*times):
    """A clock returning ``times`` in order: construction reads the first, each update one more."""
    return iter(times).__next__


def test_eta_and_rate_exclude_the_first_step_which_includes_compilation():
    stream = io.StringIO()
    # Step 1 takes 60 s (compilation), steps 2..11 take 1 s each: the rate is 1 it/s, not 11/70.
    bar = ProgressBar(100, description="train", stream=stream, clock=_clock(0.0, 60.0, 70.0))
    bar.update(1)
    assert bar.steps_per_second is None and bar.eta_seconds is None
    bar.update(11, {"loss": np.float32(2.34567), "tokens": 1024})
    assert bar.steps_per_second == pytest.approx(1.0)
    assert bar.eta_seconds == pytest.approx(89.0)
    assert bar.format_line({"loss": 2.34567, "tokens": 1024}) == (
        "train  11/100  [##..................]   11.0%  elapsed 01:10  ETA 01:29  1.00 it/s"
        "  loss=2.346 tokens=1024"
    )


def test_before_a_second_update_the_rate_and_eta_are_shown_as_unknown():
    stream = io.StringIO()
    bar = ProgressBar(4, stream=stream, clock=_clock(0.0, 5.0))
    bar.update(1)
    assert (
        stream.getvalue()
        == "1/4  [#####...............]   25.0%  elapsed 00:05  ETA --:--  -- it/s\n"
    )


def test_a_resumed_run_shows_the_global_step_and_measures_from_its_first_update():
    stream = io.StringIO()
    bar = ProgressBar(
        1000, initial_step=500, stream=stream, clock=_clock(0.0, 100.0, 104.0), min_interval_s=0
    )
    bar.update(501)
    bar.update(503)
    # 2 steps in 4 s: 2 s per step, 497 steps left.
    assert bar.eta_seconds == pytest.approx(994.0)
    last = stream.getvalue().splitlines()[-1]
    assert last.startswith("503/1000  [##########..........]   50.3%  elapsed 01:44  ETA 16:34")
    assert last.endswith("2.00 s/it")


def test_without_a_terminal_lines_are_printed_at_most_every_interval_and_at_the_end():
    stream = io.StringIO()
    times = [0.0, 1.0, 2.0, 5.0, 11.0, 12.0, 13.0]
    bar = ProgressBar(6, stream=stream, clock=_clock(*times), min_interval_s=10.0)
    for step in range(1, 7):
        bar.update(step)
    printed_steps = [line.split("/")[0] for line in stream.getvalue().splitlines()]
    # Step 1 is the first line, step 4 comes 10 s after it, step 6 is the last step.
    assert printed_steps == ["1", "4", "6"]
    bar.close()
    assert len(stream.getvalue().splitlines()) == 3
    assert "\r" not in stream.getvalue()


def test_close_prints_the_last_update_when_the_run_stops_early():
    stream = io.StringIO()
    bar = ProgressBar(100, stream=stream, clock=_clock(0.0, 1.0, 2.0, 3.0), min_interval_s=60.0)
    for step in (1, 2, 3):
        bar.update(step)
    assert [line.split("/")[0] for line in stream.getvalue().splitlines()] == ["1"]
    bar.close()
    bar.close()
    assert [line.split("/")[0] for line in stream.getvalue().splitlines()] == ["1", "3"]
    with pytest.raises(RuntimeError, match="closed"):
        bar.update(4)


def test_on_a_terminal_every_update_redraws_one_line_in_place():
    stream = _Terminal()
    bar = ProgressBar(10, stream=stream, clock=_clock(0.0, 1.0, 2.0), min_interval_s=60.0)
    bar.update(1, {"a_long_metric_name": 1.0})
    first = bar.format_line({"a_long_metric_name": 1.0})
    bar.update(2)
    second = bar.format_line()
    assert len(second) < len(first)
    assert stream.getvalue() == "\r" + first + "\r" + second.ljust(len(first))
    bar.close()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "00:00"), (59.6, "01:00"), (61, "01:01"), (3600, "1:00:00"), (90061, "25:01:01")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_total_steps_must_be_positive():
    with pytest.raises(ValueError, match="total_steps must be positive"):
        ProgressBar(0, stream=io.StringIO())
