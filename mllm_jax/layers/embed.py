"""Token embedding table that can also serve as the (tied) output projection."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


class Embedder(nn.Module):
    """Looks up token vectors and, when tied, maps hidden states back to vocabulary logits.

    Attributes:
      vocab_size: V rows.
      embed_dim: E columns.

    Parameters (logical axes): ``embedding`` [vocab, embed], initialised N(0, 1/E) so that tied
    logits of a unit-RMS hidden state start with unit variance.
    """

    vocab_size: int
    embed_dim: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.embed_dim**-0.5), ("vocab", "embed")
            ),
            (self.vocab_size, self.embed_dim),
            self.param_dtype,
        )

    def encode(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """[B, N] int -> [B, N, E]."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def decode(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, N, E] -> [B, N, V] logits, x @ embedding^T (float32 accumulation)."""
        return jnp.einsum(
            "bne,ve->bnv", x, self.embedding.astype(self.dtype), preferred_element_type=jnp.float32
        )
