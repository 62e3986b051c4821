"""The TPU launcher's subcommands as steps: create, wait, sync, install, run, logs, stop, delete,
and ``up`` (check, create, wait, sync, install, run).

Each function returns ``steps.Step``s of ``gcloud`` (and local ``git``) argvs; ``tools/tpu.py``
prints them (``--dry_run``) or executes them. Steps on the VMs hold one command per node.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shlex
import tempfile

from mllm_jax.launch import tpu_vm, worker_scripts
from mllm_jax.launch.steps import Command, Poll, Step
from mllm_jax.launch.tpu_vm import TpuTarget
from mllm_jax.launch.worker_scripts import TrainRun

NOT_ACTIVE_HINT = "Is the queued resource ACTIVE? (tools/tpu.py wait)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodeSource:
    """Where the workers get the code: ``archive`` (``git archive`` of ``ref`` here, copied to
    every worker) or ``git`` (every worker fetches ``ref`` from ``remote``)."""

    kind: str = "archive"
    ref: str = "HEAD"
    remote: str | None = None

    def __post_init__(self):
        if self.kind not in ("archive", "git"):
            raise ValueError(f"sync {self.kind!r}: use archive or git")
        if self.kind == "git" and not self.remote:
            raise ValueError("sync git needs --git_remote (a URL the TPU VMs can clone)")
        if self.kind == "archive" and self.remote:
            raise ValueError("--git_remote is for --sync=git; archive copies this checkout")
        if not self.ref or self.ref.startswith("-"):
            raise ValueError(f"ref {self.ref!r} is not a git revision")


def _local_archive_path(target: TpuTarget) -> str:
    return str(pathlib.Path(tempfile.gettempdir()) / f"mllm_jax-{target.name}.tar.gz")


def _on_every_node(target: TpuTarget, script: str) -> tuple[Command, ...]:
    return tuple(
        Command(argv=tpu_vm.ssh_command(target, node, script), hint=NOT_ACTIVE_HINT)
        for node in target.node_names
    )


def _delete_hint(target: TpuTarget) -> str:
    where = "".join(f" {flag}" for flag in target.location_flags)
    return (
        f"Details: gcloud compute tpus queued-resources describe {target.name}{where}; "
        f"remove the request with tools/tpu.py delete --name {target.name}{where}"
    )


def create_step(
    target: TpuTarget, accelerator_type: str, *, runtime_version: str | None, spot: bool
) -> Step:
    """Queues the request (returns at once; ``wait`` follows it to ACTIVE)."""
    kind = "spot " if spot else ""
    return Step(
        name="create",
        description=f"queue {target.num_slices} x {kind}{accelerator_type} as {target.name}",
        commands=(
            Command(
                argv=tpu_vm.create_command(
                    target, accelerator_type, runtime_version=runtime_version, spot=spot
                ),
                hint="Check the quota for this accelerator in the zone, and the name is unused",
            ),
        ),
    )


def wait_step(target: TpuTarget, *, timeout_minutes: float, poll_seconds: float) -> Step:
    """Polls the queued resource until ACTIVE; fails on FAILED / SUSPENDED or at the timeout."""
    if timeout_minutes <= 0 or poll_seconds <= 0:
        raise ValueError("timeout_minutes and poll_seconds must be positive")
    return Step(
        name="wait",
        description=(
            f"repeat every {poll_seconds:g} s until the state is ACTIVE "
            f"(stop on {', '.join(sorted(tpu_vm.FAILED_STATES))}; timeout {timeout_minutes:g} min)"
        ),
        commands=(Command(argv=tpu_vm.state_command(target)),),
        poll=Poll(
            target="ACTIVE",
            failed_states=tpu_vm.FAILED_STATES,
            interval_s=poll_seconds,
            timeout_s=timeout_minutes * 60,
            failed_hint=_delete_hint(target),
            timeout_hint=(
                "The request stays queued: wait again (tools/tpu.py wait), or withdraw it "
                f"(tools/tpu.py delete --name {target.name})"
            ),
        ),
    )


def check_step(run: TrainRun, source: CodeSource, repo_root: pathlib.Path) -> Step:
    """Before renting anything: the config is in the revision the archive will ship."""
    in_ref = f"{source.ref}:{run.config_path}"
    return Step(
        name="check",
        description=f"{run.config_path} is committed at {source.ref} (what sync ships)",
        commands=(
            Command(
                argv=("git", "-C", str(repo_root), "cat-file", "-e", in_ref),
                hint=f"sync ships `git archive {source.ref}`: commit {run.config_path} first",
            ),
        ),
    )


def sync_step(target: TpuTarget, source: CodeSource, repo_root: pathlib.Path) -> Step:
    """Puts the code into ``~/mllm_jax`` on every worker of every node."""
    if source.kind == "git":
        return Step(
            name="sync",
            description=f"fetch {source.ref} of {source.remote} on every worker",
            commands=_on_every_node(
                target, worker_scripts.git_checkout_script(source.remote, source.ref)
            ),
        )
    archive = _local_archive_path(target)
    pack = ("git", "-C", str(repo_root), "archive", "--format=tar.gz", f"--output={archive}")
    copies = tuple(
        Command(
            argv=tpu_vm.scp_command(target, node, archive, worker_scripts.REMOTE_ARCHIVE),
            hint=NOT_ACTIVE_HINT,
        )
        for node in target.node_names
    )
    return Step(
        name="sync",
        description=f"git archive {source.ref}, copy it to every worker, unpack it",
        commands=(
            Command(argv=(*pack, source.ref), hint=f"Is {source.ref} a revision of {repo_root}?"),
            *copies,
            *_on_every_node(target, worker_scripts.unpack_archive_script()),
        ),
    )


def install_step(target: TpuTarget, *, python: str) -> Step:
    """A virtualenv with the project and its ``tpu`` extra on every worker."""
    return Step(
        name="install",
        description=f"{python} venv + pip install -e '.[tpu]' on every worker",
        commands=_on_every_node(target, worker_scripts.install_script(python)),
    )


def run_step(target: TpuTarget, run: TrainRun) -> Step:
    """Starts the trainer in the background on every worker of every node."""
    train = worker_scripts.train_argv(run, target.num_slices)
    return Step(
        name="run",
        description=f"start `{shlex.join(train)}` on every worker, log {worker_scripts.LOG_FILE}",
        commands=_on_every_node(target, worker_scripts.start_run_script(train, run.env)),
    )


def logs_step(target: TpuTarget, *, node: int, worker: int, lines: int, follow: bool) -> Step:
    """The log of one worker (``worker`` of slice ``node``), followed until interrupted."""
    if not 0 <= node < target.num_slices:
        raise ValueError(f"node {node} is not a slice index in [0, {target.num_slices})")
    if worker < 0:
        raise ValueError(f"worker must be >= 0, got {worker}")
    name = target.node_names[node]
    return Step(
        name="logs",
        description=f"worker {worker} of {name}" + (" (Ctrl-C stops following)" if follow else ""),
        commands=(
            Command(
                argv=tpu_vm.ssh_command(
                    target, name, worker_scripts.tail_log_script(lines, follow), worker=str(worker)
                ),
                hint="No log yet? The run starts with tools/tpu.py run",
            ),
        ),
    )


def stop_step(target: TpuTarget, *, signal: str) -> Step:
    """Signals the run on every worker (TERM: save a checkpoint and exit)."""
    return Step(
        name="stop",
        description=f"send {signal} to the run on every worker",
        commands=_on_every_node(target, worker_scripts.stop_script(signal)),
    )


def delete_step(target: TpuTarget) -> Step:
    """Deletes the queued resource and its nodes (billing stops)."""
    return Step(
        name="delete",
        description=f"delete queued resource {target.name} and its {target.num_slices} node(s)",
        commands=(Command(argv=tpu_vm.delete_command(target)),),
    )


def up_steps(
    target: TpuTarget,
    *,
    accelerator_type: str,
    runtime_version: str | None,
    spot: bool,
    timeout_minutes: float,
    poll_seconds: float,
    source: CodeSource,
    repo_root: pathlib.Path,
    python: str,
    run: TrainRun,
) -> list[Step]:
    """check (archive only) -> create -> wait -> sync -> install -> run."""
    steps = [check_step(run, source, repo_root)] if source.kind == "archive" else []
    return steps + [
        create_step(target, accelerator_type, runtime_version=runtime_version, spot=spot),
        wait_step(target, timeout_minutes=timeout_minutes, poll_seconds=poll_seconds),
        sync_step(target, source, repo_root),
        install_step(target, python=python),
        run_step(target, run),
    ]
