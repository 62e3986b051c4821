"""FuseMix training on cached latents, through the shared trainer (``train/trainer.py``).

  latent caches (data/latent_cache.py) -> Grain batches {"image" [B, d_x], "text" [B, d_y]}
  -> trainer.train: jitted, donating grouped step: FuseMix loss (train/fusemix_loss.py) ->
     clipped AdamW (warmup + cosine, weight decay on matrices only) -> τ put back into
     [0.001, 0.5] (the task's ``project_trainable``, inside the compiled step)
  -> evaluation on held-out caches at the end: Recall@1/5/10 both ways and zero-shot accuracy

The batch is split over a 1-D data mesh of all devices; params and optimizer state are
replicated (the adapters are small: no rule maps their logical axes). A budget smaller than the
batch trains on batches of its whole (even) size. The run gets what every trainer run gets in
its workdir: Orbax checkpoints of params, optimizer and data position, exact resume, SIGTERM
save, TensorBoard/JSONL metrics (τ among them), plots.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mllm_jax import sharding
from mllm_jax.data.latent_cache import LatentCache, LatentOptions, make_latent_dataset
from mllm_jax.models.fusion_adapter import AdapterConfig, FuseMixModel, clamp_temperature
from mllm_jax.train.fusemix_loss import make_fusemix_loss
from mllm_jax.train.log_window import window_step_seconds
from mllm_jax.train.metric_writers import read_run_history
from mllm_jax.train.param_groups import ParamGroup
from mllm_jax.train.retrieval import retrieval_metrics, zero_shot_accuracy
from mllm_jax.train.trainer import TrainTask, train

TASK_NAME = "fusemix"
# Only the batch is split (over all devices); every parameter is replicated.
LOGICAL_RULES: sharding.LogicalRules = (("act_batch", "data"),)

Selections = Sequence[tuple[LatentCache, Sequence[int] | None]]


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


def training_config(
    config: FuseMixConfig, *, log_every: int, checkpoint_every: int, progress: bool
) -> ml_collections.ConfigDict:
    """The ``training`` section ``trainer.train`` reads (evaluation only at the end)."""
    return ml_collections.ConfigDict(
        dict(
            num_steps=config.num_steps,
            log_every=log_every,
            eval_every=0,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=2,
            async_checkpoints=True,
            cpu_peak_flops_per_host=140e9,  # the 2-core host's float32 matmul ceiling
            progress_bar=progress,
        )
    )


class LatentPairStream:
    """Endless {"image" [B, d_x], "text" [B, d_y]} batches of the chosen pairs (this process's
    share): a resumable ``trainer.DataStream`` whose state is the Grain iterator's position."""

    def __init__(self, selections: Selections, batch_size: int, seed: int):
        options = LatentOptions(batch_size=batch_size // jax.process_count(), seed=seed)
        dataset = make_latent_dataset(
            selections, options,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
        self._iterator = iter(dataset)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        return {"image": batch["image"], "text": batch["text"]}

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


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


def fusemix_task(
    config: FuseMixConfig,
    latent_dims: tuple[int, int],
    selections: Selections | None,
    *,
    batch_size: int,
    evaluate_on: Mapping[str, LatentCache] | None = None,
) -> TrainTask:
    """The TrainTask of FuseMix: adapters + τ in one "adapters" group, τ clamped after updates.

    ``latent_dims``: (d_x, d_y). ``selections`` (cache, record indices or None for all) are read
    only by ``train`` (``trainer.prepare_step``, for benchmarks, takes None). The evaluation
    gives ``<name>/<metric>`` for each held-out cache of ``evaluate_on``.
    """
    model = FuseMixModel(config.adapter)
    image_dim, text_dim = latent_dims
    fusemix_loss = make_fusemix_loss(model, alpha=config.alpha, mix=config.mix)

    def loss_fn(params, batch, rng):
        loss_sum, count = fusemix_loss(params, batch, rng)
        # The raw parameter, logged: clamped after every update, it is the τ the loss uses.
        return loss_sum, count, {"temperature": params["temperature"]}

    def evaluate(params) -> dict[str, float]:
        return {
            f"{name}/{metric}": value
            for name, cache in evaluate_on.items()
            for metric, value in evaluate_fusemix(model, params, cache).items()
        }

    return TrainTask(
        name=TASK_NAME,
        init_params=lambda rng: model.init(
            rng, jnp.zeros((2, image_dim)), jnp.zeros((2, text_dim))
        )["params"],
        loss_fn=loss_fn,
        param_groups=[
            ParamGroup(name="adapters", patterns=(".*",), learning_rate=config.learning_rate)
        ],
        make_train_stream=lambda: LatentPairStream(selections, batch_size, config.seed),
        evaluate=evaluate if evaluate_on else None,
        project_trainable=clamp_temperature,
        config=dataclasses.asdict(config),
    )


@dataclasses.dataclass(frozen=True)
class FuseMixResult:
    """Trained params, the mean loss of each logged window, timing and final evaluations.

    ``losses``: the mean loss of each logged window of the whole run (a resumed run's earlier
    windows included; the first window is step 1 alone); ``train_seconds``: wall time of this
    trainer call without the evaluation (compilation included); ``steps_per_second``: over the
    timed log windows after the first (NaN with none); ``evaluations``: {held-out cache:
    {metric: value}}, empty when ``preempted``.
    """

    params: Any
    losses: list[float]
    train_seconds: float
    steps_per_second: float
    evaluations: dict[str, dict[str, float]]
    num_pairs: int
    preempted: bool


def train_fusemix(
    selections: Selections,
    config: FuseMixConfig,
    *,
    workdir: str | pathlib.Path,
    evaluate_on: Mapping[str, LatentCache] | None = None,
    progress: bool = True,
    log_every: int = 50,
    checkpoint_every: int | None = None,
    mesh: Mesh | None = None,
    **train_kwargs,
) -> FuseMixResult:
    """Trains (or resumes) the adapters on the chosen pairs in ``workdir``; evaluates on
    ``evaluate_on`` at the end. ``checkpoint_every`` defaults to only the final save; ``mesh``
    (its "data" axis splits the batch) to all devices; ``train_kwargs`` (``stop_after_steps``,
    ``step_callback``) go to ``trainer.train``.
    """
    num_pairs = sum(len(c) if i is None else len(i) for c, i in selections)
    mesh = mesh or sharding.create_mesh({"data": -1})
    ways = mesh.size
    batch_size = min(config.batch_size, num_pairs - num_pairs % (2 * ways))
    if batch_size < 2 * ways:
        raise ValueError(f"{num_pairs} pairs cannot fill an even batch over {ways} devices")
    meta = selections[0][0].meta
    task = fusemix_task(
        config, (meta["image_dim"], meta["text_dim"]), selections,
        batch_size=batch_size, evaluate_on=evaluate_on,
    )  # fmt: skip
    training = training_config(
        config, log_every=log_every, checkpoint_every=checkpoint_every or config.num_steps,
        progress=progress,
    )  # fmt: skip
    started = time.perf_counter()
    result = train(
        task,
        optimizer_config=optimizer_config(config),
        training_config=training,
        mesh=mesh,
        rules=LOGICAL_RULES,
        workdir=workdir,
        seed=config.seed,
        **train_kwargs,
    )
    seconds = time.perf_counter() - started
    history = read_run_history(workdir, result.history)
    final = history[-1] if history and not result.preempted else {}
    this_run = result.history[-1] if result.history else {}
    evaluations: dict[str, dict[str, float]] = {}
    for key, value in final.items():
        if key.startswith("eval_") and "/" in key:
            name, metric = key.removeprefix("eval_").rsplit("/", 1)
            evaluations.setdefault(name, {})[metric] = value
    step_seconds = window_step_seconds(history)
    return FuseMixResult(
        params=result.params,
        losses=[record["loss"] for record in history],
        train_seconds=seconds - this_run.get("eval_seconds", 0.0),
        steps_per_second=1.0 / step_seconds if step_seconds else float("nan"),
        evaluations=evaluations,
        num_pairs=num_pairs,
        preempted=result.preempted,
    )
