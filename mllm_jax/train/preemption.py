"""Turning SIGTERM (the preemption notice of Cloud TPU VMs) into a flag the train loop polls.

The signal handler only sets a flag: checkpointing from inside a handler would run arbitrary
JAX/Orbax code at an arbitrary point of the step. The loop checks ``should_stop`` between
steps, saves a checkpoint at its current step and exits cleanly.

Semantics are single-host: each process sees its own signal. On multi-host runs the processes
must agree on the step at which they stop (the save is a collective); there, poll
``jax.experimental.multihost_utils.reached_preemption_sync_point(step)`` instead, which needs
``jax.distributed.initialize()`` with JAX's preemption service and its own SIGTERM handling.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType


class PreemptionWatcher:
    """Sets ``should_stop`` when one of ``signals`` arrives; ``close`` restores the handlers.

    Use as a context manager around the train loop. Must be created on the main thread (Python
    only delivers signals there).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionWatcher must be created on the main thread")
        self._event = threading.Event()
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._event.set()

    @property
    def should_stop(self) -> bool:
        """Whether a watched signal has arrived since the watcher was installed."""
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
