"""Rotary position embeddings (RoPE), half-split convention (as in Llama/Gemma in JAX)."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(
    x: jnp.ndarray, positions: jnp.ndarray, max_wavelength: float = 10_000.0
) -> jnp.ndarray:
    """Rotates feature pairs (i, i + D/2) of ``x`` by angle ``position / max_wavelength^(2i/D)``.

    Args:
      x: [B, N, H, D] queries or keys, D even.
      positions: [B, N] integer (or float) token positions.
      max_wavelength: the base of the geometric frequency ladder.

    Returns:
      [B, N, H, D] rotated features, in ``x.dtype`` (angles computed in float32).
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    half = head_dim // 2
    inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, N, 1, D/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
