"""Reads torch's legacy (non-zip) ``.pth`` files into numpy arrays, without torch.

The legacy format (torch < 1.6 ``torch.save``) is five pickles and raw storage bytes::

  magic number | protocol version | sys info | the object | storage keys
  then, per storage key in that order: int64 element count, element bytes (little endian)

Tensors inside "the object" are ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`` calls whose storages are pickle persistent ids ``("storage", <type>, key,
location, numel, view)``. A plain ``pickle.load`` would import and call whatever the file names,
so this reader's unpickler resolves only the handful of globals a state dict needs (the tensor
rebuild functions, storage types, ``OrderedDict``) and rejects everything else, naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import pickle
from typing import Any

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class TorchFileError(ValueError):
    """A ``.pth`` file that is not a legacy torch state dict this reader accepts."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _PendingTensor:
    """A tensor whose storage bytes come after the object pickle; built by ``_materialize``."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
    del unused  # requires_grad, backward hooks, metadata: irrelevant to the values
    return _PendingTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    del unused
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds tensors and dicts only; any other global is an error."""

    def __init__(self, file, path: pathlib.Path, storages: dict[str, _Storage]):
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise TorchFileError(
            f"{self._path}: refuses to load global {module}.{name}; only tensors, storages and "
            "OrderedDict are allowed in a weights file"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchFileError(f"{self._path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{self._path}: storage {key!r} has no storage type")
        if view is not None:
            raise TorchFileError(f"{self._path}: storage {key!r} is a view; views are unsupported")
        if key not in self._storages:
            self._storages[key] = _Storage(str(key), storage_type.dtype, int(numel))
        return self._storages[key]


def _read_storage(file, storage: _Storage, path: pathlib.Path) -> None:
    header = file.read(8)
    if len(header) != 8:
        raise TorchFileError(f"{path}: file ends before storage {storage.key!r}")
    numel = int.from_bytes(header, "little", signed=True)
    if numel != storage.numel:
        raise TorchFileError(
            f"{path}: storage {storage.key!r} holds {numel} elements, its tensors expect "
            f"{storage.numel}"
        )
    nbytes = numel * storage.dtype.itemsize
    raw = file.read(nbytes)
    if len(raw) != nbytes:
        raise TorchFileError(f"{path}: storage {storage.key!r} is truncated")
    storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<")).astype(storage.dtype)


def _materialize(value: Any, name: str, path: pathlib.Path) -> Any:
    if isinstance(value, dict):
        return {
            k: _materialize(v, f"{name}.{k}" if name else str(k), path) for k, v in value.items()
        }
    if not isinstance(value, _PendingTensor):
        return value
    data = value.storage.data
    if data is None:
        raise TorchFileError(f"{path}: tensor {name!r} refers to storage that was never written")
    extent = value.offset + sum((n - 1) * s for n, s in zip(value.size, value.stride, strict=True))
    if min(value.size, default=1) > 0 and extent >= len(data):
        raise TorchFileError(
            f"{path}: tensor {name!r} {value.size} reaches element {extent} of a "
            f"{len(data)}-element storage"
        )
    strides = tuple(s * data.itemsize for s in value.stride)
    view = np.lib.stride_tricks.as_strided(data[value.offset :], value.size, strides)
    return np.array(view)


def load_legacy_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{parameter name: array} of a legacy ``torch.save`` file, never running its code.

    Raises:
      TorchFileError: naming the file and what is wrong: not the legacy format, a disallowed
        global (any object other than tensors and dicts), a missing or truncated storage, a
        tensor outside its storage, or a top level that is not a dict of tensors.
    """
    path = pathlib.Path(path)
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as file:
        if file.read(2) == b"PK":
            raise TorchFileError(f"{path}: a zip-format torch file, not the legacy format")
        file.seek(0)

        def load() -> Any:
            try:
                return _RestrictedUnpickler(file, path, storages).load()
            except (pickle.UnpicklingError, EOFError) as err:
                raise TorchFileError(f"{path}: not a legacy torch file ({err})") from err

        if load() != LEGACY_MAGIC:
            raise TorchFileError(f"{path}: wrong magic number; not a legacy torch file")
        if load() != LEGACY_PROTOCOL:
            raise TorchFileError(f"{path}: unsupported legacy protocol version")
        sys_info = load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise TorchFileError(f"{path}: only little-endian files are supported")
        state = load()
        keys = load()
        if not isinstance(keys, list) or set(keys) != set(storages):
            raise TorchFileError(f"{path}: storage key list does not match the tensors")
        for key in keys:
            _read_storage(file, storages[key], path)
    if not isinstance(state, dict):
        raise TorchFileError(f"{path}: top level is {type(state).__name__}, not a state dict")
    arrays = _materialize(state, "", path)
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise TorchFileError(f"{path}: entry {name!r} is {type(value).__name__}, not a tensor")
    return arrays
