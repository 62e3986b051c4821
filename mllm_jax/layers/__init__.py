"""Reusable Flax Linen layers. Every parameter carries logical axis names."""

from mllm_jax.layers.attention import MultiHeadAttention, dot_product_attention
from mllm_jax.layers.bilinear import bilinear_sample
from mllm_jax.layers.cross_attention import (
    CrossAttention,
    GatedCrossAttentionBlock,
    make_cross_attention_mask,
)
from mllm_jax.layers.embed import Embedder
from mllm_jax.layers.image_tokens import insert_image_tokens
from mllm_jax.layers.lora import AdapterConfig, DualLoRAEinsum, LoRAEinsum, make_projection
from mllm_jax.layers.lora_params import (
    ADAPTER_PARAM_REGEX,
    adapter_param_count,
    count_adapter_params,
    is_adapter_param,
    merge_lora,
    split_adapter_params,
    unmerge_lora,
)
from mllm_jax.layers.masks import (
    bidirectional_mask_ar,
    causal_mask_ar,
    make_attention_mask,
    positions_from_segment_ids,
    prefix_mask_ar,
)
from mllm_jax.layers.mlp import MLP
from mllm_jax.layers.moe import MoEConfig, MoEFeedForward, summarize_moe
from mllm_jax.layers.norms import LayerNorm, RMSNorm, make_norm
from mllm_jax.layers.projectors import Linear, MLPProjector
from mllm_jax.layers.rope import RopeScaling, apply_rope, rope_inverse_frequencies
from mllm_jax.layers.transformer import (
    DecoderStack,
    TransformerBlock,
    TransformerConfig,
    unstack_scanned_layers,
)
from mllm_jax.layers.vce import VCEConfig, VCEProjector, VisualCueEnhancement
from mllm_jax.layers.vit import PooledVisionTransformer, VisionTransformer, ViTConfig

__all__ = [
    "ADAPTER_PARAM_REGEX",
    "AdapterConfig",
    "DualLoRAEinsum",
    "LoRAEinsum",
    "adapter_param_count",
    "count_adapter_params",
    "is_adapter_param",
    "make_projection",
    "merge_lora",
    "split_adapter_params",
    "unmerge_lora",
    "MLP",
    "MoEConfig",
    "MoEFeedForward",
    "summarize_moe",
    "CrossAttention",
    "GatedCrossAttentionBlock",
    "Linear",
    "MLPProjector",
    "PooledVisionTransformer",
    "VCEConfig",
    "VCEProjector",
    "ViTConfig",
    "VisionTransformer",
    "VisualCueEnhancement",
    "bilinear_sample",
    "insert_image_tokens",
    "make_cross_attention_mask",
    "DecoderStack",
    "Embedder",
    "LayerNorm",
    "MultiHeadAttention",
    "RMSNorm",
    "RopeScaling",
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
    "rope_inverse_frequencies",
    "unstack_scanned_layers",
]
