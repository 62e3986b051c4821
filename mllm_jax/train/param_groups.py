"""Parameter groups: per-group learning rates and weight decay, everything else frozen.

Each ``ParamGroup`` selects parameters by regexes over their "/"-joined paths. Parameters that
no group selects are frozen: they are split off before the optimizer sees the tree, so the
optimizer state (Adam's two moments) is allocated for the trainable parameters only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mllm_jax.train.optimizer import (
    check_learning_rate,
    check_optimizer_config,
    make_learning_rate_schedule,
    matrices_only,
)
from mllm_jax.train.partition import Params, combine_params, partition_params

FROZEN = "frozen"
"""Key of the frozen set in ``GroupedOptimizer.summary``; not allowed as a group name."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamGroup:
    """Parameters trained together with one peak learning rate.

    Attributes:
      name: label used in metrics (``learning_rate/<name>``) and summaries.
      patterns: regexes, search-matched against "/"-joined parameter paths.
      learning_rate: the group's peak learning rate on the shared warmup-cosine shape.
      weight_decay: decoupled weight decay on the group's matrices; None uses the optimizer's.
    """

    name: str
    patterns: tuple[str, ...]
    learning_rate: float
    weight_decay: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.patterns:
            raise ValueError(f"param group {self.name!r} has no patterns")
        check_learning_rate(self.learning_rate, f"param group {self.name!r}: learning_rate")
        if self.weight_decay is not None and not 0 <= self.weight_decay < math.inf:
            raise ValueError(
                f"param group {self.name!r}: weight_decay={self.weight_decay!r} must be >= 0"
            )
        for pattern in self.patterns:
            re.compile(pattern)


class GroupSize(NamedTuple):
    """How many scalars and bytes a set of parameters holds."""

    num_params: int
    num_bytes: int


def _flat(tree: Mapping) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def _leaf_array(leaf: Any) -> Any:
    return getattr(leaf, "value", leaf)


def group_of(groups: Sequence[ParamGroup], path: str) -> str | None:
    """The name of the one group selecting ``path``, or None if it is frozen.

    Raises:
      ValueError: when several groups select ``path``.
    """
    names = [g.name for g in groups if any(re.search(p, path) for p in g.patterns)]
    if len(names) > 1:
        raise ValueError(f"parameter {path!r} matches several param groups: {names}")
    return names[0] if names else None


def group_labels(groups: Sequence[ParamGroup], trainable: Params) -> Params:
    """Tree shaped like ``trainable`` whose leaves are group names (optax ``param_labels``)."""
    return traverse_util.unflatten_dict(
        {path: group_of(groups, path) for path in _flat(trainable)}, sep="/"
    )


@dataclasses.dataclass(frozen=True)
class GroupedOptimizer:
    """Clipping plus one AdamW per group over the trainable params; see ``make_grouped_optimizer``.

    ``transformation`` is the optax transformation over the *trainable* tree (the first element
    of ``split``); ``schedules`` maps each group name to its learning-rate schedule.
    """

    groups: tuple[ParamGroup, ...]
    transformation: optax.GradientTransformation
    schedules: Mapping[str, optax.Schedule]

    def split(self, params: Params) -> tuple[Params, Params]:
        """(trainable, frozen) parts of ``params``.

        Raises:
          ValueError: a parameter matches several groups, or a group matches no parameter
            (a misspelt pattern would otherwise silently freeze what it meant to train).
        """
        labels = {path: group_of(self.groups, path) for path in _flat(params)}
        empty = [g.name for g in self.groups if g.name not in labels.values()]
        if empty:
            raise ValueError(f"param groups {empty} match no parameter; check their patterns")
        return partition_params(params, lambda path: labels[path] is not None)

    def combine(self, trainable: Params, frozen: Params) -> Params:
        """Inverse of ``split``."""
        return combine_params(trainable, frozen)

    def init(self, trainable: Params) -> optax.OptState:
        """Optimizer state for the trainable params only (frozen ones get none)."""
        return self.transformation.init(trainable)

    def update(
        self, grads: Params, opt_state: optax.OptState, trainable: Params
    ) -> tuple[Params, optax.OptState]:
        """(updates, new opt_state) for gradients w.r.t. the trainable params."""
        return self.transformation.update(grads, opt_state, trainable)

    def learning_rates(self, step: jnp.ndarray | int) -> dict[str, jnp.ndarray]:
        """{group name: learning rate at ``step``}, for logging."""
        return {name: schedule(step) for name, schedule in self.schedules.items()}

    def summary(self, params: Params) -> dict[str, GroupSize]:
        """{group name: size, ..., ``FROZEN``: size} of ``params`` (arrays or shape structs)."""
        sizes = {name: [0, 0] for name in [g.name for g in self.groups] + [FROZEN]}
        for path, leaf in _flat(params).items():
            array = _leaf_array(leaf)
            count = math.prod(array.shape)
            size = sizes[group_of(self.groups, path) or FROZEN]
            size[0] += count
            size[1] += count * jnp.dtype(array.dtype).itemsize
        return {name: GroupSize(*size) for name, size in sizes.items()}


def make_grouped_optimizer(
    optimizer_config: Any, groups: Sequence[ParamGroup], num_steps: int
) -> GroupedOptimizer:
    """Global-norm clipping over all trainable params, then AdamW per group.

    Every group shares the config's warmup-cosine shape, betas, eps and clipping; its peak
    learning rate is ``group.learning_rate`` and its decay ``group.weight_decay`` (default the
    config's), applied to matrices (ndim >= 2) only. Params selected by no group are frozen.

    Raises:
      ValueError: naming the ``optimizer.*`` field out of range (``check_optimizer_config``),
        before anything is compiled.
    """
    check_optimizer_config(optimizer_config)
    groups = tuple(groups)
    names = [g.name for g in groups]
    if not groups:
        raise ValueError("at least one param group is needed; with none, nothing trains")
    if len(set(names)) != len(names) or FROZEN in names:
        raise ValueError(f"param group names must be unique and not {FROZEN!r}, got {names}")
    schedules = {}
    transforms = {}
    for group in groups:
        shape = types.SimpleNamespace(
            learning_rate=group.learning_rate,
            warmup_steps=optimizer_config.warmup_steps,
            end_learning_rate_fraction=optimizer_config.end_learning_rate_fraction,
        )
        schedules[group.name] = make_learning_rate_schedule(shape, num_steps)
        weight_decay = optimizer_config.weight_decay
        if group.weight_decay is not None:
            weight_decay = group.weight_decay
        transforms[group.name] = optax.adamw(
            learning_rate=schedules[group.name],
            b1=optimizer_config.b1,
            b2=optimizer_config.b2,
            eps=optimizer_config.eps,
            weight_decay=weight_decay,
            mask=matrices_only,
        )
    transformation = optax.chain(
        optax.clip_by_global_norm(optimizer_config.grad_clip_norm),
        optax.multi_transform(transforms, functools.partial(group_labels, groups)),
    )
    return GroupedOptimizer(groups=groups, transformation=transformation, schedules=schedules)


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (e.g. an optimizer state)."""
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(tree)
    )
