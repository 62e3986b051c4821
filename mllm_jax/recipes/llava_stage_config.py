"""What every LLaVA recipe stage derives from the config alone: its seed, its per-host batch
size, the config it records with its checkpoints, and the check of its config section."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from mllm_jax.train.optimizer import check_learning_rate, check_optimizer_config
from mllm_jax.train.step import check_batch_size
from mllm_jax.train.trainer import check_training_config

STAGE_SEEDS = {"stage0_vision": 0, "stage0_lm": 1, "stage1": 2, "stage2": 3}


def stage_seed(config: Any, stage: str) -> int:
    """The seed of ``stage``'s init, data order and dropout: distinct per stage and
    ``config.seed``."""
    return config.seed * 100 + STAGE_SEEDS[stage]


def per_process(batch_size: int) -> int:
    """This host's share of a global ``batch_size``; ValueError unless the hosts divide it."""
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size {batch_size} is not divisible by {jax.process_count()} hosts")
    return batch_size // jax.process_count()


def config_json(config: Any) -> dict:
    """The config as the plain dict a stage records."""
    return config.to_dict()


IMAGE_STAGES = ("stage1", "stage2")  # stages whose samples carry images


def check_stage_section(
    config: Any,
    stage: str,
    *,
    mesh: jax.sharding.Mesh,
    rules: Any,
    tokens_per_image: int,
) -> None:
    """Raises ValueError naming the first field of ``stage`` (or of the shared ``training`` /
    ``optimizer`` sections) that cannot train: run before any stage compiles, so a bad value in
    stage 2 is not found after stages 0 and 1 have trained.

    Checks steps, warmup, every ``*learning_rate``, the batch size against the hosts, the mesh
    and ``training.accumulation_steps``, and, for stages with images, that ``seq_len`` holds an
    image's ``tokens_per_image`` tokens with room for text.
    """
    section = config[stage]
    num_steps = int(section.num_steps)
    if num_steps < 1:
        raise ValueError(f"{stage}.num_steps={num_steps} must be >= 1")
    if not 0 <= int(section.warmup_steps) < num_steps:
        raise ValueError(
            f"{stage}.warmup_steps={section.warmup_steps} must be in [0, {stage}.num_steps="
            f"{num_steps})"
        )
    training = ml_collections.ConfigDict(config.training.to_dict())
    training.num_steps = num_steps
    check_training_config(training)
    check_optimizer_config(config.optimizer)
    for name, value in section.items():
        if name.endswith("learning_rate"):
            check_learning_rate(value, f"{stage}.{name}")
    check_batch_size(
        int(section.batch_size), mesh, rules, field=f"{stage}.batch_size",
        accumulation_steps=int(config.training.get("accumulation_steps", 1)),
    )  # fmt: skip
    if stage in IMAGE_STAGES and int(section.seq_len) <= tokens_per_image:
        raise ValueError(
            f"{stage}.seq_len={section.seq_len} cannot hold one image: the model turns each "
            f"image into {tokens_per_image} tokens; raise {stage}.seq_len well above "
            f"{tokens_per_image} (the image's tokens plus the question and answer)"
        )
