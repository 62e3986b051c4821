"""Placing projected image tokens at their placeholders in an interleaved, packed sequence."""

from __future__ import annotations

import jax.numpy as jnp


def insert_image_tokens(
    text_embeddings: jnp.ndarray,
    image_tokens: jnp.ndarray,
    image_slot: jnp.ndarray,
    image_patch: jnp.ndarray,
) -> jnp.ndarray:
    """Replaces the embedding at every image position by its projected image token.

    Args:
      text_embeddings: [B, N, D] embeddings of the token ids (placeholders included).
      image_tokens: [B, M, P, D] projected tokens of the row's M image slots.
      image_slot: [B, N] slot of the image at each position, -1 for text (batch contract).
      image_patch: [B, N] which of the image's P tokens sits at each position, -1 for text.

    Returns:
      [B, N, D]: ``image_tokens[b, image_slot[b, t], image_patch[b, t]]`` where
      ``image_slot >= 0``, the text embedding elsewhere.
    """
    batch, slots, per_image, width = image_tokens.shape
    flat = image_tokens.reshape(batch, slots * per_image, width)
    index = jnp.maximum(image_slot, 0) * per_image + jnp.maximum(image_patch, 0)
    gathered = jnp.take_along_axis(flat, index[:, :, None], axis=1)
    is_image = (image_slot >= 0)[:, :, None]
    return jnp.where(is_image, gathered.astype(text_embeddings.dtype), text_embeddings)
