"""Model configs of the LLaVA + VCE recipe, built from the ml_collections config
(``configs/llava_vce.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.vce import VCEConfig
from mllm_jax.layers.vit import ViTConfig
from mllm_jax.models.decoder_lm import DecoderLM, transformer_config_from
from mllm_jax.models.multimodal_lm import MultimodalConfig


def compute_dtypes(config: Any) -> dict[str, Any]:
    """``model.dtype`` / ``model.param_dtype`` as jnp dtypes, for the ViT and the VCE as well
    as the LM: ``dtype="bfloat16"`` computes in bfloat16 with float32 params (TPU's fast path)."""
    names = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    for key, name in names.items():
        if name not in ("float32", "bfloat16"):
            raise ValueError(f"model.{key}={name!r}; expected 'float32' or 'bfloat16'")
    return {key: jnp.dtype(name) for key, name in names.items()}


def vit_config(config: Any) -> ViTConfig:
    """The vision tower: ``config.vision`` at ``config.data.image_size``, in ``model.dtype``."""
    v = config.vision
    return ViTConfig(
        image_size=config.data.image_size,
        patch_size=v.patch_size,
        width=v.width,
        num_layers=v.num_layers,
        num_heads=v.num_heads,
        mlp_dim=v.mlp_dim,
        use_cls_token=v.use_cls_token,
        **compute_dtypes(config),
    )


def adapter_config(config: Any) -> AdapterConfig:
    """The adapter of the final stage (``config.model.adapter``)."""
    return AdapterConfig(**dict(config.model.adapter))


def multimodal_config(config: Any, *, with_adapter: bool) -> MultimodalConfig:
    """ViT -> projector (VCE or MLP) -> decoder; the decoder's adapters only if asked."""
    transformer = transformer_config_from(config.model)
    if not with_adapter:
        transformer = dataclasses.replace(transformer, adapter=AdapterConfig(kind="none"))
    vce = None
    if config.model.projector == "vce":
        c = config.vce
        vce = VCEConfig(
            level_indices=tuple(c.level_indices),
            num_heads=c.num_heads,
            num_points=c.num_points,
            normalize_output=c.normalize_output,
            **compute_dtypes(config),
        )
    return MultimodalConfig(
        vocab_size=config.model.vocab_size,
        embed_dim=config.model.embed_dim,
        transformer=transformer,
        vision=vit_config(config),
        tie_embeddings=config.model.tie_embeddings,
        projector=config.model.projector,
        vce=vce,
        fusion=config.model.fusion,
        freeze_vision=True,
    )


def text_decoder(config: Any) -> DecoderLM:
    """The LM alone, without adapters: its params are a MultimodalLM's ``lm`` subtree."""
    transformer = dataclasses.replace(
        transformer_config_from(config.model), adapter=AdapterConfig(kind="none")
    )
    return DecoderLM(
        vocab_size=config.model.vocab_size,
        embed_dim=config.model.embed_dim,
        transformer=transformer,
        tie_embeddings=config.model.tie_embeddings,
    )
