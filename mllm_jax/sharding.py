"""Device meshes over ICI x DCN, logical-axis rules, and sharding helpers.

Mesh axes, outermost first: ``data``, ``fsdp``, ``tensor``, ``expert``. Each axis has an
``ici_parallelism`` size (devices inside one slice) and a ``dcn_parallelism`` size (slices); the
mesh axis has size ``dcn * ici`` with the DCN factor outermost, so neighbouring indices along an
axis sit on the same slice and only the outer blocks talk over the data-centre network.

Logical-axis rules (a list of ``(logical_name, mesh_axes)`` pairs, kept in the config) map the
names that every parameter and activation carries to mesh axes. Resolution, as implemented by
``flax.linen.logical_to_mesh_axes``: rules are read top to bottom; a rule assigns its mesh axes to
the array dimension with that logical name if the dimension is still unassigned and none of the
rule's mesh axes is already used by another dimension of the same array. So the first usable rule
wins and a later rule for the same name acts as a fallback; a dimension no rule can take is
replicated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_parallelism(
    sizes: Mapping[str, int], num_devices: int, *, group: str, axes: Sequence[str] = MESH_AXES
) -> tuple[int, ...]:
    """Returns per-axis sizes whose product is ``num_devices``, filling in at most one ``-1``.

    Args:
      sizes: axis name -> size (positive, or -1 for "whatever is left"); missing axes are 1.
      num_devices: devices this group must cover (devices per slice for ICI, slices for DCN).
      group: "ici" or "dcn", used in error messages.
      axes: axis order of the result.
    """
    unknown = sorted(set(sizes) - set(axes))
    if unknown:
        raise ValueError(f"{group}_parallelism names unknown mesh axes {unknown}; known: {axes}")
    values = [int(sizes.get(axis, 1)) for axis in axes]
    auto = [axis for axis, v in zip(axes, values, strict=True) if v == -1]
    bad = [(axis, v) for axis, v in zip(axes, values, strict=True) if v == 0 or v < -1]
    if bad:
        raise ValueError(f"{group}_parallelism sizes must be positive or -1, got {bad}")
    if len(auto) > 1:
        raise ValueError(f"{group}_parallelism may set at most one axis to -1, got {auto}")
    known = math.prod(v for v in values if v != -1)
    if auto:
        if num_devices % known:
            raise ValueError(
                f"{group}_parallelism: {num_devices} devices do not divide by the fixed axes "
                f"(product {known}) to fill '{auto[0]}'"
            )
        values[axes.index(auto[0])] = num_devices // known
    if math.prod(values) != num_devices:
        raise ValueError(
            f"{group}_parallelism {dict(zip(axes, values, strict=True))} covers "
            f"{math.prod(values)} devices, but there are {num_devices}"
        )
    return tuple(values)


def _num_slices(devices: Sequence[Any]) -> int:
    if not hasattr(devices[0], "slice_index"):
        return 1
    return len({d.slice_index for d in devices})


def create_mesh(
    ici_parallelism: Mapping[str, int],
    dcn_parallelism: Mapping[str, int] | None = None,
    devices: Sequence[Any] | None = None,
    *,
    axes: Sequence[str] = MESH_AXES,
    allow_split_physical_axes: bool = True,
) -> Mesh:
    """Builds a ``jax.sharding.Mesh`` with Auto axis types over all (or the given) devices.

    Devices that carry ``slice_index`` (multi-slice TPU) go through
    ``mesh_utils.create_hybrid_device_mesh`` so that each axis is DCN-outer, ICI-inner;
    otherwise ``mesh_utils.create_device_mesh`` picks a topology-aware order.
    """
    devices = list(jax.devices() if devices is None else devices)
    num_slices = _num_slices(devices)
    dcn = resolve_parallelism(dcn_parallelism or {}, num_slices, group="dcn", axes=axes)
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices do not split evenly into {num_slices} slices")
    ici = resolve_parallelism(ici_parallelism, len(devices) // num_slices, group="ici", axes=axes)
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, allow_split_physical_axes=allow_split_physical_axes
        )
    else:
        device_array = mesh_utils.create_device_mesh(
            ici, devices, allow_split_physical_axes=allow_split_physical_axes
        )
    return Mesh(device_array, tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def create_mesh_from_config(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """``create_mesh`` from a config section with ``ici_parallelism`` / ``dcn_parallelism``."""
    return create_mesh(
        dict(mesh_config.ici_parallelism),
        dict(mesh_config.dcn_parallelism),
        devices,
    )


def logical_rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple:
    """Normalises a rules table from a config (lists become tuples) into Flax's format."""
    normalised = []
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"a logical-axis rule is (logical_name, mesh_axes), got {entry!r}")
        name, mesh_axes = entry
        if isinstance(mesh_axes, list | tuple):
            mesh_axes = tuple(mesh_axes)
        normalised.append((str(name), mesh_axes))
    return tuple(normalised)


