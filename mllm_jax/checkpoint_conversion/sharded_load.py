"""Checkpoint tensors placed straight onto a device mesh, each device reading only its shard.

A target parameter is described by a ``Source``: one or more ``TensorView``s of checkpoint
tensors (a view splits the source's dimensions, transposes them, optionally selects a sub-box
first), stacked along a new axis when there are several (scanned layers, per-expert tensors).
``load_params`` builds every target with ``jax.make_array_from_callback``: the callback of a
device maps that device's box of the target back to the smallest box of each source tensor and
reads just that (``SafetensorsDirectory.read``). So a process reads only the slices its own
devices hold, one parameter at a time: the host never holds a full copy of the model.

Everything is checked before the first byte is read: every target has a source, every source
tensor exists, every view's shape equals its target's, and every checkpoint tensor is used or
explicitly ignored. A mismatch raises one error listing all the offending names.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory

_log = logging.getLogger(__name__)
Box = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class TensorView:
    """target = transpose(reshape(source[select], split), permute), then reshape to ``merge``.

    Attributes:
      name: the checkpoint tensor.
      select: a box of the source to use (a fused tensor's part, e.g. the gate half of
        ``gate_up_proj``); None for all of it.
      split: per source dimension, the sizes it splits into (row-major; their product is the
        dimension), e.g. ((H, D), (E,)) for a [H·D, E] projection; None keeps every dimension.
      permute: the order of the split dimensions in the target; None keeps it.
      merge: a final reshape that merges adjacent dimensions (a conv kernel into a matmul
        kernel); needs ``split`` and ``permute`` spelled out so that it can be undone on export.
        Targets with a merge are read whole (they are small), then cut.
    """

    name: str
    select: tuple[slice, ...] | None = None
    split: tuple[tuple[int, ...], ...] | None = None
    permute: tuple[int, ...] | None = None
    merge: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.merge is not None and (self.split is None or self.permute is None):
            raise ValueError(f"tensor {self.name!r}: a merge needs explicit split and permute")

    def _split_sizes(self, source_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        selected = self._selected_shape(source_shape)
        if self.split is None:
            return tuple((d,) for d in selected)
        if len(self.split) != len(selected) or any(
            math.prod(sizes) != d for sizes, d in zip(self.split, selected, strict=True)
        ):
            raise ValueError(
                f"tensor {self.name!r}: split {self.split} does not fit its shape {selected}"
            )
        return self.split

    def _selected_shape(self, source_shape: Sequence[int]) -> tuple[int, ...]:
        if self.select is None:
            return tuple(source_shape)
        if len(self.select) != len(source_shape):
            raise ValueError(f"tensor {self.name!r}: select {self.select} vs shape {source_shape}")
        return tuple(
            len(range(*s.indices(d))) for s, d in zip(self.select, source_shape, strict=True)
        )

    def _permutation(self, ndim: int) -> tuple[int, ...]:
        permute = tuple(range(ndim)) if self.permute is None else self.permute
        if sorted(permute) != list(range(ndim)):
            raise ValueError(f"tensor {self.name!r}: permute {permute} is not a permutation")
        return permute

    def shape(self, source_shape: Sequence[int]) -> tuple[int, ...]:
        """The target shape this view gives from a source of ``source_shape``."""
        flat = [s for sizes in self._split_sizes(source_shape) for s in sizes]
        permuted = tuple(flat[p] for p in self._permutation(len(flat)))
        if self.merge is not None:
            if math.prod(self.merge) != math.prod(permuted):
                raise ValueError(f"tensor {self.name!r}: cannot reshape {permuted} to {self.merge}")
            return tuple(self.merge)
        return permuted

    def read(self, directory: SafetensorsDirectory, box: Box) -> np.ndarray:
        """The ``box`` of this view's target, reading as little of the source as it can."""
        source_shape = directory.shape(self.name)
        if self.merge is not None:
            whole = tuple(slice(0, d) for d in self.shape(source_shape))
            full = self._read_unmerged(directory, source_shape, None)
            return full.reshape(self.merge)[box] if box != whole else full.reshape(self.merge)
        return self._read_unmerged(directory, source_shape, box)

    def _read_unmerged(self, directory, source_shape, box: Box | None) -> np.ndarray:
        sizes = self._split_sizes(source_shape)
        flat = [s for group in sizes for s in group]
        permute = self._permutation(len(flat))
        split_box = [slice(0, s) for s in flat]
        if box is not None:
            for target_dim, split_dim in enumerate(permute):
                split_box[split_dim] = box[target_dim]
        # Per source dimension: the covering range of its outer split part (inner parts whole).
        source_box, cut, position = [], [], 0
        for group in sizes:
            outer, inner = split_box[position], math.prod(group[1:])
            source_box.append(slice(outer.start * inner, outer.stop * inner))
            cut += [slice(0, outer.stop - outer.start)] + split_box[
                position + 1 : position + len(group)
            ]
            position += len(group)
        if self.select is not None:
            starts = [s.indices(d)[0] for s, d in zip(self.select, source_shape, strict=True)]
            source_box = [
                slice(s.start + o, s.stop + o) for s, o in zip(source_box, starts, strict=True)
            ]
        block = directory.read(self.name, source_box)
        block = block.reshape(_block_shape(sizes, split_box))
        return np.transpose(block[tuple(cut)], permute)


