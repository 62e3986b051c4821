"""The train state of ``trainer.train``: step, trainable and frozen params, optimizer state."""

from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp

from mllm_jax.train.param_groups import GroupedOptimizer


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
