"""The runner with a stand-in train program: skipping points with results, failures (stop or keep
going, recorded in the table), the environment passed through, dry-run commands."""

import json
import logging
import pathlib
import sys

import pytest

from mllm_jax.sweeps.aggregate import collect_results
from mllm_jax.sweeps.definition import Sweep
from mllm_jax.sweeps.points import Point
from mllm_jax.sweeps.runner import pending_commands, plan_sweep, run_sweep

FAKE_TRAIN = (sys.executable, str(pathlib.Path(__file__).with_name("fake_train.py")))
CONFIG = "configs/base.py:size=test"


def _plan(workdir, seeds, launcher=FAKE_TRAIN):
    sweep = Sweep([Point(CONFIG, {"seed": seed}) for seed in seeds])
    return plan_sweep(sweep, workdir, launcher)


def _launches(workdir) -> list[str]:
    path = workdir / "launches.txt"
    return path.read_text().split() if path.exists() else []


def test_points_with_results_are_skipped_and_the_rest_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SWEEP_TEST_MARKER", "inherited")
    planned = _plan(tmp_path, [0, 1])
    planned[0].directory.mkdir(parents=True)
    (planned[0].directory / "results.json").write_text('{"loss": 99.0}')

    with caplog.at_level(logging.INFO):
        statuses = run_sweep(planned)

    assert statuses == {"seed=0": "skipped (results exist)", "seed=1": "done"}
    assert "[1/2] seed=0: skipped (results exist)" in caplog.text
    assert _launches(tmp_path) == ["seed=1"]
    assert json.loads((planned[0].directory / "results.json").read_text()) == {"loss": 99.0}
    ran = json.loads((planned[1].directory / "results.json").read_text())
    assert ran["loss"] == 2.0 and ran["marker"] == "inherited"
    record = json.loads((planned[1].directory / "sweep_point.json").read_text())
    assert record["returncode"] == 0 and record["overrides"] == {"seed": 1}
    assert record["command"] == planned[1].shell_command
    assert "--config.seed=1" in planned[1].command

    assert pending_commands(planned) == []
    assert run_sweep(planned) == {name: "skipped (results exist)" for name in statuses}
    assert _launches(tmp_path) == ["seed=1"]


def test_results_from_another_command_are_kept_with_a_warning(tmp_path, caplog):
    run_sweep(_plan(tmp_path, [0]))
    changed = _plan(tmp_path, [0], launcher=(*FAKE_TRAIN, "--extra"))
    with caplog.at_level(logging.INFO):
        assert run_sweep(changed) == {"seed=0": "skipped (results exist)"}
    assert "its results came from another command" in caplog.text


@pytest.mark.parametrize("keep_going", [False, True])
def test_a_failed_point_is_recorded_and_stops_the_sweep_unless_keep_going(
    tmp_path, keep_going, caplog
):
    planned = _plan(tmp_path, [13, 1])
    with caplog.at_level(logging.INFO):
        statuses = run_sweep(planned, keep_going=keep_going)

    assert statuses["seed=13"] == "failed (exit 3)"
    assert statuses["seed=1"] == ("done" if keep_going else "not run")
    assert "fake failure: unlucky seed" in caplog.text  # the log's tail is shown
    assert "fake failure" in (planned[0].directory / "train.log").read_text()
    rows = {row.name: row for row in collect_results(planned)}
    assert rows["seed=13"].status == "failed (exit 3)" and rows["seed=13"].metrics == {}
    assert rows["seed=1"].status == ("done" if keep_going else "not run")
    if keep_going:
        assert rows["seed=1"].metrics == {"loss": 2.0, "eval/accuracy": 0.5}


def test_dry_run_commands_are_those_of_the_points_without_results(tmp_path):
    planned = _plan(tmp_path, [0, 1, 2])
    planned[1].directory.mkdir(parents=True)
    (planned[1].directory / "results.json").write_text("{}")
    commands = pending_commands(planned)
    assert commands == [planned[0].shell_command, planned[2].shell_command]
    assert commands[0].endswith(f"--config {CONFIG} --config.seed=0 --workdir {tmp_path}/seed=0")
    assert _launches(tmp_path) == []
