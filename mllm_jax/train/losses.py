"""Training losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
