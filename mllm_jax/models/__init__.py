"""Model assemblies built from mllm_jax.layers."""

from mllm_jax.models.decoder_lm import DecoderLM, transformer_config_from
from mllm_jax.models.generation import GenerationResult, generate, left_pad
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM

__all__ = [
    "DecoderLM",
    "GenerationResult",
    "MultimodalConfig",
    "MultimodalLM",
    "generate",
    "left_pad",
    "transformer_config_from",
]
