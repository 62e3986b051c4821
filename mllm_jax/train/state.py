"""Train state, created directly in its sharded layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mllm_jax import sharding
from mllm_jax.train.param_groups import GroupedOptimizer


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes: step counter, params, optimizer state."""

    step: jnp.ndarray
    params: Any
    opt_state: Any


def create_sharded_train_state(
    init_params: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    rng: jax.Array,
) -> tuple[TrainState, TrainState]:
    """Initialises the state with every array born on its devices (never materialised whole).

    ``init_params(rng)`` returns the boxed params of ``model.init`` (``nn.LogicallyPartitioned``
    leaves). The state is traced abstractly (``jax.eval_shape``), its logical axes resolved to
    ``NamedSharding``s through ``rules``, and the real init runs under
    ``jax.jit(out_shardings=...)``. Optimizer moments inherit the params' logical axes.

    Returns:
      (state, state_shardings): the unboxed state and a same-structured tree of NamedShardings.
    """

    def init_state(rng):
        params = init_params(rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    with sharding.mesh_context(mesh, rules):
        abstract = jax.eval_shape(init_state, rng)
        specs = nn.get_partition_spec(abstract)
        shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
        sharding.check_divisible(abstract, shardings)
        state = jax.jit(lambda r: nn.meta.unbox(init_state(r)), out_shardings=shardings)(rng)
    return state, shardings


@flax.struct.dataclass
class GroupedTrainState:
    """State of a param-group train step: the frozen params sit beside, not in, the optimizer.

    ``opt_state`` covers ``trainable`` only; ``frozen`` is read by the loss and never written.
    """

    step: jnp.ndarray
    trainable: Any
    frozen: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, grouped_optimizer: GroupedOptimizer) -> GroupedTrainState:
        """Step 0 state: ``params`` split into trainable and frozen, moments for the trainable."""
        trainable, frozen = grouped_optimizer.split(params)
        return cls(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=grouped_optimizer.init(trainable),
        )
