"""FuseMix training on cached latents: adapters, AdamW, the clamped temperature, evaluation.

  latent caches (data/latent_cache.py) -> Grain batches {"image" [B, d_x], "text" [B, d_y]}
  -> jitted, donating step: FuseMix loss (train/fusemix_loss.py) -> clipped AdamW (warmup +
     cosine, weight decay on matrices only) -> τ put back into [0.001, 0.5]
  -> evaluation on held-out caches: Recall@1/5/10 both ways and zero-shot accuracy

The batch is split over a 1-D data mesh of all devices; params and optimizer state are
replicated (the adapters are small). A budget smaller than the batch trains on batches of its
whole (even) size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import sharding
from mllm_jax.data.latent_cache import LatentCache, LatentOptions, make_latent_dataset
from mllm_jax.models.fusion_adapter import AdapterConfig, FuseMixModel, clamp_temperature
from mllm_jax.train.fusemix_loss import make_fusemix_loss
from mllm_jax.train.param_groups import GroupedOptimizer, ParamGroup, make_grouped_optimizer
from mllm_jax.train.progress import ProgressBar
from mllm_jax.train.retrieval import retrieval_metrics, zero_shot_accuracy
from mllm_jax.train.state import GroupedTrainState
from mllm_jax.train.step import check_finite, make_grouped_train_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class FuseMixConfig:
    """One training run (paper defaults where they fit a CPU: see docs/fusemix.md)."""

    adapter: AdapterConfig = AdapterConfig()
    mix: bool = True
    alpha: float = 1.0
    batch_size: int = 1024
    num_steps: int = 500
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 25
    end_learning_rate_fraction: float = 0.0
    grad_clip_norm: float = 1.0
    seed: int = 0


def optimizer_config(config: FuseMixConfig) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            end_learning_rate_fraction=config.end_learning_rate_fraction,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=config.weight_decay,
            grad_clip_norm=config.grad_clip_norm,
        )
    )


def make_fusemix_train_step(model: FuseMixModel, grouped: GroupedOptimizer, config: FuseMixConfig):
    """Pure ``step(state, batch, rng) -> (state, metrics)``: grouped step, then τ clamped."""
    grouped_step = make_grouped_train_step(
        make_fusemix_loss(model, alpha=config.alpha, mix=config.mix), grouped
    )

    def step(state: GroupedTrainState, batch, rng):
        state, metrics = grouped_step(state, batch, rng)
        state = state.replace(trainable=clamp_temperature(state.trainable))
        metrics["temperature"] = state.trainable["temperature"]
        return state, metrics

    return step


def init_fusemix_state(
    model: FuseMixModel, config: FuseMixConfig, image_dim: int, text_dim: int
) -> tuple[GroupedTrainState, GroupedOptimizer]:
    """Step-0 state (everything trainable: one "adapters" group) and its optimizer."""
    groups = [ParamGroup(name="adapters", patterns=(".*",), learning_rate=config.learning_rate)]
    grouped = make_grouped_optimizer(optimizer_config(config), groups, config.num_steps)
    params = model.init(
        jax.random.key(config.seed), jnp.zeros((2, image_dim)), jnp.zeros((2, text_dim))
    )["params"]
    return GroupedTrainState.create(sharding.strip_boxes(params), grouped), grouped


def evaluate_fusemix(model: FuseMixModel, params: Any, cache: LatentCache) -> dict[str, float]:
    """Retrieval Recall@1/5/10 (both ways) and zero-shot accuracy on a held-out cache."""
    latents = cache.arrays()
    embed_images = jax.jit(lambda p, z: model.apply({"params": p}, z, method="embed_images"))
    embed_texts = jax.jit(lambda p, z: model.apply({"params": p}, z, method="embed_texts"))
    images = np.asarray(embed_images(params, latents["image"]))
    classes = np.asarray(embed_texts(params, cache.class_latents))
    prompts = np.asarray(embed_texts(params, cache.prompt_latents))
    metrics = retrieval_metrics(images, classes, latents["label"])
    metrics["zero_shot"] = zero_shot_accuracy(images, prompts, latents["label"])
    return metrics


@dataclasses.dataclass(frozen=True)
class FuseMixResult:
    """Trained params, the mean loss of each logged window, timing and final evaluations."""

    params: Any
    losses: list[float]
    train_seconds: float
    steps_per_second: float
    evaluations: dict[str, dict[str, float]]
    num_pairs: int


def train_fusemix(
    selections: Sequence[tuple[LatentCache, Sequence[int] | None]],
    config: FuseMixConfig,
    *,
    evaluate_on: Mapping[str, LatentCache] | None = None,
    progress: bool = True,
    log_every: int = 50,
) -> FuseMixResult:
    """Trains the adapters on the chosen pairs; evaluates on ``evaluate_on`` at the end."""
    num_pairs = sum(len(c) if i is None else len(i) for c, i in selections)
    mesh = sharding.create_mesh({"data": -1})
    ways = mesh.size
    batch_size = min(config.batch_size, num_pairs - num_pairs % (2 * ways))
    if batch_size < 2 * ways:
        raise ValueError(f"{num_pairs} pairs cannot fill an even batch over {ways} devices")
    cache = selections[0][0]
    model = FuseMixModel(config.adapter)
    state, grouped = init_fusemix_state(
        model, config, cache.meta["image_dim"], cache.meta["text_dim"]
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    step_fn = jax.jit(
        make_fusemix_train_step(model, grouped, config),
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    options = LatentOptions(batch_size=batch_size, seed=config.seed)
    batches = iter(make_latent_dataset(selections, options))
    rng = jax.random.key(config.seed + 1)
    bar = ProgressBar(config.num_steps, description="fusemix") if progress else None
    losses, pending = [], []
    started = time.perf_counter()
    for step in range(1, config.num_steps + 1):
        batch = next(batches)
        batch = jax.device_put({"image": batch["image"], "text": batch["text"]}, batch_sharding)
        state, metrics = step_fn(state, batch, rng)
        if step == 1:
            check_finite(metrics, step)
            compiled_at = time.perf_counter()
        pending.append(metrics)
        # Metrics are read once per window so the host dispatches ahead of the device.
        if step % log_every == 0 or step == config.num_steps:
            for offset, window_metrics in enumerate(pending):
                check_finite(window_metrics, step - len(pending) + 1 + offset)
            losses.append(float(np.mean([float(m["loss"]) for m in pending])))
            if bar is not None:
                bar.update(step, {"loss": losses[-1], "tau": float(pending[-1]["temperature"])})
            pending = []
    jax.block_until_ready(state)
    finished = time.perf_counter()
    if bar is not None:
        bar.close()
    params = grouped.combine(state.trainable, state.frozen)
    evaluations = {
        name: evaluate_fusemix(model, params, held_out)
        for name, held_out in (evaluate_on or {}).items()
    }
    return FuseMixResult(
        params=params,
        losses=losses,
        train_seconds=finished - started,
        steps_per_second=(config.num_steps - 1) / max(finished - compiled_at, 1e-9),
        evaluations=evaluations,
        num_pairs=num_pairs,
    )
