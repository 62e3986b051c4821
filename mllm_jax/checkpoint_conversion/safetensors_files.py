"""Lazy, sliced reads of the tensors of a Hugging Face safetensors checkpoint directory.

A directory holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> file). Only the small JSON headers are read up front; a tensor's
bytes are read when asked for, and only the box asked for.

Why not ``safetensors.safe_open``: its numpy ``get_slice`` cannot return bfloat16 (the dtype of
most released LLM checkpoints: "data type 'bfloat16' not understood"), and it memory-maps the
file, so every page a slice touches stays in the process's resident set while the file is open.
Here a box is read with ``os.pread`` of its contiguous runs into a buffer of exactly its size
(bfloat16 through ``ml_dtypes``), which keeps a loader's host memory at one slice at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import struct
from collections.abc import Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# Above this many contiguous runs a box is read as its covering row range and cut in memory.
_MAX_RUNS = 1 << 16
Box = tuple[slice, ...]


class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range of its data."""

    def __init__(self, file: pathlib.Path, name: str, header: dict, data_start: int):
        if header.get("dtype") not in _DTYPES:
            raise ValueError(
                f"{file}: tensor {name!r} has dtype {header.get('dtype')!r}, not one of "
                f"{sorted(_DTYPES)}"
            )
        self.file, self.name = file, name
        self.dtype = _DTYPES[header["dtype"]]
        self.shape = tuple(int(d) for d in header["shape"])
        begin, end = header["data_offsets"]
        if end - begin != math.prod(self.shape) * self.dtype.itemsize:
            raise ValueError(
                f"{file}: tensor {name!r} of shape {self.shape} {header['dtype']} needs "
                f"{math.prod(self.shape) * self.dtype.itemsize} bytes, its header gives "
                f"{end - begin} (data_offsets {begin}..{end})"
            )
        self.offset = data_start + begin


def _read_header(file: pathlib.Path) -> tuple[dict, int]:
    """(header dict without ``__metadata__``, offset of the data block) of one file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file}: not a safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(
                f"{file}: header length {header_len} exceeds the file size {size} "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: the safetensors header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    end = max((h["data_offsets"][1] for h in header.values()), default=0)
    if data_start + end > size:
        raise ValueError(
            f"{file}: tensors end at byte {data_start + end} but the file has {size} "
            "(truncated download?)"
        )
    return header, data_start


class SafetensorsDirectory:
    """The tensors of a checkpoint directory (or of one ``.safetensors`` file) by name, read
    lazily box by box.

    ``bytes_read`` counts the tensor bytes read so far (tests use it to check that a process
    reads only its own shards).

    Raises:
      FileNotFoundError: no ``model.safetensors`` nor index in ``path``, or a file the index
        names is missing.
      ValueError: a malformed header or index, or a tensor named in two files.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        index = self.path / INDEX_FILE
        if self.path.is_file():
            weight_map, files = None, [self.path.name]
            self.path = self.path.parent
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index with 'weight_map' ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise FileNotFoundError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (is this a Hugging Face "
                "checkpoint directory saved with safetensors?)"
            )
        self._entries: dict[str, TensorEntry] = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise FileNotFoundError(f"{index}: lists {name}, which is not in {self.path}")
            header, data_start = _read_header(file)
            for tensor, info in header.items():
                if tensor in self._entries:
                    raise ValueError(
                        f"{self.path}: tensor {tensor!r} is in both "
                        f"{self._entries[tensor].file.name} and {name}"
                    )
                self._entries[tensor] = TensorEntry(file, tensor, info, data_start)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise ValueError(f"{index}: lists tensors no file holds, e.g. {missing[:5]}")
        self.bytes_read = 0

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def nbytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(math.prod(e.shape) * e.dtype.itemsize for e in self._entries.values())

    def read(self, name: str, box: Sequence[slice] | None = None) -> np.ndarray:
        """The tensor ``name``, or the box ``box`` of it (one step-1 slice per dimension)."""
        entry = self.entry(name)
        box = _normalise_box(box, entry.shape, name)
        out_shape = tuple(s.stop - s.start for s in box)
        out = np.empty(out_shape, entry.dtype)
        if out.size == 0:
            return out
        runs = _contiguous_runs(entry.shape, box, entry.dtype.itemsize)
        if runs is None:  # too many tiny runs: read the covering range of the first dimension
            cover = (box[0],) + tuple(slice(0, d) for d in entry.shape[1:])
            return self.read(name, cover)[(slice(None),) + tuple(box[1:])]
        flat = out.reshape(-1).view(np.uint8)
        written = 0
        with open(entry.file, "rb", buffering=0) as f:
            fd = f.fileno()
            for start, length in runs:
                chunk = os.pread(fd, length, entry.offset + start)
                if len(chunk) != length:
                    raise ValueError(f"{entry.file}: short read of tensor {name!r} (truncated)")
                flat[written : written + length] = np.frombuffer(chunk, np.uint8)
                written += length
        self.bytes_read += written
        return out


def _normalise_box(box: Sequence[slice] | None, shape: tuple[int, ...], name: str) -> Box:
    if box is None:
        return tuple(slice(0, d) for d in shape)
    if len(box) != len(shape):
        raise ValueError(f"tensor {name!r} has {len(shape)} dims, the box {box} {len(box)}")
    normalised = []
    for s, d in zip(box, shape, strict=True):
        start, stop, step = s.indices(d)
        if step != 1:
            raise ValueError(f"tensor {name!r}: only step-1 slices can be read, got {s}")
        normalised.append(slice(start, max(start, stop)))
    return tuple(normalised)


def _contiguous_runs(
    shape: tuple[int, ...], box: Box, itemsize: int
) -> list[tuple[int, int]] | None:
    """(byte offset from the tensor's start, byte length) of the runs that make up ``box``, in
    C order; None when there would be more than ``_MAX_RUNS`` of them."""
    ndim = len(shape)
    # From dimension k on, the box is one contiguous run per index of the dimensions before k.
    k = ndim - 1
    while k > 0 and box[k] == slice(0, shape[k]):
        k -= 1
    strides = [math.prod(shape[i + 1 :]) for i in range(ndim)]
    run_bytes = (box[k].stop - box[k].start) * strides[k] * itemsize
    outer = [range(s.start, s.stop) for s in box[:k]]
    if math.prod(len(r) for r in outer) > _MAX_RUNS:
        return None
    base = box[k].start * strides[k]
    return [
        ((base + sum(i * strides[d] for d, i in enumerate(index))) * itemsize, run_bytes)
        for index in itertools.product(*outer)
    ]
