"""Shell text run on every TPU VM worker, and the training run it starts.

Layout on each worker (a TPU VM host): the code in ``~/mllm_jax`` with its virtualenv in
``~/mllm_jax/.venv``; the run's output appended to ``~/mllm_jax_logs/train.log`` and its process
id in ``~/mllm_jax_logs/train.pid``. Each worker writes its own log (one file per worker).

Scripts are single lines (commands joined by ``;``), so that a dry run prints one command a line.

Environment of a run: ``PYTHONUNBUFFERED=1`` (the log file follows the run live) and what the
user adds with ``--env``; nothing for ``jax.distributed``. On a TPU VM, JAX finds the process
index, the process count and the coordinator in the GCE metadata (``agent-worker-number``,
``worker-network-endpoints``); on a multislice queued resource, the TPU runtime puts
``MEGASCALE_COORDINATOR_ADDRESS``, ``MEGASCALE_NUM_SLICES``, ``MEGASCALE_SLICE_ID`` and
``MEGASCALE_PORT`` into each node's ``tpu-env`` metadata, which libtpu and JAX read. Setting them
by hand is only needed for slices created separately, which this launcher does not do.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
from collections.abc import Sequence

REMOTE_DIR = "$HOME/mllm_jax"
REMOTE_ARCHIVE = "mllm_jax.tar.gz"  # relative to the home directory (what scp copies to)
LOG_DIR = "$HOME/mllm_jax_logs"
LOG_FILE = f"{LOG_DIR}/train.log"
PID_FILE = f"{LOG_DIR}/train.pid"
RUN_ENV = (("PYTHONUNBUFFERED", "1"),)
TRAIN_MODULE = "mllm_jax.train"
DCN_OVERRIDE_PREFIX = "--config.mesh.dcn_parallelism."

_OVERRIDE = re.compile(r"^--config\.[A-Za-z_][\w.]*=")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PYTHON = re.compile(r"^python3(\.[0-9]+)?$")
_RUNNING = f'[ -f "{PID_FILE}" ] && kill -0 "$(cat "{PID_FILE}")" 2>/dev/null'


def _script(*commands: str) -> str:
    return "; ".join(("set -e", *commands))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainRun:
    """A ``python -m mllm_jax.train`` run: config (``path[:arg]``), workdir, overrides, env."""

    config: str
    workdir: str
    overrides: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def config_path(self) -> str:
        """The config file, without its ``:arg``."""
        return self.config.split(":", 1)[0]


def parse_env(assignments: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["KEY=VALUE", ...]`` -> pairs; ValueError naming a malformed one."""
    pairs = []
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ValueError(f"--env {assignment!r} is not NAME=VALUE")
        pairs.append((name, value))
    return tuple(pairs)


def validate_train_run(run: TrainRun, repo_root: pathlib.Path) -> None:
    """ValueError unless the config file exists under ``repo_root`` (where workers run it), the
    workdir is set and every override is ``--config.<field>=<value>``."""
    path = pathlib.PurePosixPath(run.config_path)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"config {run.config_path!r}: give a path relative to the repository root "
            "(the workers run it from their copy of the repository), e.g. configs/base.py"
        )
    if not (repo_root / path).is_file():
        raise ValueError(f"config file {run.config_path!r} not found under {repo_root}")
    if not run.workdir.strip():
        raise ValueError("--workdir is empty")
    for override in run.overrides:
        if not _OVERRIDE.match(override):
            raise ValueError(
                f"{override!r}: only --config.<field>=<value> overrides pass through to the "
                "trainer (with '=')"
            )


def train_argv(run: TrainRun, num_slices: int) -> tuple[str, ...]:
    """The trainer's argv on each worker (run in ``REMOTE_DIR``).

    With several slices and no ``--config.mesh.dcn_parallelism.*`` override, the slices become
    the outer factor of the ``data`` axis (``dcn_parallelism.data=num_slices``): the mesh needs
    its DCN sizes to multiply to the slice count, and data parallelism across slices is the one
    that sends the least over the data-centre network.
    """
    argv = [".venv/bin/python", "-m", TRAIN_MODULE, "--config", run.config]
    argv += ["--workdir", run.workdir, *run.overrides]
    if num_slices > 1 and not any(o.startswith(DCN_OVERRIDE_PREFIX) for o in run.overrides):
        argv.append(f"{DCN_OVERRIDE_PREFIX}data={num_slices}")
    return tuple(argv)


