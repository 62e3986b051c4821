"""Flamingo-style gated cross-attention: text tokens attend to the images that precede them.

A ``GatedCrossAttentionBlock`` sits before a decoder block:

  x = x + tanh(gate_attn) * CrossAttn(LN(x), image_tokens) * has_image
  x = x + tanh(gate_mlp)  * MLP(LN(x))                      * has_image

with both gates initialised to 0, so the pretrained decoder is unchanged at the start of
training. ``has_image`` zeroes the update of tokens that may see no image (text before the
first image of its sample), instead of letting them attend to nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.layers.attention import dot_product_attention
from mllm_jax.layers.einsum import Einsum
from mllm_jax.layers.mlp import MLP
from mllm_jax.layers.norms import LayerNorm


def make_cross_attention_mask(
    image_slot: jnp.ndarray, segment_ids: jnp.ndarray, num_slots: int, tokens_per_image: int
) -> jnp.ndarray:
    """Which image tokens each text position may attend to.

    Position t may see image slot m iff that image's first placeholder position is <= t and lies
    in the same packed segment as t (images of other packed samples and later images stay
    hidden).

    Args:
      image_slot: [B, N] slot of the image at each position, -1 for text (batch contract).
      segment_ids: [B, N] packed-sample ids, 0 on padding.
      num_slots: M image slots per row.
      tokens_per_image: P tokens per image.

    Returns:
      [B, 1, N, M * P] bool.
    """
    batch, length = image_slot.shape
    index = jnp.arange(length)
    is_slot = image_slot[:, :, None] == jnp.arange(num_slots)[None, None, :]  # [B, N, M]
    first = jnp.min(jnp.where(is_slot, index[None, :, None], length), axis=1)  # [B, M]
    present = first < length
    slot_segment = jnp.take_along_axis(segment_ids, jnp.minimum(first, length - 1), axis=1)
    visible = (
        present[:, None, :]
        & (first[:, None, :] <= index[None, :, None])
        & (slot_segment[:, None, :] == segment_ids[:, :, None])
        & (segment_ids[:, :, None] > 0)
    )  # [B, N, M]
    visible = jnp.repeat(visible, tokens_per_image, axis=2)
    return visible[:, None, :, :]


class CrossAttention(nn.Module):
    """Multi-head attention with queries from x and keys/values from a second sequence.

    Parameters (logical axes): ``query/kernel`` [embed, heads, head_dim], ``key/kernel`` and
    ``value/kernel`` [embed, heads, head_dim] over the context width, ``out/kernel``
    [heads, head_dim, embed].
    """

    num_heads: int
    head_dim: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def _projection(self, name: str, width: int) -> Einsum:
        return Einsum(
            shape=(width, self.num_heads, self.head_dim),
            logical_axes=("embed", "heads", "head_dim"),
            in_axis=0,
            out_axis=(1, 2),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """x [B, N, E], context [B, S, C], mask [B, 1, N, S] bool -> [B, N, E]."""
        query = self._projection("query", x.shape[-1])("bne,ehd->bnhd", x)
        key = self._projection("key", context.shape[-1])("bse,ehd->bshd", context)
        value = self._projection("value", context.shape[-1])("bse,ehd->bshd", context)
        out = dot_product_attention(query, key, value, mask)
        return Einsum(
            shape=(self.num_heads, self.head_dim, x.shape[-1]),
            logical_axes=("heads", "head_dim", "embed"),
            in_axis=(0, 1),
            out_axis=2,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )("bnhd,hde->bne", out)


class GatedCrossAttentionBlock(nn.Module):
    """tanh-gated cross-attention + MLP residual update (gates start at 0: identity at init)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def _gate(self, name: str) -> jnp.ndarray:
        gate = self.param(
            name, nn.with_logical_partitioning(nn.initializers.zeros, ()), (), self.param_dtype
        )
        return jnp.tanh(gate.astype(jnp.float32)).astype(self.dtype)

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """x [B, N, E], context (image tokens) [B, S, C], mask [B, 1, N, S] -> [B, N, E]."""
        has_image = jnp.any(mask[:, 0], axis=-1, keepdims=True).astype(self.dtype)  # [B, N, 1]
        norm = lambda name: LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        attended = CrossAttention(
            self.num_heads, self.head_dim, self.dtype, self.param_dtype, name="cross_attention"
        )(norm("pre_attention_norm")(x), context, mask)
        x = x + self._gate("attention_gate") * attended * has_image
        update = MLP(
            self.mlp_dim, "gelu", dtype=self.dtype, param_dtype=self.param_dtype, name="mlp"
        )(norm("pre_mlp_norm")(x))
        return x + self._gate("mlp_gate") * update * has_image
