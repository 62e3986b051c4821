"""The learning-rate schedule (linear warmup, cosine decay), the weight-decay mask of AdamW and
the check of an ``optimizer`` config section.

``param_groups.make_grouped_optimizer`` builds the optimizer from them."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import optax

# field -> (lowest, highest, whether each bound is allowed, what the field is)
_OPTIMIZER_FIELDS = {
    "learning_rate": (0.0, math.inf, (False, False), "the peak learning rate"),
    "end_learning_rate_fraction": (0.0, 1.0, (True, True), "the final fraction of the peak"),
    "b1": (0.0, 1.0, (True, False), "Adam's first-moment decay"),
    "b2": (0.0, 1.0, (True, False), "Adam's second-moment decay"),
    "eps": (0.0, math.inf, (False, False), "Adam's denominator floor"),
    "weight_decay": (0.0, math.inf, (True, False), "the decoupled weight decay"),
    "grad_clip_norm": (0.0, math.inf, (False, False), "the global gradient-norm clip"),
}


def _interval(low: float, high: float, closed: tuple[bool, bool]) -> str:
    return f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"


def check_learning_rate(value: Any, name: str) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a finite number > 0."""
    if not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name}={value!r} must be a finite number > 0 (a peak learning rate)")


def check_optimizer_config(optimizer_config: Any, section: str = "optimizer") -> None:
    """Raises ValueError naming the first ``{section}.<field>`` outside its range: a positive
    learning rate, betas in [0, 1), eps and the clip norm > 0, weight decay >= 0, the end
    fraction in [0, 1], warmup steps >= 0. Fields the config lacks are not checked."""
    for name, (low, high, closed, meaning) in _OPTIMIZER_FIELDS.items():
        value = getattr(optimizer_config, name, None)
        if value is None:
            continue
        above = value >= low if closed[0] else value > low
        below = value <= high if closed[1] else value < high
        if not isinstance(value, numbers.Real) or not (above and below):
            raise ValueError(
                f"{section}.{name}={value!r} must be in {_interval(low, high, closed)} ({meaning})"
            )
    warmup = getattr(optimizer_config, "warmup_steps", None)
    if warmup is not None and (not isinstance(warmup, numbers.Integral) or warmup < 0):
        raise ValueError(f"{section}.warmup_steps={warmup!r} must be an integer >= 0")


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
