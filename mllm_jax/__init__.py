"""mllm_jax: multimodal LLM layers, models and training on JAX/Flax for TPU pods."""

__version__ = "0.1.0"
