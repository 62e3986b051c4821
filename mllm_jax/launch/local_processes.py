"""Running one training command as several ``jax.distributed`` processes on this machine.

A rehearsal of a multi-host run on one host's CPU: process ``i`` of ``N`` runs
``python -m mllm_jax.train <args> --coordinator_address localhost:PORT --num_processes N
--process_id i`` with its own CPU devices; the processes meet at process 0's coordinator and
run their collectives through gloo, exactly as hosts of a pod slice do over their network.

The launcher streams every process's output with a ``[p<i>]`` prefix, forwards SIGTERM and
SIGINT to all of them (they agree on a step, save there and exit 0: ``train/preemption.py``),
and when one process fails it stops the others, which would otherwise wait forever in their
next collective. Its exit status is the first failure's, else 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

# gloo reports every connection it makes (one line per peer, per communicator).
_GLOO_CHATTER = re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def process_command(
    train_args: Sequence[str],
    *,
    process_id: int,
    num_processes: int,
    port: int,
    devices_per_process: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command line of process ``process_id``."""
    command = [python, "-m", "mllm_jax.train", *train_args]
    if devices_per_process is not None:
        command.append(f"--config.mesh.num_cpu_devices={devices_per_process}")
    command += [
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
    ]
    return command


def check_train_args(train_args: Sequence[str]) -> None:
    """Refuses the flags the launcher sets itself (naming them)."""
    owned = ("--coordinator_address", "--num_processes", "--process_id", "--distributed")
    clash = [arg for arg in train_args if arg.split("=")[0] in owned]
    if clash:
        raise ValueError(f"{clash}: set by the launcher for each process; leave them out")


def _pump(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        if _GLOO_CHATTER.match(line):
            continue
        with lock:
            out.write(prefix + line)
            out.flush()


def run_local(
    train_args: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Runs the training command as ``num_processes`` processes; returns the exit status.

    ``env`` (default: this process's) gets ``JAX_PLATFORMS=cpu`` unless it names a platform.
    """
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1")
    check_train_args(train_args)
    port = port or free_port()
    env = dict(os.environ if env is None else env)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    processes = []
    for i in range(num_processes):
        command = process_command(
            train_args,
            process_id=i,
            num_processes=num_processes,
            port=port,
            devices_per_process=devices_per_process,
        )
        processes.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        )
    lock = threading.Lock()
    pumps = [
        threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock), daemon=True)
        for i, p in enumerate(processes)
    ]
    for pump in pumps:
        pump.start()

    def forward(signum, frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = _wait_all(processes, out, lock)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pump in pumps:
            pump.join(timeout=5)
    return status


def _wait_all(processes: list[subprocess.Popen], out: TextIO, lock: threading.Lock) -> int:
    """Waits for every process; the first failure kills the rest. Returns the exit status."""
    remaining = set(range(len(processes)))
    failure = 0
    while remaining:
        for i in sorted(remaining):
            try:
                code = processes[i].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            remaining.discard(i)
            if code != 0 and not failure:
                failure = code
                with lock:
                    out.write(f"process {i} exited with status {code}; stopping the others\n")
                for j in remaining:
                    processes[j].kill()
    return failure
