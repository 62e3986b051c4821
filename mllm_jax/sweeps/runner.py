"""Runs a sweep's points one after another, each as ``python -m mllm_jax.train`` in a new process.

Point ``NAME`` runs in ``<sweep workdir>/NAME``:

    python -m mllm_jax.train --config FILE:ARG --config.key=value ... --workdir <sweep>/NAME

and the runner adds ``train.log`` (the job's stdout and stderr) and ``sweep_point.json`` (config,
overrides, command, exit code, seconds) there. A point whose ``results.json`` exists is skipped,
so a rerun continues an interrupted or partly failed sweep. The job inherits the runner's
environment (LD_PRELOAD, XLA_FLAGS, JAX_COMPILATION_CACHE_DIR, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import ml_collections
from absl import flags

from mllm_jax.json_files import read_json
from mllm_jax.sweeps.definition import Sweep
from mllm_jax.sweeps.overrides import (
    apply_overrides,
    check_command_line,
    flag_arguments,
    load_config,
)
from mllm_jax.sweeps.points import Point, point_names

TRAIN_LAUNCHER = (sys.executable, "-m", "mllm_jax.train")
RESULTS_FILE = "results.json"
RECORD_FILE = "sweep_point.json"
LOG_FILE = "train.log"
_FAILURE_TAIL_LINES = 20


@dataclasses.dataclass(frozen=True)
class PlannedPoint:
    """A point with its workdir name, workdir and the command that trains it."""

    name: str
    point: Point
    directory: pathlib.Path
    command: tuple[str, ...]

    @property
    def shell_command(self) -> str:
        return shlex.join(self.command)


def plan_sweep(
    sweep: Sweep, workdir: str | os.PathLike[str], launcher: Sequence[str] = TRAIN_LAUNCHER
) -> list[PlannedPoint]:
    """Names, workdirs and commands of all points of ``sweep``.

    Every point's config is loaded and its overrides applied (``apply_overrides``) and parsed
    from its command line (``check_command_line``) first, so a bad override in the last point
    stops the sweep before the first point trains.
    """
    planned = []
    for name, point in zip(point_names(sweep.points), sweep.points, strict=True):
        where = f"sweep point {name!r} ({point.config})"
        try:
            config = load_config(point.config)
        except (OSError, ValueError, TypeError, flags.Error) as err:
            # config_flags puts the whole traceback in the message; its last line is the error.
            reason = str(err).strip().splitlines()[-1]
            raise ValueError(f"{where}: cannot load the config: {reason}") from err
        if not isinstance(config, ml_collections.ConfigDict):
            raise TypeError(f"{where}: get_config returned {type(config).__name__}")
        expected = apply_overrides(config, point.overrides, where=where)
        check_command_line(point.config, point.overrides, expected, where=where)
        directory = pathlib.Path(workdir) / name
        command = (
            *launcher,
            "--config",
            point.config,
            *flag_arguments(point.overrides),
            "--workdir",
            str(directory),
        )
        planned.append(PlannedPoint(name, point, directory, command))
    return planned


def read_record(directory: pathlib.Path) -> dict | None:
    """The point's ``sweep_point.json``, or None when it has none."""
    path = directory / RECORD_FILE
    return read_json(path) if path.exists() else None


def point_status(directory: pathlib.Path) -> str:
    """``done`` (results.json exists), ``failed (exit N)``, ``failed (no results.json)``,
    ``interrupted`` (started, never finished) or ``not run``, from the files in ``directory``."""
    if (directory / RESULTS_FILE).exists():
        return "done"
    record = read_record(directory)
    if record is None:
        return "not run"
    if record["returncode"] is None:
        return "interrupted"
    if record["returncode"]:
        return f"failed (exit {record['returncode']})"
    return "failed (no results.json)"


def _write_record(directory: pathlib.Path, record: dict) -> None:
    (directory / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def run_point(
    planned: PlannedPoint, *, echo: bool = False, env: Mapping[str, str] | None = None
) -> int:
    """Runs the point's command to completion; returns its exit code.

    Output goes to ``train.log`` (and to stdout with ``echo``); ``sweep_point.json`` is written
    before the job starts and again with its exit code and seconds.
    """
    planned.directory.mkdir(parents=True, exist_ok=True)
    record = {
        "name": planned.name,
        "config": planned.point.config,
        "overrides": dict(planned.point.overrides),
        "command": planned.shell_command,
        "returncode": None,
        "seconds": None,
    }
    _write_record(planned.directory, record)
    started = time.monotonic()
    with (
        (planned.directory / LOG_FILE).open("w") as log,
        subprocess.Popen(
            planned.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=None if env is None else dict(env),
        ) as process,
    ):
        for line in process.stdout:
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
    record |= {"returncode": process.returncode, "seconds": time.monotonic() - started}
    _write_record(planned.directory, record)
    return process.returncode


def _log_tail(directory: pathlib.Path) -> str:
    lines = (directory / LOG_FILE).read_text(errors="replace").splitlines()
    return "\n".join(lines[-_FAILURE_TAIL_LINES:])


def run_sweep(
    planned: Sequence[PlannedPoint],
    *,
    keep_going: bool = False,
    echo: bool = False,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Runs the points in order, skipping those with results; returns each point's status.

    Statuses: ``skipped (results exist)``, ``done``, ``failed (...)`` and, for the points after a
    failure when not ``keep_going``, ``not run``.
    """
    statuses: dict[str, str] = {}
    stopped = False
    for index, item in enumerate(planned, 1):
        label = f"[{index}/{len(planned)}] {item.name}"
        if (item.directory / RESULTS_FILE).exists():
            statuses[item.name] = "skipped (results exist)"
            logging.info("%s: skipped (results exist)", label)
            record = read_record(item.directory)
            if record is not None and record["command"] != item.shell_command:
                logging.warning(
                    "%s: its results came from another command:\n  %s", label, record["command"]
                )
            continue
        if stopped:
            statuses[item.name] = "not run"
            continue
        log_path = item.directory / LOG_FILE
        logging.info("%s: running (log: %s)\n  %s", label, log_path, item.shell_command)
        run_point(item, echo=echo, env=env)
        status = point_status(item.directory)
        statuses[item.name] = status
        seconds = read_record(item.directory)["seconds"]
        if status == "done":
            logging.info("%s: done in %.0f s", label, seconds)
            continue
        logging.error(
            "%s: %s after %.0f s; last lines of %s:\n%s",
            label,
            status,
            seconds,
            log_path,
            _log_tail(item.directory),
        )
        stopped = not keep_going
    return statuses


def pending_commands(planned: Sequence[PlannedPoint]) -> list[str]:
    """Shell commands of the points without ``results.json``, for dispatching elsewhere."""
    return [item.shell_command for item in planned if not (item.directory / RESULTS_FILE).exists()]