def logical_to_mesh_sharding(logical_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Maps a tree of logical ``PartitionSpec``s (or boxed abstract arrays) to NamedShardings."""
    if not _contains_boxes(logical_tree) and not _contains_specs(logical_tree):
        raise ValueError("expected a tree of logical PartitionSpecs or nn.Partitioned boxes")
    specs = nn.get_partition_spec(logical_tree) if _contains_boxes(logical_tree) else logical_tree
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _contains_boxes(tree: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return any(isinstance(x, nn.meta.AxisMetadata) for x in leaves)


def _contains_specs(tree: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return any(isinstance(x, PartitionSpec) for x in leaves)


def strip_boxes(tree: Any) -> Any:
    """Replaces ``nn.Partitioned`` boxes by their values without imposing sharding constraints.

    (``nn.meta.unbox`` constrains each value when a mesh is active, which fails outside jit.)
    """
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Raises a ValueError naming every array whose sharded dimensions don't divide evenly."""
    problems = []
    flat_arrays = jax.tree_util.tree_flatten_with_path(strip_boxes(abstract_tree))[0]
    flat_shardings = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    for (path, array), sharding in zip(flat_arrays, flat_shardings, strict=True):
        for dim, axes in enumerate(sharding.spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if array.shape[dim] % ways:
                problems.append(
                    f"{jax.tree_util.keystr(path)}: dim {dim} of shape {array.shape} "
                    f"is split {ways} ways over {axes}"
                )
    if problems:
        raise ValueError("shapes do not divide by the mesh:\n  " + "\n  ".join(problems))


def unsharded_fraction(abstract_tree: Any, shardings: Any) -> float:
    """Fraction of total bytes in arrays that are fully replicated (no dimension split >1 way)."""
    arrays = jax.tree_util.tree_leaves(strip_boxes(abstract_tree))
    flat_shardings = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    total = replicated = 0
    for array, sharding in zip(arrays, flat_shardings, strict=True):
        nbytes = math.prod(array.shape) * np.dtype(array.dtype).itemsize
        total += nbytes
        if _split_ways(sharding) == 1:
            replicated += nbytes
    return replicated / total if total else 0.0


def _split_ways(sharding: NamedSharding) -> int:
    ways = 1
    for axes in sharding.spec:
        if axes is None:
            continue
        for axis in (axes,) if isinstance(axes, str) else axes:
            ways *= sharding.mesh.shape[axis]
    return ways


def assert_mostly_sharded(abstract_tree: Any, shardings: Any, max_unsharded: float) -> float:
    """Raises if more than ``max_unsharded`` of the bytes are replicated; returns the fraction."""
    fraction = unsharded_fraction(abstract_tree, shardings)
    if fraction > max_unsharded:
        raise AssertionError(
            f"{fraction:.1%} of parameter bytes are replicated on every device "
            f"(allowed {max_unsharded:.1%}); check the logical-axis rules"
        )
    return fraction


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules):
    """Activates ``mesh`` and the logical-axis ``rules`` for tracing.

    ``nn.with_logical_constraint`` is a no-op without an active mesh, so jit-compiled steps and
    sharded initialisation must be traced inside this context.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
