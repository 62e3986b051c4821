"""The train-step pieces every trainer run uses: LM losses, the param-group step, the eval step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllm_jax.models.decoder_lm import DecoderLM
from mllm_jax.sharding import LogicalRules
from mllm_jax.train.losses import apply_with_moe_losses, head_cross_entropy_loss
from mllm_jax.train.param_groups import GroupedOptimizer
from mllm_jax.train.partition import combine_params
from mllm_jax.train.state import GroupedTrainState

Batch = dict[str, jax.Array]
SumLossFn = Callable[[Any, Batch, jax.Array], tuple]
MAX_NAMED_PATHS = 20


def _lm_sums(model: nn.Module, params: Any, batch: Batch, rngs: dict | None, chunk_size: int):
    """(cross-entropy sum, target count, MoE aux loss, MoE metrics) of a DecoderLM."""
    outputs, aux_loss, metrics = apply_with_moe_losses(
        model,
        {"params": params},
        batch["tokens"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        return_hidden=bool(chunk_size),
        rngs=rngs,
    )
    loss_sum, count = head_cross_entropy_loss(
        model, params, outputs, batch["targets"], batch["loss_mask"],
        head=DecoderLM.logits, chunk_size=chunk_size,
    )  # fmt: skip
    return loss_sum, count, aux_loss, metrics


def lm_loss(
    model: nn.Module,
    params: Any,
    batch: Batch,
    rngs: dict | None = None,
    *,
    loss_chunk_size: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean next-token cross-entropy of ``model`` (a DecoderLM) on a packed batch, and the
    target count.

    ``batch``: the text fields of the batch contract (``data/batch.py``), each [B, N].
    ``loss_chunk_size`` > 0 computes the logits that many positions at a time, never all
    [B, N, V] at once (``losses.chunked_cross_entropy_loss``; config ``model.loss_chunk_size``).
    """
    loss_sum, count, _, _ = _lm_sums(model, params, batch, rngs, loss_chunk_size)
    return loss_sum / jnp.maximum(count, 1.0), count


