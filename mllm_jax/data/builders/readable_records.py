"""A prepared split's records, checked to be readable: a damaged ArrayRecord file is named.

A truncated shard reads back as empty records (TFDS then fails deep in feature decoding with
``'NoneType' object ...``) and a shard with overwritten bytes fails with a Riegeli hash error
that names no file. ``readable_records`` compares every shard's record count with the build's
``dataset_info.json`` before anything reads it, and ``ReadableRecords`` turns a read error into
one naming the shard, the record's index and what to do.
"""

from __future__ import annotations

import dataclasses
import operator
import pathlib
from collections.abc import Sequence
from typing import Any

from array_record.python import array_record_module

from mllm_jax.data.builders.builder_base import OfflineBuilder


class UnreadableShardError(ValueError):
    """A shard file of a prepared dataset that cannot be read as it was written."""


@dataclasses.dataclass(frozen=True)
class _Shard:
    path: str
    first: int  # index of the split's first record in this shard
    count: int


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _rebuild_hint(builder: OfflineBuilder) -> str:
    return f"delete {builder.data_dir} and build it again (mllm-prepare-data)"


def _shards(builder: OfflineBuilder, split: str) -> list[_Shard]:
    shards, first = [], 0
    for instruction in builder.info.splits[split].file_instructions:
        shards.append(_Shard(str(instruction.filename), first, instruction.take))
        first += instruction.take
    return shards


def check_shards(builder: OfflineBuilder, split: str) -> None:
    """Raises UnreadableShardError naming a shard of ``split`` that is missing or holds fewer
    or more records than the build wrote (reads each shard's footer, not its records)."""
    for instruction in builder.info.splits[split].file_instructions:
        path = pathlib.Path(instruction.filename)
        if not path.is_file():
            raise UnreadableShardError(
                f"shard {path} of {builder.name}/{split} is missing; {_rebuild_hint(builder)}"
            )
        try:
            reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
            found = reader.num_records()
            reader.close()  # raises for a file whose footer or index is damaged
            problem = f"holds {found} readable records, {instruction.examples_in_shard} written"
        except (RuntimeError, ValueError, OSError) as err:
            found, problem = None, f"cannot be opened ({_describe(err)})"
        if found != instruction.examples_in_shard:
            raise UnreadableShardError(
                f"shard {path} of {builder.name}/{split} {problem}: a truncated or damaged "
                f"file; {_rebuild_hint(builder)}"
            )


class ReadableRecords(Sequence):
    """``builder.as_data_source(split)`` whose read errors name the shard (picklable)."""

    def __init__(self, builder: OfflineBuilder, split: str):
        self._source = builder.as_data_source(split=split)
        self._shards = _shards(builder, split)
        self._where = f"{builder.name}/{split}"
        self._hint = _rebuild_hint(builder)

    def __len__(self) -> int:
        return len(self._source)

    def _error(self, index: int, err: Exception) -> UnreadableShardError:
        shard = next((s for s in self._shards if s.first <= index < s.first + s.count), None)
        path = shard.path if shard else "its shard"
        return UnreadableShardError(
            f"record {index} of {self._where} in {path} cannot be read "
            f"({_describe(err)}); the file is damaged: {self._hint}"
        )

    def __getitem__(self, index: int) -> Any:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {self._where}, which has {len(self)}")
        index %= len(self)
        try:
            record = self._source[index]
        except (RuntimeError, ValueError, OSError) as err:
            raise self._error(index, err) from err
        return record

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        return [self[index] for index in indices]