def unpack_archive_script() -> str:
    """Unpacks the copied ``git archive`` over ``REMOTE_DIR`` (the venv and runs stay)."""
    return _script(
        f'mkdir -p "{REMOTE_DIR}"',
        f'tar -xzf "$HOME/{REMOTE_ARCHIVE}" -C "{REMOTE_DIR}"',
        f'rm -f "$HOME/{REMOTE_ARCHIVE}"',
    )


def git_checkout_script(remote: str, ref: str) -> str:
    """Fetches ``ref`` (branch, tag or commit) of ``remote`` into ``REMOTE_DIR`` and checks it
    out; works on a fresh VM and over an earlier copy (the venv stays)."""
    return _script(
        f'mkdir -p "{REMOTE_DIR}"',
        f'cd "{REMOTE_DIR}"',
        "[ -d .git ] || git init --quiet",
        "git remote remove origin 2>/dev/null || true",
        f"git remote add origin {shlex.quote(remote)}",
        f"git fetch --quiet --depth=1 origin {shlex.quote(ref)}",
        "git checkout --quiet --force FETCH_HEAD",
        'echo "$(hostname): $(git log -1 --format=%h)"',
    )


def install_script(python: str = "python3.11") -> str:
    """Makes ``REMOTE_DIR/.venv`` with ``python`` (apt-installed if missing: the TPU images are
    Ubuntu 22.04, whose python3 is 3.10 while the project needs 3.11) and installs the
    project with its ``tpu`` extra (jax with libtpu)."""
    if not _PYTHON.match(python):
        raise ValueError(f"--python {python!r}: expected python3 or python3.<minor>")
    return _script(
        f'cd "{REMOTE_DIR}"',
        f"if ! command -v {python} >/dev/null; then sudo apt-get update -qq; "
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {python} {python}-venv; fi",
        f"{python} -m venv .venv",
        ".venv/bin/pip install --quiet --upgrade pip",
        '.venv/bin/pip install --quiet -e ".[tpu]"',
    )


def start_run_script(train: Sequence[str], env: Sequence[tuple[str, str]] = ()) -> str:
    """Starts ``train`` in the background (``nohup``, survives the ssh session) with ``RUN_ENV``
    and ``env``, appending to ``LOG_FILE``; refuses while an earlier run is still going."""
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in (*RUN_ENV, *env))
    return _script(
        f'mkdir -p "{LOG_DIR}"',
        f'cd "{REMOTE_DIR}"',
        f'if {_RUNNING}; then echo "$(hostname): a run is still going (pid $(cat '
        f'"{PID_FILE}")); stop it first" >&2; exit 1; fi',
        f'echo "=== $(date -u +%FT%TZ) start" >> "{LOG_FILE}"',
        f'{assignments} nohup {shlex.join(train)} >> "{LOG_FILE}" 2>&1 < /dev/null '
        f'& echo $! > "{PID_FILE}"',
        f'echo "$(hostname): started pid $(cat "{PID_FILE}"), log {LOG_FILE}"',
    )


def stop_script(signal: str = "TERM") -> str:
    """Sends ``signal`` to the run. TERM is what a preemption sends: the trainer saves a
    checkpoint and exits; KILL stops it at once (the last checkpoint is kept)."""
    if signal not in ("TERM", "KILL"):
        raise ValueError(f"signal {signal!r}: use TERM or KILL")
    return _script(
        f'if {_RUNNING}; then kill -s {signal} "$(cat "{PID_FILE}")"; '
        f'echo "$(hostname): sent {signal} to pid $(cat "{PID_FILE}")"; '
        'else echo "$(hostname): no run going"; fi',
    )


def tail_log_script(lines: int = 100, follow: bool = True) -> str:
    """Prints the last ``lines`` of the worker's log and, with ``follow``, what comes after."""
    if lines < 0:
        raise ValueError(f"lines must be >= 0, got {lines}")
    return f'tail -n {lines}{" -F" if follow else ""} "{LOG_FILE}"'
