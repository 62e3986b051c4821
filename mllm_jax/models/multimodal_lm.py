"""LLaVA-style multimodal LM: vision tower + projector (MLP or VCE) + decoder, three fusion modes.

  early            projected image tokens replace the image placeholders of the (interleaved,
                   packed) token sequence; the decoder sees one sequence (LLaVA, default)
  cross_attention  placeholders keep their token embedding; gated cross-attention blocks
                   before every ``cross_attention_every``-th decoder block let text attend to
                   the images that precede it in its sample (Flamingo)
  late             image and text are encoded separately and pooled into a shared space for a
                   contrastive head (CLIP-style); no generation

Inputs follow the batch contract of ``data/batch.py``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.layers.cross_attention import make_cross_attention_mask
from mllm_jax.layers.image_tokens import insert_image_tokens
from mllm_jax.layers.projectors import Linear, MLPProjector
from mllm_jax.layers.transformer import TransformerConfig
from mllm_jax.layers.vce import VCEConfig, VCEProjector
from mllm_jax.layers.vit import VisionTransformer, ViTConfig
from mllm_jax.models.decoder_lm import DecoderLM

FUSION_MODES = ("early", "cross_attention", "late")
PROJECTORS = ("mlp", "vce")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultimodalConfig:
    """Everything that defines a MultimodalLM.

    ``vision_feature_layer`` is the ViT hidden state the MLP projector reads (CLIP index, -2 =
    penultimate, SPEC §1); the VCE projector reads ``vce.level_indices`` (anchor first).
    """

    vocab_size: int
    embed_dim: int
    transformer: TransformerConfig
    vision: ViTConfig
    tie_embeddings: bool = True
    projector: str = "mlp"
    vision_feature_layer: int = -2
    vce: VCEConfig | None = None
    fusion: str = "early"
    freeze_vision: bool = True
    contrastive_dim: int = 128

    def __post_init__(self):
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion {self.fusion!r} is not one of {FUSION_MODES}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector {self.projector!r} is not one of {PROJECTORS}")
        if self.projector == "vce" and self.vce is None:
            raise ValueError("projector='vce' needs a vce config")
        if self.fusion == "cross_attention" and not self.transformer.cross_attention_every:
            raise ValueError("fusion='cross_attention' needs transformer.cross_attention_every > 0")
        if self.fusion != "cross_attention" and self.transformer.cross_attention_every:
            raise ValueError(f"cross_attention_every is set but fusion is {self.fusion!r}")

    @property
    def tokens_per_image(self) -> int:
        """P: image tokens each image contributes (the ViT's patch grid, CLS dropped)."""
        height, width = self.vision.grid_shape()
        return height * width


class MultimodalLM(nn.Module):
    """Images + interleaved token ids -> next-token logits (or contrastive embeddings).

    Parameter groups: ``vision`` (ViT), ``projector`` (MLP or VCE), ``lm`` (DecoderLM, with
    ``cross_attention_*`` blocks in cross-attention fusion), and in late fusion
    ``image_head``, ``text_head``, ``logit_scale``.
    """

    config: MultimodalConfig

    def setup(self):
        cfg = self.config
        self.vision = VisionTransformer(cfg.vision)
        if cfg.projector == "mlp":
            self.projector = MLPProjector(
                out_dim=cfg.embed_dim, dtype=cfg.transformer.dtype,
                param_dtype=cfg.transformer.param_dtype,
            )  # fmt: skip
        else:
            self.projector = VCEProjector(cfg.vce, out_dim=cfg.embed_dim)
        self.lm = DecoderLM(
            vocab_size=cfg.vocab_size,
            embed_dim=cfg.embed_dim,
            transformer=cfg.transformer,
            tie_embeddings=cfg.tie_embeddings,
        )
        if cfg.fusion == "late":
            self.image_head = Linear(cfg.contrastive_dim, ("embed", "mlp"), use_bias=False)
            self.text_head = Linear(cfg.contrastive_dim, ("embed", "mlp"), use_bias=False)
            self.logit_scale = self.param(
                "logit_scale",
                nn.with_logical_partitioning(nn.initializers.constant(jnp.log(1 / 0.07)), ()),
                (),
            )

    def encode_images(self, images: jnp.ndarray) -> jnp.ndarray:
        """[B, M, H, W, 3] pixels -> [B, M, P, D] projected image tokens."""
        cfg = self.config
        batch, slots = images.shape[:2]
        flat = images.reshape(batch * slots, *images.shape[2:])
        indices = (cfg.vision_feature_layer,) if cfg.projector == "mlp" else cfg.vce.level_indices
        hidden = self.vision(flat, indices, drop_cls=True)
        if cfg.freeze_vision:
            hidden = jax.lax.stop_gradient(hidden)
        if cfg.projector == "mlp":
            tokens = self.projector(hidden[0])
        else:
            grid = cfg.vision.grid_shape(images.shape[2])
            tokens = self.projector(hidden, [grid] * len(hidden))
        return tokens.reshape(batch, slots, *tokens.shape[1:])

    def input_embeddings(
        self,
        tokens: jnp.ndarray,
        images: jnp.ndarray,
        image_slot: jnp.ndarray,
        image_patch: jnp.ndarray,
    ) -> jnp.ndarray:
        """Early fusion's decoder input [B, N, D]: token embeddings with image tokens in place."""
        return insert_image_tokens(
            self.lm.embed(tokens), self.encode_images(images), image_slot, image_patch
        )

    def __call__(
        self,
        tokens: jnp.ndarray,
        *,
        segment_ids: jnp.ndarray,
        positions: jnp.ndarray,
        images: jnp.ndarray,
        image_slot: jnp.ndarray,
        image_patch: jnp.ndarray,
        mask_ar: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Batch-contract fields ([B, N] and images [B, M, H, W, 3]) -> [B, N, V] logits."""
        cfg = self.config
        if cfg.fusion == "late":
            raise ValueError("late fusion has no language-model head; use contrastive_embeddings")
        common = dict(
            mask_ar=mask_ar, input_mask=segment_ids > 0, segment_ids=segment_ids,
            positions=positions,
        )  # fmt: skip
        if cfg.fusion == "early":
            x = self.input_embeddings(tokens, images, image_slot, image_patch)
            return self.lm.decode(x, **common)
        x = self.lm.embed(tokens)
        image_tokens = self.encode_images(images)
        batch, slots, per_image, width = image_tokens.shape
        cross_mask = make_cross_attention_mask(image_slot, segment_ids, slots, per_image)
        context = image_tokens.reshape(batch, slots * per_image, width)
        return self.lm.decode(x, cross_inputs=context, cross_mask=cross_mask, **common)

    def contrastive_embeddings(
        self, images: jnp.ndarray, tokens: jnp.ndarray, input_mask: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Late fusion: L2-normalised image [B, C'] and text [B, C'] embeddings, logit scale.

        Image: mean of the projected tokens of each image; text: mean of the LM's final hidden
        states over the real tokens of each row (no image placeholders in ``tokens``).
        """
        if self.config.fusion != "late":
            raise ValueError("contrastive_embeddings needs fusion='late'")
        pooled_image = jnp.mean(self.encode_images(images[:, None])[:, 0], axis=1)
        hidden = self.lm.hidden_states(
            self.lm.embed(tokens), input_mask=input_mask, segment_ids=input_mask.astype(jnp.int32)
        )
        weights = input_mask.astype(hidden.dtype)[:, :, None]
        pooled_text = jnp.sum(hidden * weights, axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        normalise = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True).clip(1e-6)  # noqa: E731
        return (
            normalise(self.image_head(pooled_image)),
            normalise(self.text_head(pooled_text)),
            jnp.exp(self.logit_scale),
        )
