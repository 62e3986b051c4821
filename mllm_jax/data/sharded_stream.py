"""A training stream whose global batches do not depend on how many processes read it.

The global batch is cut into ``num_shards`` data shards: shard ``v`` is its own deterministic
stream (records ``v::num_shards``, shuffled with the run's seed) yielding ``global_batch /
num_shards`` rows per step. The number of shards belongs to the run, not to the machine: process
``p`` of ``P`` reads shards ``[p * V / P, (p + 1) * V / P)`` and concatenates their rows, so for
every ``P`` that divides ``V`` each step trains on the same examples (the processes' local
batches, assembled by ``jax.make_array_from_process_local_data``, tile the same global batch).

``get_state`` gathers every shard's position from every process (a collective: all processes
call it at the same step, as the trainer's checkpoint save does) into one JSON-able dict::

  {"num_shards": V, "shards": [state of shard 0, ..., state of shard V-1]}

and ``set_state`` hands each process the positions of the shards it now owns. So a checkpoint
written by 2 processes resumes on 1 or 4 (any divisor of V) and no example is skipped or read
twice. Resuming keeps the checkpoint's ``V`` whatever the config now says: the shards are the
run's data order. A state without ``num_shards`` (written before shards existed) is one shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils


class ShardIterator(Protocol):
    """One data shard: an endless iterator of host batches with a savable position."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def shards_of_process(num_shards: int, process_index: int, process_count: int) -> range:
    """The shard indices process ``process_index`` of ``process_count`` reads.

    Raises:
      ValueError: when the processes cannot split ``num_shards`` evenly (names the config field).
    """
    if num_shards < 1 or num_shards % process_count:
        raise ValueError(
            f"data.num_data_shards={num_shards} cannot be split over {process_count} processes; "
            "use a multiple of every process count the run will use (e.g. 4 for 1, 2 or 4 hosts)"
        )
    per_process = num_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def allgather_json(local: Any) -> list[Any]:
    """Every process's JSON-able ``local``, in process order (a collective across processes)."""
    if jax.process_count() == 1:
        return [local]
    encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size]))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:length])) for row, length in zip(rows, lengths, strict=True)]


def merge_shard_states(num_shards: int, local_states: Iterable[dict[str, dict]]) -> dict:
    """The global stream state from every process's ``local_state()``.

    Raises:
      ValueError: when the processes' shards do not cover ``0 .. num_shards - 1`` exactly.
    """
    merged: dict[str, dict] = {}
    for states in local_states:
        merged |= states
    if sorted(merged, key=int) != [str(v) for v in range(num_shards)]:
        raise ValueError(f"shard states {sorted(merged, key=int)} do not cover {num_shards} shards")
    return {"num_shards": num_shards, "shards": [merged[str(v)] for v in range(num_shards)]}


def num_data_shards(data_config: Any) -> int:
    """The run's data shard count: ``data.num_data_shards``, or the process count when unset/0."""
    return int(data_config.get("num_data_shards", 0) or jax.process_count())


class ShardedStream:
    """This process's share of ``num_shards`` data shards, with one global, resharding state.

    Args:
      make_shard: ``(shard_index, num_shards) -> ShardIterator`` yielding that shard's rows of
        each global batch (``global_batch // num_shards``); built lazily, for the shards this
        process owns, once the number of shards is known (the config's, or a checkpoint's).
      num_shards: the run's data shard count (``data.num_data_shards``; typically the number of
        processes, or a multiple of every process count the run will be resumed with).
    """

    def __init__(
        self,
        make_shard: Callable[[int, int], ShardIterator],
        num_shards: int,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self._make_shard = make_shard
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        shards_of_process(num_shards, self.process_index, self.process_count)
        self.num_shards = num_shards
        self._shards: dict[int, ShardIterator] | None = None

    def _owned(self) -> dict[int, ShardIterator]:
        if self._shards is None:
            indices = shards_of_process(self.num_shards, self.process_index, self.process_count)
            self._shards = {v: self._make_shard(v, self.num_shards) for v in indices}
        return self._shards

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(shard) for shard in self._owned().values()]
        if len(batches) == 1:
            return batches[0]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    @property
    def num_skipped(self) -> int:
        """Bad records this process's shards skipped (shards without a count add 0)."""
        return sum(getattr(shard, "num_skipped", 0) for shard in self._owned().values())

    def local_state(self) -> dict[str, dict]:
        """The positions of this process's shards: ``{str(shard_index): state}``."""
        return {str(v): shard.get_state() for v, shard in self._owned().items()}

    def get_state(self) -> dict:
        """Every shard's position, gathered from all processes (call on all at once)."""
        return merge_shard_states(self.num_shards, allgather_json(self.local_state()))

    def set_state(self, state: dict) -> None:
        """Continues from ``state`` (``get_state`` of a run with any process count)."""
        if "num_shards" not in state:
            state = {"num_shards": 1, "shards": [state]}
        num_shards = int(state["num_shards"])
        if len(state["shards"]) != num_shards:
            raise ValueError(
                f"data state lists {len(state['shards'])} shard positions for "
                f"num_shards={num_shards}"
            )
        if num_shards != self.num_shards:
            if num_shards % self.process_count:
                raise ValueError(
                    f"the checkpoint's data stream has {num_shards} shards, which "
                    f"{self.process_count} processes cannot split; resume with a process "
                    f"count that divides {num_shards}"
                )
            logging.warning(
                "resuming with the checkpoint's %d data shards (data.num_data_shards=%d is "
                "for new runs)",
                num_shards,
                self.num_shards,
            )
            self.num_shards = num_shards
            self._shards = None
        for v, shard in self._owned().items():
            shard.set_state(state["shards"][v])
