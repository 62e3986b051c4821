"""Splitting a param tree into trainable and frozen parts by regexes over parameter paths.

Trainable vs frozen is configuration (``trainable_patterns``), not code. Gradients are taken
with respect to the trainable part only, so frozen weights get no gradient buffers and no
optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from flax import traverse_util

Params = dict[str, Any]


def path_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Predicate: does any regex in ``patterns`` search-match a "/"-joined parameter path?"""
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(p.search(path) for p in compiled)


def partition_params(params: Params, is_trainable: Callable[[str], bool]) -> tuple[Params, Params]:
    """(trainable, frozen) nested dicts whose leaves together are exactly ``params``'s leaves."""
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return (
        traverse_util.unflatten_dict(trainable, sep="/"),
        traverse_util.unflatten_dict(frozen, sep="/"),
    )


def combine_params(trainable: Params, frozen: Params) -> Params:
    """Inverse of ``partition_params``; raises if a path appears in both parts."""
    flat_trainable = traverse_util.flatten_dict(trainable, sep="/")
    flat_frozen = traverse_util.flatten_dict(frozen, sep="/")
    overlap = sorted(set(flat_trainable) & set(flat_frozen))
    if overlap:
        raise ValueError(f"parameters in both the trainable and the frozen part: {overlap[:5]}")
    return traverse_util.unflatten_dict(flat_trainable | flat_frozen, sep="/")
