"""Training losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_cross_entropy(
    logits: jnp.ndarray,
    tokens: jnp.ndarray,
    loss_mask: jnp.ndarray,
    segment_ids: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Summed cross-entropy of predicting ``tokens[:, t+1]`` from ``logits[:, t]``.

    Args:
      logits: [B, N, V].
      tokens: [B, N] int ids.
      loss_mask: [B, N], 1 where the token is a target (its prediction counts).
      segment_ids: [B, N] packed-sequence ids; a prediction across a segment boundary never counts.

    Returns:
      (sum of per-target negative log-likelihoods, number of targets), both float32 scalars.
    """
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    if segment_ids is not None:
        weights = weights * (segment_ids[:, 1:] == segment_ids[:, :-1])
    return jnp.sum(nll * weights), jnp.sum(weights)
