"""Model assemblies built from mllm_jax.layers."""

from mllm_jax.models.decoder_lm import DecoderLM, transformer_config_from

__all__ = ["DecoderLM", "transformer_config_from"]
