"""Training losses."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.layers.moe import MOE_COLLECTION, summarize_moe


def cross_entropy_loss(
    logits: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Summed masked cross-entropy of ``targets`` under ``logits`` (the batch contract's form).

    Args:
      logits: [B, N, V]; position t scores ``targets[:, t]`` (the next token).
      targets: [B, N] int ids.
      loss_mask: [B, N], 1 where position t is trained (0 on padding, prompts, across segments).

    Returns:
      (sum of masked negative log-likelihoods, sum of the mask), both float32 scalars.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def apply_with_moe_losses(
    model: nn.Module, variables: Any, *args, **kwargs
) -> tuple[Any, jnp.ndarray, dict[str, jnp.ndarray]]:
    """``model.apply(variables, *args, **kwargs)`` that also collects what MoE layers sow.

    Returns (the model's output, the weighted MoE auxiliary loss to add to the mean training
    loss — load balance + router z-loss, float32 scalar, 0 without MoE layers — and the MoE
    metrics of ``layers.moe.summarize_moe``, empty without MoE layers).
    """
    out, state = model.apply(variables, *args, mutable=[MOE_COLLECTION], **kwargs)
    aux_loss, metrics = summarize_moe(state.get(MOE_COLLECTION, {}))
    return out, aux_loss, metrics
