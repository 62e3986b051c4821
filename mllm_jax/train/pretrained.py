"""Carrying weights between training stages: overlay earlier stages' params onto a fresh init.

A stage's model is initialised from scratch and then every parameter an earlier stage produced
is put in its place (``overlay_params``). Paths the earlier stages do not cover keep their fresh
init (e.g. new adapters, a new projector); they are returned so the caller can log them.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util


def overlay_params(
    params: Mapping, pretrained: Mapping, *, source: str = "pretrained"
) -> tuple[dict, list[str]]:
    """``params`` with every leaf of ``pretrained`` (a nested dict, same layout) put in place.

    A pretrained leaf takes the target leaf's sharding (``jax.device_put`` onto it) and must
    match its shape and dtype.

    Returns:
      (params, kept): the overlaid tree and the sorted "/"-paths that kept their init.

    Raises:
      ValueError: naming ``source`` and the path, if a pretrained leaf has no place in
        ``params`` or a different shape or dtype.
    """
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    flat_pretrained = traverse_util.flatten_dict(dict(pretrained), sep="/")
    unknown = sorted(set(flat_pretrained) - set(flat))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} parameters have no place in the model, e.g. {unknown[:5]}"
        )
    for path, value in flat_pretrained.items():
        target = flat[path]
        if tuple(np.shape(value)) != tuple(target.shape) or np.dtype(value.dtype) != np.dtype(
            target.dtype
        ):
            raise ValueError(
                f"{source}: parameter {path} is {np.shape(value)} {np.dtype(value.dtype)}, "
                f"the model wants {tuple(target.shape)} {np.dtype(target.dtype)}"
            )
        flat[path] = place_like(value, getattr(target, "sharding", None))
    kept = sorted(set(flat) - set(flat_pretrained))
    return traverse_util.unflatten_dict(flat, sep="/"), kept


def place_like(value, sharding: jax.sharding.Sharding | None):
    """``value`` (an array every process holds in full) laid out by ``sharding``.

    On one process that is ``jax.device_put``. When ``sharding`` spans several processes and
    ``value`` lives on this process's devices only, each process builds its own shards from a
    host copy: a device-to-device transfer across hosts is not available on every backend
    (XLA:CPU refuses it).
    """
    if sharding is None:
        return value
    global_value = not getattr(value, "is_fully_addressable", True)
    if sharding.is_fully_addressable or global_value:
        return jax.device_put(value, sharding)
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def nest_under(prefix: str, tree: Mapping) -> dict:
    """``tree`` placed under the "/"-separated ``prefix`` (e.g. a DecoderLM's params -> "lm")."""
    for key in reversed([k for k in prefix.split("/") if k]):
        tree = {key: tree}
    return dict(tree)
