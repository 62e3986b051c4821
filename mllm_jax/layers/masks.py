"""One attention-mask builder: causal, bidirectional, prefix/semi-causal, padded, packed input.

The shape of attention is described per token by ``mask_ar`` (big_vision's convention):
``1`` starts a new block that cannot see later tokens (a causal step), ``0`` joins the block of
the token before it (all tokens of a block see each other). Token q may attend to token k iff
``cumsum(mask_ar)[k] <= cumsum(mask_ar)[q]``. So:

- all ones: causal (every token its own block);
- all zeros: fully bidirectional;
- ``[0]*P + [1]*(N-P)``: prefix-LM over the first P tokens;
- a ``1`` followed by zeros anywhere: a bidirectional span inside a causal sequence (METALM's
  semi-causal spans: a span is one block).

Padding (``input_mask``) and packing (``segment_ids``: tokens attend only within their segment)
are intersected with that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_attention_mask(
    mask_ar: jnp.ndarray,
    input_mask: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Returns the boolean attention mask.

    Args:
      mask_ar: [B, N] int/bool, 1 = starts a causal block, 0 = joins the previous block.
      input_mask: [B, N] bool, True for real tokens, False for padding (optional).
      segment_ids: [B, N] int, packed-sequence ids; attention never crosses ids (optional).

    Returns:
      [B, 1, N, N] bool, ``mask[b, 0, q, k]`` is True where query q may attend to key k.
    """
    if mask_ar.ndim != 2:
        raise ValueError(f"mask_ar must be [B, N], got shape {mask_ar.shape}")
    block = jnp.cumsum(mask_ar.astype(jnp.int32), axis=1)
    mask = block[:, None, :] <= block[:, :, None]
    if input_mask is not None:
        valid = input_mask.astype(bool)
        mask = mask & valid[:, None, :] & valid[:, :, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :] == segment_ids[:, :, None])
    return mask[:, None, :, :]


def causal_mask_ar(batch: int, length: int) -> jnp.ndarray:
    """[B, N] all ones: the fully causal pattern."""
    return jnp.ones((batch, length), jnp.int32)


def bidirectional_mask_ar(batch: int, length: int) -> jnp.ndarray:
    """[B, N] all zeros: every token sees every other token."""
    return jnp.zeros((batch, length), jnp.int32)


def prefix_mask_ar(prefix_lengths: jnp.ndarray, length: int) -> jnp.ndarray:
    """[B, N]: tokens before ``prefix_lengths[b]`` form one bidirectional block, the rest causal."""
    return (jnp.arange(length)[None, :] >= prefix_lengths[:, None]).astype(jnp.int32)


def positions_from_segment_ids(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, N] positions that restart at 0 wherever the segment id changes (packed sequences)."""
    length = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start
