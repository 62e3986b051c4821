"""Parameters back to checkpoint tensors: the inverse of ``sharded_load``'s views, and a writer.

``tensors_from_params`` undoes each ``TensorView`` (merge, permute, split, select) and unstacks
stacked sources, so that an import followed by an export gives back every tensor bit for bit.
``write_safetensors`` streams the tensors into files of at most ``max_shard_bytes`` with a
Hugging Face ``model.safetensors.index.json``, one parameter gathered to the host at a time.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np

from mllm_jax.checkpoint_conversion.safetensors_files import INDEX_FILE, SINGLE_FILE
from mllm_jax.checkpoint_conversion.sharded_load import Source, TensorView


def _undo_view(view: TensorView, target: np.ndarray) -> np.ndarray:
    """The selected source box that ``view`` turns into ``target``."""
    permute = view.permute
    if view.merge is not None or permute is not None:
        if permute is None:
            raise ValueError(f"tensor {view.name!r}: a merge without a permute cannot be undone")
        split_sizes = view.split
        if view.merge is not None:
            if split_sizes is None:
                raise ValueError(f"tensor {view.name!r}: undoing a merge needs the split sizes")
            flat = [s for group in split_sizes for s in group]
            target = target.reshape([flat[p] for p in permute])
        target = np.transpose(target, np.argsort(permute))
    if view.split is not None:
        target = target.reshape([math.prod(group) for group in view.split])
    return target


def _source_tensors(
    source: Source | TensorView, value: np.ndarray
) -> Iterator[tuple[TensorView, np.ndarray]]:
    """(view, source tensor) pairs that ``source`` builds ``value`` from (stacks recursed)."""
    if isinstance(source, TensorView):
        yield source, _undo_view(source, value)
    elif source.stack_axis is None:
        yield from _source_tensors(source.views[0], value)
    else:
        for i, part in enumerate(source.views):
            yield from _source_tensors(part, np.take(value, i, axis=source.stack_axis))


def tensors_from_params(
    sources: Mapping[str, Source], params: Mapping[str, np.ndarray | jax.Array]
) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint tensor name, array) for every tensor the ``sources`` read.

    ``params`` maps the same "/"-paths to arrays (device arrays are fetched one at a time).
    Tensors assembled from several selected parts (fused projections) are yielded once all
    their parts are in.

    Raises:
      KeyError: a source's parameter is missing from ``params``.
      ValueError: the parts of a fused tensor do not tile it.
    """
    pending: dict[str, list[tuple[TensorView, np.ndarray]]] = {}
    for path, source in sources.items():
        if path not in params:
            raise KeyError(
                f"parameter {path} (for {source.tensor_names()[0]}) is not in the params"
            )
        value = np.asarray(jax.device_get(params[path]))
        for view, tensor in _source_tensors(source, value):
            if view.select is None:
                yield view.name, tensor
            else:
                pending.setdefault(view.name, []).append((view, tensor))
    for name, parts in pending.items():
        yield name, _assemble(name, parts)


def _assemble(name: str, parts: list[tuple[TensorView, np.ndarray]]) -> np.ndarray:
    ndim = parts[0][1].ndim
    shape = [
        max((v.select[d].stop if v.select[d].stop is not None else t.shape[d]) for v, t in parts)
        for d in range(ndim)
    ]
    full = np.zeros(shape, parts[0][1].dtype)
    covered = np.zeros(shape, bool)
    for view, tensor in parts:
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(view.select, shape, strict=True))
        full[box] = tensor
        covered[box] = True
    if not covered.all():
        raise ValueError(f"the parts of tensor {name!r} do not cover its shape {tuple(shape)}")
    return full


def write_safetensors(
    directory: str | pathlib.Path,
    tensors: Iterator[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 5 << 30,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[pathlib.Path]:
    """Writes ``tensors`` as ``model.safetensors`` or numbered shards plus an index.

    ``convert`` maps each array before it is written (e.g. a dtype cast). Shards are written
    as they fill, so at most one shard's tensors are on the host at a time. Returns the files.
    """
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    written: list[pathlib.Path] = []
    sizes = [0]
    weight_map: dict[str, int] = {}
    meta = {"format": "pt", **(metadata or {})}

    def flush() -> None:  # the shard count is not known yet: "{total}" is filled in below
        path = directory / f"model-{len(written) + 1:05d}-of-{{total}}.safetensors"
        save_file(shards[-1], str(path), metadata=meta)
        written.append(path)
        shards[-1] = {}

    for name, array in tensors:
        if name in weight_map:
            raise ValueError(f"tensor {name!r} is written twice")
        array = np.ascontiguousarray(convert(array) if convert else array)
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            flush()
            shards.append({})
            sizes.append(0)
        shards[-1][name] = array
        sizes[-1] += array.nbytes
        weight_map[name] = len(shards) - 1
    flush()
    total = len(written)
    if total == 1:
        return [written[0].rename(directory / SINGLE_FILE)]
    final = [
        path.rename(directory / path.name.replace("{total}", f"{total:05d}")) for path in written
    ]
    index = {
        "metadata": {"total_size": sum(sizes)},
        "weight_map": {n: final[i].name for n, i in sorted(weight_map.items())},
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return final
