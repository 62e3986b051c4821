"""Joining a multi-process run: ``jax.distributed.initialize`` from flags or the TPU VM.

Every process of a run calls ``initialize`` before its first device query. Three cases:

- ``coordinator_address`` given (``tools/launch_local.py`` passes it, or a user on GPU hosts):
  an explicit run of ``num_processes`` processes, this one ``process_id``. On CPU the
  collectives go through gloo, JAX's default.
- ``mode="auto"`` on a Cloud TPU VM (``/dev/accel*`` or ``/dev/vfio`` present): JAX reads the
  host index, host count and coordinator from the VM metadata (and multislice ``MEGASCALE_*``
  settings), so a single-host and a pod slice run the same command.
- otherwise one process: nothing is initialised.

Once initialised, JAX's preemption service watches SIGTERM (see ``train/preemption.py``), and
processes other than 0 log warnings only, so a run's console shows process 0's progress once.
"""

from __future__ import annotations

import glob
import logging

import jax

MODES = ("auto", "on", "off")


def on_tpu_vm() -> bool:
    """Whether this host has TPU chips attached (the device files a Cloud TPU VM exposes)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the run this process belongs to; returns whether ``jax.distributed`` was started.

    ``mode``: ``"auto"`` (explicit flags, else a TPU VM, else single process), ``"on"``
    (always: flags or JAX's cluster auto-detection), ``"off"`` (never).

    Raises:
      ValueError: naming the flag when the explicit settings are incomplete or inconsistent.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}: choose one of {MODES}")
    explicit = (coordinator_address, num_processes, process_id)
    if mode == "off":
        if any(value is not None for value in explicit):
            raise ValueError("--distributed=off contradicts --coordinator_address/--process_id")
        return False
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id as well")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is outside [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif num_processes is not None or process_id is not None:
        raise ValueError("--num_processes/--process_id need --coordinator_address")
    elif mode == "on" or on_tpu_vm():
        jax.distributed.initialize()
    else:
        return False
    if jax.process_index() != 0:
        _quiet_secondary_process()
    logging.info(
        "process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _quiet_secondary_process() -> None:
    """Processes other than 0 keep warnings and errors: process 0 reports the run."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def is_primary() -> bool:
    """Whether this process writes the run's reports (process 0)."""
    return jax.process_index() == 0