def lm_objective(
    model: nn.Module,
    params: Any,
    batch: Batch,
    rngs: dict | None = None,
    *,
    loss_chunk_size: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
    """The training objective: ``lm_loss`` plus the weighted MoE auxiliary loss.

    Returns (objective, target count, MoE metrics); without MoE layers the objective is
    ``lm_loss`` and the metrics are empty. ``loss_chunk_size`` as ``lm_loss``.
    """
    loss_sum, count, aux_loss, metrics = _lm_sums(model, params, batch, rngs, loss_chunk_size)
    return loss_sum / jnp.maximum(count, 1.0) + aux_loss, count, metrics


def _micro_batches(batch: Batch, accumulation_steps: int) -> Batch:
    """[B, ...] leaves -> [accumulation_steps, B / accumulation_steps, ...]."""

    def split(x):
        if x.shape[0] % accumulation_steps:
            raise ValueError(
                f"batch leading dim {x.shape[0]} is not divisible by "
                f"accumulation_steps={accumulation_steps}"
            )
        return x.reshape((accumulation_steps, x.shape[0] // accumulation_steps) + x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


def make_grouped_train_step(
    loss_fn: SumLossFn,
    grouped_optimizer: GroupedOptimizer,
    accumulation_steps: int = 1,
    project_trainable: Callable[[Any], Any] | None = None,
) -> Callable[[GroupedTrainState, Batch, jax.Array], tuple[GroupedTrainState, dict]]:
    """Returns the pure ``step(state, batch, rng) -> (state, metrics)`` over param groups.

    ``loss_fn(params, batch, rng) -> (loss_sum, num_targets)`` returns sums (not a mean), so
    summing over ``accumulation_steps`` micro-batches of the [B, ...] batch (``lax.scan``) and
    dividing once by the total target count equals one step on the whole batch. A loss_fn may
    return a third element, a dict of scalar metrics (MoE load, drops): they are averaged over
    the micro-batches and returned among the step's metrics. Gradients are
    taken w.r.t. ``state.trainable`` only and accumulated in the params' dtype; the loss in
    float32. Micro-batch i draws ``fold_in(fold_in(rng, step), i)``. ``project_trainable``
    maps the updated trainable params back onto their feasible set after every update (e.g.
    FuseMix clamps its learnable temperature into range), inside the compiled step.

    A step whose loss or any gradient is non-finite returns ``state`` unchanged, so a bad batch
    never reaches the params, the optimizer moments or a checkpoint; ``check_finite`` then
    raises on the host. Metrics: ``loss``, ``num_targets``, ``grad_norm``,
    ``learning_rate/<group>``, ``finite`` (bool) and ``grads_finite`` (a bool per trainable
    leaf, shaped like ``state.trainable``).
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")

    def sums_and_grads(trainable, frozen, batch, rng):
        def loss_sum_of(trainable):
            loss_sum, count, *extra = loss_fn(combine_params(trainable, frozen), batch, rng)
            extra_metrics = extra[0] if extra else {}
            return loss_sum.astype(jnp.float32), (count.astype(jnp.float32), extra_metrics)

        (loss_sum, (count, extra_metrics)), grads = jax.value_and_grad(loss_sum_of, has_aux=True)(
            trainable
        )
        return loss_sum, count, grads, extra_metrics

    def step(state: GroupedTrainState, batch: Batch, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        if accumulation_steps == 1:
            loss_sum, count, grads, extra_metrics = sums_and_grads(
                state.trainable, state.frozen, batch, step_rng
            )
        else:

            def accumulate(carry, micro):
                index, micro_batch = micro
                micro_rng = jax.random.fold_in(step_rng, index)
                sums = sums_and_grads(state.trainable, state.frozen, micro_batch, micro_rng)
                return jax.tree_util.tree_map(jnp.add, carry, sums), None

            micro = (jnp.arange(accumulation_steps), _micro_batches(batch, accumulation_steps))
            first = jax.tree_util.tree_map(lambda x: x[0], micro[1])
            shapes = jax.eval_shape(sums_and_grads, state.trainable, state.frozen, first, step_rng)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (loss_sum, count, grads, extra_metrics), _ = jax.lax.scan(accumulate, zeros, micro)
            extra_metrics = {k: v / accumulation_steps for k, v in extra_metrics.items()}

        denominator = jnp.maximum(count, 1.0)
        loss = loss_sum / denominator
        grads = jax.tree_util.tree_map(lambda g: g / denominator.astype(g.dtype), grads)
        grads_finite = jax.tree_util.tree_map(lambda g: jnp.all(jnp.isfinite(g)), grads)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(jax.tree_util.tree_leaves(grads_finite)))

        updates, opt_state = grouped_optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        if project_trainable is not None:
            trainable = project_trainable(trainable)
        updated = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), updated, state
        )
        metrics = {
            "loss": loss,
            "num_targets": count,
            "grad_norm": optax.tree.norm(grads),
            "finite": finite,
            "grads_finite": grads_finite,
            **extra_metrics,
        }
        for name, rate in grouped_optimizer.learning_rates(state.step).items():
            metrics[f"learning_rate/{name}"] = rate
        return new_state, metrics

    return step


def check_finite(metrics: dict, step: int) -> None:
    """Raises if a grouped train step saw a non-finite loss or gradient (host side).

    ``metrics``: the metrics of ``make_grouped_train_step`` (``finite``, ``grads_finite``,
    ``loss``). The step itself already left the state unchanged.

    Raises:
      FloatingPointError: naming ``step`` and the parameter paths whose gradient is non-finite.
    """
    if bool(metrics["finite"]):
        return
    flat = traverse_util.flatten_dict(jax.device_get(metrics["grads_finite"]), sep="/")
    paths = sorted(path for path, ok in flat.items() if not bool(ok))
    named = paths[:MAX_NAMED_PATHS]
    more = f" and {len(paths) - len(named)} more" if len(paths) > len(named) else ""
    raise FloatingPointError(
        f"step {step}: non-finite loss or gradients in {named}{more} "
        f"(loss={float(metrics['loss'])}); the update was not applied"
    )


def make_eval_step(model: nn.Module, loss_chunk_size: int = 0) -> Callable[[Any, Batch], dict]:
    """Returns ``eval_step(params, batch) -> {"loss_sum", "num_targets"}`` for exact averaging.

    ``loss_chunk_size`` as ``lm_loss``.
    """

    def eval_step(params: Any, batch: Batch):
        loss, count = lm_loss(model, params, batch, loss_chunk_size=loss_chunk_size)
        return {"loss_sum": loss * count, "num_targets": count}

    return eval_step


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of [B, ...] input arrays: the batch dimension follows the ``act_batch`` rule."""
    return nn.logical_to_mesh_sharding(PartitionSpec("act_batch"), mesh, rules)


def check_batch_size(
    batch_size: int,
    mesh: Mesh,
    rules: LogicalRules,
    *,
    field: str,
    accumulation_steps: int = 1,
) -> None:
    """Raises ValueError naming the config ``field`` unless the global ``batch_size`` splits
    evenly over the hosts, the data-parallel mesh axes and into ``accumulation_steps``
    micro-batches: what the first step would otherwise find, after compiling.
    """
    sharding = batch_sharding(mesh, rules)
    entry = sharding.spec[0] if len(sharding.spec) else None
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    ways = math.prod(mesh.shape[axis] for axis in axes)
    hosts = jax.process_count()
    multiple = math.lcm(ways, hosts, accumulation_steps)
    if batch_size < 1 or batch_size % multiple:
        nearest = max(multiple, batch_size // multiple * multiple)
        raise ValueError(
            f"{field}={batch_size}: the {ways}-way batch sharding {sharding.spec} over "
            f"{hosts} host(s) with accumulation_steps={accumulation_steps} cannot split it "
            f"evenly; make it a multiple of {multiple} (e.g. {nearest})"
        )
