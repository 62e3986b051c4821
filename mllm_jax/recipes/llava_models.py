"""Model configs of the LLaVA + VCE recipe, built from the ml_collections config
(``configs/llava_vce.py``), or around an imported checkpoint's (``model.init_from``,
``llava_hf_base.py``), and how its images are prepared."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from mllm_jax.data.hf_image_processor import HFImageProcessor
from mllm_jax.data.images import ImagePreprocessing, ImageProcessor
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.vce import VCEConfig
from mllm_jax.layers.vit import ViTConfig
from mllm_jax.models.decoder_lm import DecoderLM, transformer_config_from
from mllm_jax.models.multimodal_lm import MultimodalConfig
from mllm_jax.recipes import llava_hf_base

# ``config.vision`` fields a from-scratch tower may set beyond the size (configs/llava15_7b.py
# sets CLIP ViT-L's), with ViTConfig's defaults.
_VIT_OPTIONS = ("norm_epsilon", "mlp_activation", "attention_bias", "mlp_bias", "patch_bias",
                "pre_norm")  # fmt: skip


def compute_dtypes(config: Any) -> dict[str, Any]:
    """``model.dtype`` / ``model.param_dtype`` as jnp dtypes, for the ViT and the VCE as well
    as the LM: ``dtype="bfloat16"`` computes in bfloat16 with float32 params (TPU's fast path)."""
    names = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    for key, name in names.items():
        if name not in ("float32", "bfloat16"):
            raise ValueError(f"model.{key}={name!r}; expected 'float32' or 'bfloat16'")
    return {key: jnp.dtype(name) for key, name in names.items()}


def vit_config(config: Any) -> ViTConfig:
    """The vision tower: ``config.vision`` at ``config.data.image_size`` (or the imported
    checkpoint's tower), in ``model.dtype``."""
    if llava_hf_base.hf_dir(config) is not None:
        compute_dtypes(config)
        return llava_hf_base.hf_llava_config(config).multimodal.vision
    v = config.vision
    return ViTConfig(
        image_size=config.data.image_size,
        patch_size=v.patch_size,
        width=v.width,
        num_layers=v.num_layers,
        num_heads=v.num_heads,
        mlp_dim=v.mlp_dim,
        use_cls_token=v.use_cls_token,
        **{name: v[name] for name in _VIT_OPTIONS if name in v},
        **compute_dtypes(config),
    )


def image_size(config: Any) -> int:
    """The square size images are prepared at: the tower's."""
    size = vit_config(config).image_size
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"the recipe prepares square images; the tower takes {size}")
        size = size[0]
    return size


def image_processor_config(config: Any) -> dict | None:
    """The imported checkpoint's image processor config (``model.init_from``), else None."""
    if llava_hf_base.hf_dir(config) is None:
        return None
    return llava_hf_base.image_processor_config(config)


def image_processor(config: Any) -> ImageProcessor:
    """How images are prepared: the imported checkpoint's processor, else resized to
    ``data.image_size`` and normalised with mean 0.5, std 0.5."""
    processor_config = image_processor_config(config)
    if processor_config is not None:
        return HFImageProcessor.from_config(processor_config)
    return ImagePreprocessing(size=config.data.image_size)


def adapter_config(config: Any) -> AdapterConfig:
    """The adapter of the final stage (``config.model.adapter``)."""
    return AdapterConfig(**dict(config.model.adapter))


def multimodal_config(config: Any, *, with_adapter: bool) -> MultimodalConfig:
    """ViT -> projector (VCE or MLP) -> decoder; the decoder's adapters only if asked.

    With ``model.init_from``, the tower and decoder are the imported checkpoint's, with the
    config's adapter, layer scanning and rematerialisation.
    """
    transformer = transformer_config_from(config.model)
    imported = None
    if llava_hf_base.hf_dir(config) is not None:
        imported = llava_hf_base.hf_llava_config(config).multimodal
        transformer = dataclasses.replace(
            imported.transformer,
            scan_layers=transformer.scan_layers,
            remat_policy=transformer.remat_policy,
            adapter=transformer.adapter,
        )
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
    if imported is not None:
        return dataclasses.replace(
            imported,
            transformer=transformer,
            projector=config.model.projector,
            vce=vce,
            keep_cls_token=imported.keep_cls_token and config.model.projector == "mlp",
        )
    return MultimodalConfig(
        vocab_size=config.model.vocab_size,
        embed_dim=config.model.embed_dim,
        transformer=transformer,
        vision=vit_config(config),
        tie_embeddings=config.model.tie_embeddings,
        projector=config.model.projector,
        vision_feature_layer=config.model.get("vision_feature_layer", -2),
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
