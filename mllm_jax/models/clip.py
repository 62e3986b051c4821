"""CLIP-style dual encoder for contrastive pretraining of the LLaVA vision tower.

  image [B, H, W, 3] -> VisionTransformer (``vision``) -> CLS token or mean of the patch tokens
        -> LayerNorm (``image_norm``) -> Linear (``image_head``) -> L2 normalise   [B, C]
  caption ids [B, L] -> embedding (``text_embedding``) -> bidirectional blocks over the real
        tokens (``text_layers_i``, RoPE) -> masked mean -> LayerNorm (``text_norm``)
        -> Linear (``text_head``) -> L2 normalise                                  [B, C]
  logit scale = exp(min(``logit_scale``, log(max_logit_scale))), CLIP's init 1/0.07

``params["vision"]`` is a ``VisionTransformer``'s parameter tree: drop it into
``MultimodalLM`` params of the same ``ViTConfig`` to start LLaVA training from the tower.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.layers.embed import Embedder
from mllm_jax.layers.masks import bidirectional_mask_ar, make_attention_mask
from mllm_jax.layers.norms import LayerNorm
from mllm_jax.layers.projectors import Linear
from mllm_jax.layers.transformer import TransformerBlock, TransformerConfig
from mllm_jax.layers.vit import VisionTransformer, ViTConfig

IMAGE_POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """Hyper-parameters of a CLIPModel.

    Attributes:
      vision: the image tower (the config the LLaVA model will reuse).
      vocab_size: rows of the caption embedding table.
      embed_dim: C, the width of the shared embedding space.
      image_pooling: "cls" (needs ``vision.use_cls_token``) or "mean" over the patch tokens.
      text_width, text_layers, text_heads, text_mlp_dim: the caption encoder; with
        ``text_layers=0`` it is a bag of token embeddings.
      logit_scale_init: initial temperature 1/τ (CLIP: 1/0.07), learned as its log.
      max_logit_scale: the scale is clipped here (CLIP: 100).
    """

    vision: ViTConfig
    vocab_size: int
    embed_dim: int = 128
    image_pooling: str = "mean"
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    text_mlp_dim: int = 128
    logit_scale_init: float = 1 / 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        if self.image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image_pooling {self.image_pooling!r} is not one of {IMAGE_POOLINGS}")
        if self.image_pooling == "cls" and not self.vision.use_cls_token:
            raise ValueError("image_pooling='cls' needs a ViTConfig with use_cls_token=True")
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width={self.text_width} is not a multiple of text_heads={self.text_heads}"
            )
        if not 0 < self.logit_scale_init <= self.max_logit_scale:
            raise ValueError(
                f"logit_scale_init={self.logit_scale_init} must be in (0, {self.max_logit_scale}]"
            )

    def text_transformer(self) -> TransformerConfig:
        """Pre-LN GELU blocks with RoPE positions for the caption encoder."""
        return TransformerConfig(
            num_layers=self.text_layers,
            num_heads=self.text_heads,
            num_kv_heads=self.text_heads,
            head_dim=self.text_width // self.text_heads,
            mlp_dim=self.text_mlp_dim,
            mlp_activation="gelu",
            norm="layernorm",
            norm_epsilon=self.vision.norm_epsilon,
        )


def _l2_normalise(x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class CLIPModel(nn.Module):
    """(images, caption ids, caption mask) -> normalised embeddings and the logit scale.

    Parameters: ``vision`` (VisionTransformer), ``image_norm``, ``image_head`` [embed, mlp];
    ``text_embedding`` (Embedder), ``text_layers_0..``, ``text_norm``, ``text_head``;
    ``logit_scale`` (scalar, log of the scale).
    """

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        vit = cfg.vision
        self.vision = VisionTransformer(vit)
        self.image_norm = LayerNorm(epsilon=vit.norm_epsilon)
        self.image_head = Linear(cfg.embed_dim, ("embed", "mlp"), use_bias=False)
        self.text_embedding = Embedder(vocab_size=cfg.vocab_size, embed_dim=cfg.text_width)
        block_config = cfg.text_transformer()
        self.text_layers = [TransformerBlock(block_config) for _ in range(cfg.text_layers)]
        self.text_norm = LayerNorm(epsilon=vit.norm_epsilon)
        self.text_head = Linear(cfg.embed_dim, ("embed", "mlp"), use_bias=False)
        self.log_logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(
                nn.initializers.constant(math.log(cfg.logit_scale_init)), ()
            ),
            (),
        )

    def embed_images(self, images: jnp.ndarray) -> jnp.ndarray:
        """[B, H, W, 3] preprocessed pixels -> [B, C] unit-norm float32 embeddings."""
        cfg = self.config
        drop_cls = cfg.image_pooling == "mean"
        (hidden,) = self.vision(images, (-1,), drop_cls=drop_cls)
        pooled = jnp.mean(hidden, axis=1) if drop_cls else hidden[:, 0]
        return _l2_normalise(self.image_head(self.image_norm(pooled)))

    def embed_texts(self, tokens: jnp.ndarray, text_mask: jnp.ndarray) -> jnp.ndarray:
        """[B, L] caption ids and [B, L] bool (True = real token) -> [B, C] unit-norm float32."""
        x = self.text_embedding.encode(tokens)
        batch, length = tokens.shape
        mask = make_attention_mask(bidirectional_mask_ar(batch, length), input_mask=text_mask)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        for block in self.text_layers:
            x = block(x, mask, positions)
        weights = text_mask.astype(x.dtype)[:, :, None]
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return _l2_normalise(self.text_head(self.text_norm(pooled)))

    def logit_scale(self) -> jnp.ndarray:
        """The scalar multiplying cosine similarities, clipped at ``max_logit_scale``."""
        return jnp.exp(jnp.minimum(self.log_logit_scale, math.log(self.config.max_logit_scale)))

    def __call__(
        self, images: jnp.ndarray, tokens: jnp.ndarray, text_mask: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """(image [B, C], text [B, C], scalar logit scale) for a batch of pairs."""
        return self.embed_images(images), self.embed_texts(tokens, text_mask), self.logit_scale()
