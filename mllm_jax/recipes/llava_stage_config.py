"""What every LLaVA recipe stage derives from the config alone: its seed, its per-host batch
size and the config it records with its checkpoints."""

from __future__ import annotations

from typing import Any

import jax

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
