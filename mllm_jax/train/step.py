"""The jitted train and eval steps of a decoder LM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllm_jax.sharding import LogicalRules
from mllm_jax.train.losses import cross_entropy_loss
from mllm_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def lm_loss(
    model: nn.Module, params: Any, batch: Batch, rngs: dict | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean next-token cross-entropy of ``model`` on a packed batch, and the target count.

    ``batch``: the text fields of the batch contract (``data/batch.py``), each [B, N].
    """
    logits = model.apply(
        {"params": params},
        batch["tokens"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        rngs=rngs,
    )
    loss_sum, count = cross_entropy_loss(logits, batch["targets"], batch["loss_mask"])
    return loss_sum / jnp.maximum(count, 1.0), count


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """Returns the pure ``train_step(state, batch, rng) -> (state, metrics)``.

    The per-step key is ``fold_in(rng, state.step)``, so a restarted run draws the same noise.
    """

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)

        (loss, count), grads = jax.value_and_grad(
            lambda params: lm_loss(model, params, batch, rngs={"dropout": step_rng}), has_aux=True
        )(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "num_targets": count,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], dict]:
    """Returns ``eval_step(params, batch) -> {"loss_sum", "num_targets"}`` for exact averaging."""

    def eval_step(params: Any, batch: Batch):
        loss, count = lm_loss(model, params, batch)
        return {"loss_sum": loss * count, "num_targets": count}

    return eval_step


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of [B, ...] input arrays: the batch dimension follows the ``act_batch`` rule."""
    return nn.logical_to_mesh_sharding(PartitionSpec("act_batch"), mesh, rules)


def jit_train_step(train_step, state_shardings: TrainState, mesh: Mesh, rules: LogicalRules):
    """jit with explicit in/out shardings; the input state is donated (updated in place).

    Call the result inside ``sharding.mesh_context(mesh, rules)`` so activation constraints apply.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding(mesh, rules), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
