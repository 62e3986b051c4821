"""Turning SIGTERM (the preemption notice of Cloud TPU VMs) into a stop the train loop polls.

The loop asks ``stop_at(step)`` after every step; when it says yes the loop saves a checkpoint at
that step and exits cleanly. Nothing JAX or Orbax runs inside a signal handler: a handler only
records that the signal came.

- One process: a Python handler sets a flag; the loop stops at the next step it asks about.
- Several processes (``jax.distributed`` initialised): the signal may reach only one host, yet
  the save is a collective, so every process must stop at the *same* step. JAX's preemption
  service (started by ``jax.distributed.initialize``) catches SIGTERM in whichever process gets
  it, tells the coordinator, and the processes agree on the next step after the furthest one any
  of them reached; ``multihost_utils.reached_preemption_sync_point(step)`` is True exactly there,
  on every process. No Python handler is installed then: it would take the signal away from JAX.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Answers ``stop_at(step)``; ``close`` restores the signal handlers it replaced.

    Must be created on the main thread (Python only delivers signals there). With several
    processes, every process must call ``stop_at`` at every step (JAX's protocol).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionWatcher must be created on the main thread")
        self._event = threading.Event()
        self.received: int | None = None
        self.multi_process = jax.process_count() > 1
        self._previous = {}
        if not self.multi_process:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._event.set()

    def stop_at(self, step: int) -> bool:
        """Whether the run must save and stop after ``step`` (the same answer on every host)."""
        if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
            self._event.set()
        return self._event.is_set()

    @property
    def should_stop(self) -> bool:
        """Whether a stop has been signalled (in this process) or agreed (across processes)."""
        return self._event.is_set()

    def close(self) -> None:
        """Reinstalls the handlers that were in place before this watcher."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
