"""Decoder-only language model: embedding, transformer stack, tied or untied output head."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.layers.einsum import Einsum
from mllm_jax.layers.embed import Embedder
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.masks import (
    causal_mask_ar,
    make_attention_mask,
    positions_from_segment_ids,
)
from mllm_jax.layers.moe import MoEConfig
from mllm_jax.layers.transformer import DecoderStack, TransformerConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ADAPTER_KEYS = ("kind", "rank", "alpha", "dropout", "targets", "num_experts", "top_k")


def _adapter_config_from(section: Any) -> AdapterConfig:
    """AdapterConfig from a ``model.adapter`` section with keys among ``_ADAPTER_KEYS``."""
    fields = dict(section)
    unknown = sorted(set(fields) - set(_ADAPTER_KEYS))
    if unknown:
        raise ValueError(f"model.adapter has unknown keys {unknown}; expected {_ADAPTER_KEYS}")
    return AdapterConfig(**fields)


def _moe_config_from(section: Any) -> MoEConfig | None:
    """MoEConfig from a ``model.moe`` section (fields of ``MoEConfig``); None if num_experts=0."""
    fields = dict(section)
    known = [f.name for f in dataclasses.fields(MoEConfig)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"model.moe has unknown keys {unknown}; expected {known}")
    if fields.get("num_experts", 0) == 0:
        return None
    return MoEConfig(**fields)


def transformer_config_from(model_config: Any) -> TransformerConfig:
    """Builds a TransformerConfig from the ``model`` section of an experiment config.

    An optional ``model.adapter`` section configures LoRA / Dual-LoRA (absent: no adapter); an
    optional ``model.moe`` section sparse MoE feed-forwards (absent or ``num_experts=0``: dense).
    """
    for key in ("dtype", "param_dtype"):
        if model_config[key] not in _DTYPES:
            raise ValueError(f"model.{key}={model_config[key]!r}; expected one of {list(_DTYPES)}")
    return TransformerConfig(
        num_layers=model_config.num_layers,
        num_heads=model_config.num_heads,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        mlp_dim=model_config.mlp_dim,
        mlp_activation=model_config.mlp_activation,
        norm=model_config.norm,
        norm_epsilon=model_config.norm_epsilon,
        use_rope=True,
        rope_max_wavelength=model_config.rope_max_wavelength,
        scan_layers=model_config.scan_layers,
        remat_policy=model_config.remat_policy,
        dtype=_DTYPES[model_config.dtype],
        param_dtype=_DTYPES[model_config.param_dtype],
        adapter=(
            _adapter_config_from(model_config.adapter)
            if "adapter" in model_config
            else AdapterConfig(kind="none")
        ),
        moe=_moe_config_from(model_config.moe) if "moe" in model_config else None,
    )


class DecoderLM(nn.Module):
    """Token ids (or embeddings) -> next-token logits.

    Attributes:
      vocab_size: V.
      embed_dim: E.
      transformer: hyper-parameters of the block stack.
      tie_embeddings: reuse the input embedding as output projection; otherwise a separate
        ``lm_head`` kernel [embed, vocab].

    Methods beyond ``__call__`` (for multimodal models and generation, via ``method=``):
    ``embed`` (ids -> embeddings), ``hidden_states`` (embeddings -> final-norm states),
    ``logits`` (states -> logits) and ``decode`` (embeddings -> logits).
    """

    vocab_size: int
    embed_dim: int
    transformer: TransformerConfig
    tie_embeddings: bool = True

    def setup(self):
        cfg = self.transformer
        self.embedder = Embedder(
            self.vocab_size, self.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.decoder = DecoderStack(cfg)
        if not self.tie_embeddings:
            self.lm_head = Einsum(
                shape=(self.embed_dim, self.vocab_size),
                logical_axes=("embed", "vocab"),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
            )

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """[B, N] ids -> [B, N, E]."""
        return self.embedder.encode(tokens)

    def hidden_states(
        self,
        x: jnp.ndarray,
        *,
        mask_ar: jnp.ndarray | None = None,
        input_mask: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        attention_mask: jnp.ndarray | None = None,
        cross_inputs: jnp.ndarray | None = None,
        cross_mask: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Embeddings [B, N, E] -> final-norm hidden states [B, N, E].

        Args:
          mask_ar: [B, N] attention pattern (see ``make_attention_mask``); default causal.
          input_mask: [B, N] bool, False on padding.
          segment_ids: [B, N] packed-sequence ids.
          positions: [B, N]; default ``arange(N)``, restarted per segment when packed.
          attention_mask: [B, 1, N, S] bool, given explicitly instead of the three above
            (generation with a KV cache of length S).
          cross_inputs, cross_mask: image tokens [B, C, E'] and [B, 1, N, C] for a stack
            with gated cross-attention.
        """
        batch, length = x.shape[:2]
        if positions is None:
            positions = (
                positions_from_segment_ids(segment_ids)
                if segment_ids is not None
                else jnp.broadcast_to(jnp.arange(length), (batch, length))
            )
        if attention_mask is None:
            if mask_ar is None:
                mask_ar = causal_mask_ar(batch, length)
            attention_mask = make_attention_mask(mask_ar, input_mask, segment_ids)
        return self.decoder(x, attention_mask, positions, cross_inputs, cross_mask)

    def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """[B, N, E] hidden states -> [B, N, V] float32 logits."""
        if self.tie_embeddings:
            logits = self.embedder.decode(hidden)
        else:
            logits = self.lm_head("bne,ev->bnv", hidden).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))

    def decode(self, x: jnp.ndarray, **kwargs) -> jnp.ndarray:
        """Embeddings [B, N, E] -> logits [B, N, V]; keyword arguments as ``hidden_states``."""
        return self.logits(self.hidden_states(x, **kwargs))

    def __call__(
        self, tokens: jnp.ndarray, *, return_hidden: bool = False, **kwargs
    ) -> jnp.ndarray:
        """[B, N] ids -> [B, N, V] float32 logits; position p scores token p + 1.

        ``return_hidden``: return the final-norm hidden states [B, N, E] instead, for a loss
        that applies ``logits`` to them chunk by chunk (``train.losses``). Other keyword
        arguments as ``hidden_states`` (mask_ar, input_mask, segment_ids, positions).
        """
        x = self.embed(tokens)
        return self.hidden_states(x, **kwargs) if return_hidden else self.decode(x, **kwargs)
