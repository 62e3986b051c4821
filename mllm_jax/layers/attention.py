"""Multi-head dot-product attention with grouped-query heads and rotary positions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.layers.lora import AdapterConfig, make_projection
from mllm_jax.layers.rope import RopeScaling, apply_rope

ATTENTION_BIAS = ("none", "qkv", "all")


def dot_product_attention(
    query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, mask: jnp.ndarray | None
) -> jnp.ndarray:
    """softmax(q k^T / sqrt(D) masked) v with query heads grouped over shared key/value heads.

    Args:
      query: [B, N, H, D]; H must be a multiple of the key/value head count K.
      key: [B, S, K, D].
      value: [B, S, K, D].
      mask: [B, 1, N, S] bool (True = may attend), or None for full attention.

    Returns:
      [B, N, H, D]. Logits and softmax are float32. A query row with no allowed key (padding)
      gets uniform weights instead of NaN; callers mask such positions out of the loss.
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} kv heads")
    groups = num_heads // num_kv_heads
    query = query.reshape(batch, length, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("bnkgd,bskd->bkgns", query, key, preferred_element_type=jnp.float32)
    logits = logits * (head_dim**-0.5)
    if mask is not None:
        logits = jnp.where(mask[:, :, None, :, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgns,bskd->bnkgd", weights, value)
    return out.reshape(batch, length, num_heads, head_dim)


class MultiHeadAttention(nn.Module):
    """Self-attention: q/k/v projections, RoPE on q and k, grouped-query attention, out projection.

    Attributes:
      num_heads: query heads H.
      num_kv_heads: key/value heads K (K = H is multi-head, K = 1 multi-query).
      head_dim: D per head.
      use_rope: rotate q and k by token position.
      rope_max_wavelength: RoPE base.
      rope_scaling: an optional rescaling of the RoPE frequencies (Llama 3.1, linear).
      decode: keep keys/values in a ``cache`` collection for incremental decoding.
      adapter: LoRA / Dual-LoRA on the projections it targets (``query``, ``key``, ``value``,
        ``out``); their adapter params sit beside ``kernel``.
      bias: which projections carry a bias: "none" (Llama), "qkv" (Qwen2) or "all" (CLIP,
        SigLIP); a bias is ``<projection>/bias`` shaped like the kernel's output dimensions.

    Parameters (logical axes): ``query/kernel`` [embed, heads, head_dim], ``key/kernel`` and
    ``value/kernel`` [embed, kv_heads, head_dim], ``out/kernel`` [heads, head_dim, embed].
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_rope: bool = True
    rope_max_wavelength: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    adapter: AdapterConfig = AdapterConfig(kind="none")
    decode: bool = False
    bias: str = "none"

    def _projection(self, name: str, heads: int, head_axis: str, embed_dim: int) -> nn.Module:
        if self.bias not in ATTENTION_BIAS:
            raise ValueError(f"attention bias {self.bias!r} is not one of {ATTENTION_BIAS}")
        return make_projection(
            name,
            shape=(embed_dim, heads, self.head_dim),
            logical_axes=("embed", head_axis, "head_dim"),
            in_axis=0,
            out_axis=(1, 2),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            use_bias=self.bias != "none",
        )

    def _update_cache(self, key: jnp.ndarray, value: jnp.ndarray):
        """Writes this call's keys/values at ``cache_index`` and returns the whole cache.

        The first (``init``) call only creates the cache, shaped like its inputs: initialise
        with a sequence as long as prompt + new tokens. Later calls append T positions.
        """
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:
            return key, value
        start = (0, index.value, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        index.value = index.value + key.shape[1]
        return cached_key.value, cached_value.value

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, mask: jnp.ndarray | None, positions: jnp.ndarray
    ) -> jnp.ndarray:
        """x [B, N, E], mask [B, 1, N, S] bool, positions [B, N] -> [B, N, E].

        S = N for training; with ``decode`` S is the cache length and the mask says which
        cached positions each new query may see (see ``models/generation.py``).
        """
        embed_dim = x.shape[-1]
        query = self._projection("query", self.num_heads, "heads", embed_dim)("bne,ehd->bnhd", x)
        key = self._projection("key", self.num_kv_heads, "kv_heads", embed_dim)("bne,ehd->bnhd", x)
        value = self._projection("value", self.num_kv_heads, "kv_heads", embed_dim)(
            "bne,ehd->bnhd", x
        )
        if self.use_rope:
            query = apply_rope(query, positions, self.rope_max_wavelength, self.rope_scaling)
            key = apply_rope(key, positions, self.rope_max_wavelength, self.rope_scaling)
        query = nn.with_logical_constraint(query, ("act_batch", "act_length", "act_heads", None))
        key = nn.with_logical_constraint(key, ("act_batch", "act_length", "act_kv_heads", None))
        value = nn.with_logical_constraint(value, ("act_batch", "act_length", "act_kv_heads", None))
        if self.decode:
            key, value = self._update_cache(key, value)
        out = dot_product_attention(query, key, value, mask)
        return make_projection(
            "out",
            shape=(self.num_heads, self.head_dim, embed_dim),
            logical_axes=("heads", "head_dim", "embed"),
            in_axis=(0, 1),
            out_axis=2,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            use_bias=self.bias == "all",
        )("bnhd,hde->bne", out)