def _block_shape(sizes, split_box) -> list[int]:
    """Shape of a read source block split into its groups: outer part cut, inner parts whole."""
    shape, position = [], 0
    for group in sizes:
        outer = split_box[position]
        shape += [outer.stop - outer.start, *group[1:]]
        position += len(group)
    return shape


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one target parameter comes from: one view, or several parts stacked along
    ``stack_axis``. A part is a ``TensorView`` or itself a stacked ``Source`` (layers of
    per-expert tensors: a stack over layers of stacks over experts)."""

    views: tuple[TensorView | Source, ...]
    stack_axis: int | None = None

    def __post_init__(self):
        if not self.views:
            raise ValueError("a Source needs at least one view")
        if len(self.views) > 1 and self.stack_axis is None:
            raise ValueError(
                f"{len(self.views)} views of {self.tensor_names()[0]!r}... need a stack_axis"
            )

    def tensor_names(self) -> list[str]:
        """The checkpoint tensors this source reads, in stacking order."""
        names = []
        for part in self.views:
            names += [part.name] if isinstance(part, TensorView) else part.tensor_names()
        return names

    def shape(self, directory: SafetensorsDirectory) -> tuple[int, ...]:
        shapes = {_part_shape(part, directory) for part in self.views}
        if len(shapes) > 1:
            raise ValueError(
                f"stacked tensors {self.tensor_names()} have different shapes {sorted(shapes)}"
            )
        (shape,) = shapes
        if self.stack_axis is None:
            return shape
        return shape[: self.stack_axis] + (len(self.views),) + shape[self.stack_axis :]

    def read(self, directory: SafetensorsDirectory, box: Box) -> np.ndarray:
        if self.stack_axis is None:
            return self.views[0].read(directory, box)
        axis = self.stack_axis
        rest = box[:axis] + box[axis + 1 :]
        parts = [
            self.views[i].read(directory, rest) for i in range(box[axis].start, box[axis].stop)
        ]
        return np.stack(parts, axis=axis)


def _part_shape(part: TensorView | Source, directory: SafetensorsDirectory) -> tuple[int, ...]:
    if isinstance(part, TensorView):
        return part.shape(directory.shape(part.name))
    return part.shape(directory)


def view(name: str, **kwargs) -> Source:
    """A Source of one ``TensorView(name, **kwargs)``."""
    return Source((TensorView(name, **kwargs),))


def stacked(views: Sequence[TensorView | Source], axis: int = 0) -> Source:
    """A Source stacking ``views`` (or sources) along a new ``axis`` (layers of a scanned stack,
    experts; a stack of stacks for both)."""
    return Source(tuple(views), stack_axis=axis)


def _box(index: tuple, shape: tuple[int, ...]) -> Box:
    return tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape, strict=True))


def check_sources(
    directory: SafetensorsDirectory,
    sources: Mapping[str, Source],
    targets: Mapping[str, jax.ShapeDtypeStruct],
    *,
    ignored: Sequence[str] = (),
) -> None:
    """Raises one ValueError listing every problem before anything is read.

    Problems: a target without a source or a source without a target, a source tensor the
    checkpoint lacks, a view whose shape differs from its target's, and a checkpoint tensor that
    no source uses and no ``ignored`` regular expression (full match) covers.
    """
    problems = []
    for path in sorted(set(targets) - set(sources)):
        problems.append(f"no checkpoint tensor maps to parameter {path}")
    for path in sorted(set(sources) - set(targets)):
        first = sources[path].tensor_names()[0]
        problems.append(f"the model has no parameter {path} (source {first})")
    used = set()
    for path in sorted(set(sources) & set(targets)):
        names = sources[path].tensor_names()
        used.update(names)
        missing = [n for n in names if n not in directory]
        if missing:
            problems.append(f"missing tensor {missing[0]} (for parameter {path})")
            continue
        try:
            shape = sources[path].shape(directory)
        except ValueError as e:
            problems.append(f"parameter {path}: {e}")
            continue
        if shape != tuple(targets[path].shape):
            shapes = {n: directory.shape(n) for n in names[:2]}
            want = tuple(targets[path].shape)
            problems.append(
                f"shape mismatch for parameter {path}: the model wants {want}, "
                f"the checkpoint gives {shape} (from {shapes})"
            )
    patterns = [re.compile(p) for p in ignored]
    for name in directory.names():
        if name not in used and not any(p.fullmatch(name) for p in patterns):
            problems.append(f"unexpected tensor {name} (no parameter of the model takes it)")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{directory.path}: cannot load {len(problems)} problem(s):\n  {shown}{more}"
        )


def load_params(
    directory: SafetensorsDirectory,
    sources: Mapping[str, Source],
    targets: Mapping[str, jax.ShapeDtypeStruct],
    *,
    ignored: Sequence[str] = (),
) -> dict[str, jax.Array]:
    """Every target built from its source, placed with the target's sharding.

    Args:
      directory: the checkpoint.
      sources: "/"-joined parameter path -> Source.
      targets: the same paths -> ShapeDtypeStruct with the wanted dtype and ``sharding``
        (e.g. from ``jax.eval_shape`` of the model's init and the config's logical rules).
      ignored: regular expressions of checkpoint tensors deliberately left out (each is logged).

    Returns:
      path -> jax.Array, cast to the target dtype (in numpy, before it reaches a device).
    """
    check_sources(directory, sources, targets, ignored=ignored)
    used = {name for source in sources.values() for name in source.tensor_names()}
    skipped = [n for n in directory.names() if n not in used]
    if skipped:
        _log.info(
            "%s: %d tensors not loaded (ignored by design), e.g. %s",
            directory.path,
            len(skipped),
            skipped[:3],
        )
    params = {}
    for path, target in targets.items():
        source, shape, dtype = sources[path], tuple(target.shape), target.dtype
        cache: dict[tuple, np.ndarray] = {}  # replicated devices share one read

        def read(index, source=source, shape=shape, dtype=dtype, cache=cache):
            box = _box(index, shape)
            key = tuple((s.start, s.stop) for s in box)
            if key not in cache:
                cache[key] = np.ascontiguousarray(source.read(directory, box).astype(dtype))
            return cache[key]

        params[path] = jax.make_array_from_callback(shape, target.sharding, read)
    return params
