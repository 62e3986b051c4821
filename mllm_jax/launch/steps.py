"""Steps of commands: printed as a shell-pasteable plan, or executed with output streamed.

A step (``create``, ``sync``, ...) is a list of argv commands run in order. A polling step runs
its single command until its output names a target state. Execution stops at the first command
that fails and raises ``LaunchError`` naming the step, the command and what to check.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO


class LaunchError(RuntimeError):
    """A launch step failed; the message names the step, the command and what to check."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
    """One argv to execute; ``hint`` is added to the error when it fails."""

    argv: tuple[str, ...]
    hint: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Poll:
    """How a polling step reads its command's output (one state name, e.g. ``ACTIVE``)."""

    target: str
    failed_states: frozenset[str]
    interval_s: float
    timeout_s: float
    failed_hint: str
    timeout_hint: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step:
    """A named group of commands; with ``poll`` it is one command repeated until done."""

    name: str
    description: str
    commands: tuple[Command, ...]
    poll: Poll | None = None


def format_plan(steps: Sequence[Step]) -> str:
    """The steps as text: a ``# name: description`` line, then one shell-quoted command a line."""
    lines = []
    for step in steps:
        lines.append(f"# {step.name}: {step.description}")
        lines.extend(shlex.join(command.argv) for command in step.commands)
    return "\n".join(lines)


def _failure(step: Step, command: Command, detail: str) -> LaunchError:
    message = f"step '{step.name}' failed: `{shlex.join(command.argv)}` {detail}"
    return LaunchError(f"{message}. {command.hint}" if command.hint else message)


def _run_one(step: Step, command: Command, run: Callable[..., subprocess.CompletedProcess]):
    try:
        done = run(list(command.argv), check=False)
    except FileNotFoundError as error:
        raise _failure(step, command, f"could not start ({error})") from error
    if done.returncode != 0:
        raise _failure(step, command, f"exited with status {done.returncode}")


def _poll(
    step: Step,
    run: Callable[..., subprocess.CompletedProcess],
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    out: TextIO,
) -> None:
    (command,) = step.commands
    poll = step.poll
    start, last_state = clock(), None
    while True:
        done = run(list(command.argv), check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise _failure(
                step, command, f"exited with status {done.returncode}: {done.stderr.strip()}"
            )
        state = done.stdout.strip() or "(no state yet)"
        elapsed = clock() - start
        if state != last_state:
            print(f"[{step.name}] {elapsed:6.0f} s: {state}", file=out, flush=True)
            last_state = state
        if state == poll.target:
            return
        if state in poll.failed_states:
            raise LaunchError(f"step '{step.name}': the state is {state}. {poll.failed_hint}")
        if elapsed + poll.interval_s > poll.timeout_s:
            raise LaunchError(
                f"step '{step.name}': still {state} after {elapsed:.0f} s "
                f"(timeout {poll.timeout_s:.0f} s). {poll.timeout_hint}"
            )
        sleep(poll.interval_s)


def execute(
    steps: Sequence[Step],
    *,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    out: TextIO = sys.stdout,
) -> None:
    """Runs the steps in order, streaming each command's output; raises ``LaunchError``.

    ``run``, ``sleep`` and ``clock`` stand in for ``subprocess.run`` and time in tests.
    """
    for step in steps:
        print(f"==> {step.name}: {step.description}", file=out, flush=True)
        if step.poll is not None:
            _poll(step, run, sleep, clock, out)
            continue
        for command in step.commands:
            print(f"$ {shlex.join(command.argv)}", file=out, flush=True)
            _run_one(step, command, run)
