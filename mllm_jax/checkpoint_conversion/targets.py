"""Where imported parameters go: abstract targets with shardings, and renamed source mappings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from mllm_jax.checkpoint_conversion.sharded_load import Source, TensorView
from mllm_jax.sharding import LogicalRules, check_divisible, logical_to_mesh_sharding, strip_boxes


def param_targets(
    boxed: Any, mesh: Mesh | None = None, rules: LogicalRules | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """ "/"-joined parameter path -> ShapeDtypeStruct with the sharding ``rules`` give it.

    Args:
      boxed: abstract params with their logical axes (``jax.eval_shape(model.init, ...)
        ["params"]``): nothing is allocated.
      mesh, rules: place parameters by their logical axes; without a mesh everything goes to
        the first device.

    Raises:
      ValueError: a mesh without rules, or naming every parameter whose sharded dimensions the
        mesh does not divide.
    """
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, strip_boxes(boxed))
    else:
        if rules is None:
            raise ValueError("a mesh needs the logical-axis rules that place parameters on it")
        shardings = logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        check_divisible(boxed, shardings)
    flat = traverse_util.flatten_dict(strip_boxes(boxed), sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/")
    return {
        path: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=flat_shardings[path])
        for path, array in flat.items()
    }


def _renamed_part(part: Source | TensorView, rename: Callable[[str], str]):
    if isinstance(part, TensorView):
        return dataclasses.replace(part, name=rename(part.name))
    return dataclasses.replace(part, views=tuple(_renamed_part(v, rename) for v in part.views))


def renamed(sources: Mapping[str, Source], rename: Callable[[str], str]) -> dict[str, Source]:
    """``sources`` with every checkpoint tensor name passed through ``rename`` (a model nested
    under another one's prefix, e.g. a language model inside a LLaVA checkpoint)."""
    return {path: _renamed_part(source, rename) for path, source in sources.items()}


def nested(prefix: str, sources: Mapping[str, Source]) -> dict[str, Source]:
    """``sources`` with every parameter path under ``prefix`` ("lm" -> "lm/decoder/...")."""
    return {f"{prefix}/{path}": source for path, source in sources.items()}
