"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_filter(logits: jnp.ndarray, top_p: float) -> jnp.ndarray:
    """Keeps the smallest set of highest-probability tokens whose probability sums to >= top_p.

    Args:
      logits: [B, V] float.
      top_p: in (0, 1]; 1 keeps everything.

    Returns:
      [B, V] logits with the tokens outside the nucleus set to -inf (the most likely token is
      always kept).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    # Probability mass strictly before each sorted token: keep a token while that is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    num_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_logits, (num_keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_next_token(
    logits: jnp.ndarray, rng: jax.Array, *, temperature: float = 0.0, top_p: float = 1.0
) -> jnp.ndarray:
    """[B, V] logits -> [B] int32 token ids; temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        scaled = top_p_filter(scaled, top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
