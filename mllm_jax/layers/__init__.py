"""Reusable Flax Linen layers. Every parameter carries logical axis names."""

from mllm_jax.layers.attention import MultiHeadAttention, dot_product_attention
from mllm_jax.layers.embed import Embedder
from mllm_jax.layers.masks import (
    bidirectional_mask_ar,
    causal_mask_ar,
    make_attention_mask,
    positions_from_segment_ids,
    prefix_mask_ar,
)
from mllm_jax.layers.mlp import MLP
from mllm_jax.layers.norms import LayerNorm, RMSNorm, make_norm
from mllm_jax.layers.rope import apply_rope
from mllm_jax.layers.transformer import (
    DecoderStack,
    TransformerBlock,
    TransformerConfig,
    unstack_scanned_layers,
)

__all__ = [
    "MLP",
    "DecoderStack",
    "Embedder",
    "LayerNorm",
    "MultiHeadAttention",
    "RMSNorm",
    "TransformerBlock",
    "TransformerConfig",
    "apply_rope",
    "bidirectional_mask_ar",
    "causal_mask_ar",
    "dot_product_attention",
    "make_attention_mask",
    "make_norm",
    "positions_from_segment_ids",
    "prefix_mask_ar",
    "unstack_scanned_layers",
]
