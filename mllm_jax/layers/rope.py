"""Rotary position embeddings (RoPE), half-split convention (as in Llama/Gemma in JAX), with the
context-extension rescalings of the inverse frequencies that released checkpoints use: "linear"
(position interpolation) and "llama3" (Llama 3.1's wavelength-dependent blend).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

ROPE_SCALING_KINDS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A rescaling of the RoPE inverse frequencies (None in a config: the plain geometric ladder).

    Attributes:
      kind: "linear": every frequency divided by ``factor``. "llama3": wavelengths shorter than
        ``original_max_position_embeddings / high_freq_factor`` are kept, those longer than
        ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, and
        those in between blend the two linearly in ``original_max_position_embeddings /
        wavelength``.
      factor: the context-extension factor (> 0).
      low_freq_factor, high_freq_factor: "llama3" only, low < high.
      original_max_position_embeddings: "llama3" only, the pre-training context length.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(f"RoPE scaling kind {self.kind!r} is not one of {ROPE_SCALING_KINDS}")
        if not self.factor > 0:
            raise ValueError(f"RoPE scaling factor must be positive, got {self.factor!r}")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.kind == "llama3" and self.original_max_position_embeddings < 1:
            raise ValueError(
                "llama3 RoPE scaling needs original_max_position_embeddings >= 1, got "
                f"{self.original_max_position_embeddings}"
            )


def rope_inverse_frequencies(
    head_dim: int, max_wavelength: float = 10_000.0, scaling: RopeScaling | None = None
) -> np.ndarray:
    """[D/2] float32 angular frequencies ω_i = max_wavelength^(-2i/D), rescaled by ``scaling``.

    Computed in float64 on the host and rounded once, so they are constants of the program.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = float(max_wavelength) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        context = scaling.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        # 0 at wavelength = context / low_freq_factor (fully scaled), 1 at context /
        # high_freq_factor (unscaled); clipping gives the kept and the divided ranges.
        smooth = (context / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smooth = np.clip(smooth, 0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return inv_freq.astype(np.float32)


def apply_rope(
    x: jnp.ndarray,
    positions: jnp.ndarray,
    max_wavelength: float = 10_000.0,
    scaling: RopeScaling | None = None,
) -> jnp.ndarray:
    """Rotates feature pairs (i, i + D/2) of ``x`` by angle ``position · ω_i``.

    Args:
      x: [B, N, H, D] queries or keys, D even.
      positions: [B, N] integer (or float) token positions.
      max_wavelength: the base of the geometric frequency ladder.
      scaling: an optional rescaling of the frequencies (``rope_inverse_frequencies``).

    Returns:
      [B, N, H, D] rotated features, in ``x.dtype`` (angles computed in float32).
    """
    inv_freq = jnp.asarray(rope_inverse_frequencies(x.shape[-1], max_wavelength, scaling))
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, N, 1, D/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
