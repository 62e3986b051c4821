"""The learning-rate schedule (linear warmup, cosine decay) and the weight-decay mask of AdamW.

``param_groups.make_grouped_optimizer`` builds the optimizer from them."""

from __future__ import annotations

from typing import Any

import jax
import optax


def make_learning_rate_schedule(optimizer_config: Any, num_steps: int) -> optax.Schedule:
    """0 -> peak linearly over ``warmup_steps``, then cosine to ``peak * end_fraction``."""
    peak = optimizer_config.learning_rate
    warmup = optimizer_config.warmup_steps
    if not 0 <= warmup < num_steps:
        raise ValueError(f"optimizer.warmup_steps={warmup} must be in [0, num_steps={num_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=num_steps,
        end_value=peak * optimizer_config.end_learning_rate_fraction,
    )


def matrices_only(params: Any) -> Any:
    """Weight-decay mask: True for arrays with ndim >= 2 (kernels, embeddings), False otherwise."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
