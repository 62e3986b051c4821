"""LLaVA-style multimodal LM: vision tower + projector (MLP or VCE) + decoder, four fusion modes.

  early            projected image tokens replace the image placeholders of the (interleaved,
                   packed) token sequence; the decoder sees one sequence (LLaVA, default)
  cross_attention  placeholders keep their token embedding; gated cross-attention blocks
                   before every ``cross_attention_every``-th decoder block let text attend to
                   the images that precede it in its sample (Flamingo)
  late             image and text are encoded separately and pooled into a shared space for a
                   contrastive head (CLIP-style); no generation
  joint            both at once (SPEC §7): the image's patch tokens enter the decoder early,
                   exactly as in ``early`` (same logits, same generation), and each image is also
                   fused late with the text of its sample in the contrastive space, so one step
                   can train LM loss + contrastive loss (as CoCa pairs captioning with CLIP)

Joint fusion's late half (``joint_outputs``) works on the packed batch: per image slot, the
image embedding is the mean of that image's projected tokens through ``image_head``; the text
embedding is the mean of the decoder's final hidden states over the text tokens of the sample
holding the image, through ``text_head``, both L2-normalised. Those hidden states come from a
second, text-only decoder pass in which image positions are masked out like padding: a text
embedding that had attended to its own image would make the contrastive task trivial. A sample
with several images gives several pairs sharing one text (``pair_ids``: a multi-positive loss
treats them as positives). ``contrastive_embeddings`` is the same late half on unpacked
(image, caption) pairs, for retrieval.

Inputs follow the batch contract of ``data/batch.py``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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

FUSION_MODES = ("early", "cross_attention", "late", "joint")
CONTRASTIVE_FUSIONS = ("late", "joint")
PROJECTORS = ("mlp", "vce")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultimodalConfig:
    """Everything that defines a MultimodalLM.

    ``vision_feature_layer`` is the ViT hidden state the MLP projector reads (CLIP index, -2 =
    penultimate, SPEC §1); the VCE projector reads ``vce.level_indices`` (anchor first).
    ``contrastive_dim`` is C', the width of the shared space of late and joint fusion.
    ``keep_cls_token`` feeds the MLP projector the ViT's CLS token too (P = 1 + h·w, CLS
    first): Hugging Face LLaVA's ``vision_feature_select_strategy="full"``; the default drops
    it ("default").
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
    keep_cls_token: bool = False

    def __post_init__(self):
        if self.keep_cls_token and (self.projector != "mlp" or not self.vision.use_cls_token):
            raise ValueError(
                "keep_cls_token needs the MLP projector and a vision tower with a CLS token "
                f"(projector={self.projector!r}, vision.use_cls_token={self.vision.use_cls_token})"
            )
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
        if self.fusion in CONTRASTIVE_FUSIONS and self.contrastive_dim < 1:
            raise ValueError(
                f"fusion={self.fusion!r} needs contrastive_dim >= 1, got {self.contrastive_dim}"
            )

    @property
    def tokens_per_image(self) -> int:
        """P: image tokens each image contributes (the ViT's patch grid, plus the CLS token
        when ``keep_cls_token``)."""
        height, width = self.vision.grid_shape()
        return height * width + int(self.keep_cls_token)


class JointOutputs(NamedTuple):
    """Joint fusion's outputs on a packed batch of B rows, N tokens, M image slots.

    Attributes:
      logits: [B, N, V] float32, early fusion's next-token logits.
      image_embeddings: [B, M, C'] L2-normalised image embedding of each slot; 0 in empty slots.
      text_embeddings: [B, M, C'] L2-normalised embedding of the text of the sample holding the
        slot's image; 0 in empty slots.
      pair_ids: [B, M] int32, equal for the slots of one sample (unique across the batch), -1
        for empty slots.
      logit_scale: float32 scalar multiplying cosine similarities (CLIP's exp(t)).
    """

    logits: jnp.ndarray
    image_embeddings: jnp.ndarray
    text_embeddings: jnp.ndarray
    pair_ids: jnp.ndarray
    logit_scale: jnp.ndarray


def _l2_normalise(v: jnp.ndarray) -> jnp.ndarray:
    """v / |v| over the last axis; a zero vector stays zero with a finite gradient."""
    squared = jnp.sum(jnp.square(v), axis=-1, keepdims=True)
    return v * jax.lax.rsqrt(jnp.maximum(squared, 1e-12))


class MultimodalLM(nn.Module):
    """Images + interleaved token ids -> next-token logits (or contrastive embeddings).

    Parameter groups: ``vision`` (ViT), ``projector`` (MLP or VCE), ``lm`` (DecoderLM, with
    ``cross_attention_*`` blocks in cross-attention fusion), and in late and joint fusion
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
        if cfg.fusion in CONTRASTIVE_FUSIONS:
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
        hidden = self.vision(flat, indices, drop_cls=not cfg.keep_cls_token)
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
        return_hidden: bool = False,
    ) -> jnp.ndarray:
        """Batch-contract fields ([B, N] and images [B, M, H, W, 3]) -> [B, N, V] logits.

        In joint fusion these are early fusion's logits; ``joint_outputs`` adds the
        contrastive embeddings. ``return_hidden``: the decoder's final-norm hidden states
        [B, N, D] instead, for a loss that applies ``lm.logits`` chunk by chunk.
        """
        cfg = self.config
        if cfg.fusion == "late":
            raise ValueError("late fusion has no language-model head; use contrastive_embeddings")
        inputs = dict(
            segment_ids=segment_ids, positions=positions, images=images, image_slot=image_slot,
            image_patch=image_patch, mask_ar=mask_ar,
        )  # fmt: skip
        if cfg.fusion == "joint" and self.is_initializing():
            # The contrastive heads' params exist only once called; init goes through here.
            return self.joint_outputs(tokens, **inputs).logits
        common = dict(
            mask_ar=mask_ar, input_mask=segment_ids > 0, segment_ids=segment_ids,
            positions=positions,
        )  # fmt: skip
        run_lm = self.lm.hidden_states if return_hidden else self.lm.decode
        if cfg.fusion in ("early", "joint"):
            x = self.input_embeddings(tokens, images, image_slot, image_patch)
            return run_lm(x, **common)
        x = self.lm.embed(tokens)
        image_tokens = self.encode_images(images)
        batch, slots, per_image, width = image_tokens.shape
        cross_mask = make_cross_attention_mask(image_slot, segment_ids, slots, per_image)
        context = image_tokens.reshape(batch, slots * per_image, width)
        return run_lm(x, cross_inputs=context, cross_mask=cross_mask, **common)

    def joint_outputs(
        self,
        tokens: jnp.ndarray,
        *,
        segment_ids: jnp.ndarray,
        positions: jnp.ndarray,
        images: jnp.ndarray,
        image_slot: jnp.ndarray,
        image_patch: jnp.ndarray,
        mask_ar: jnp.ndarray | None = None,
    ) -> JointOutputs:
        """Joint fusion on batch-contract fields: early logits and per-slot contrastive pairs.

        The images are encoded once for both halves; the decoder runs twice (with the images,
        and text-only with the image positions masked out).
        """
        if self.config.fusion != "joint":
            raise ValueError(f"joint_outputs needs fusion='joint', not {self.config.fusion!r}")
        common = dict(mask_ar=mask_ar, segment_ids=segment_ids, positions=positions)
        text_embeddings = self.lm.embed(tokens)
        image_tokens = self.encode_images(images)
        fused = insert_image_tokens(text_embeddings, image_tokens, image_slot, image_patch)
        logits = self.lm.decode(fused, input_mask=segment_ids > 0, **common)

        is_text = (segment_ids > 0) & (image_slot < 0)
        hidden = self.lm.hidden_states(text_embeddings, input_mask=is_text, **common)
        slots = image_tokens.shape[1]
        in_slot = image_slot[:, None, :] == jnp.arange(slots)[None, :, None]  # [B, M, N]
        slot_segment = jnp.max(jnp.where(in_slot, segment_ids[:, None, :], 0), axis=-1)
        filled = slot_segment > 0
        weights = (segment_ids[:, None, :] == slot_segment[:, :, None]) & is_text[:, None, :]
        weights = (weights & filled[:, :, None]).astype(hidden.dtype)
        pooled_text = jnp.einsum("bmn,bne->bme", weights, hidden) / jnp.maximum(
            weights.sum(axis=-1, keepdims=True), 1.0
        )
        image_emb, text_emb, scale = self._contrastive_heads(
            jnp.mean(image_tokens, axis=2), pooled_text
        )
        row = jnp.arange(tokens.shape[0], dtype=jnp.int32)[:, None] * (tokens.shape[1] + 1)
        return JointOutputs(
            logits=logits,
            image_embeddings=jnp.where(filled[..., None], image_emb, 0),
            text_embeddings=jnp.where(filled[..., None], text_emb, 0),
            pair_ids=jnp.where(filled, row + slot_segment, -1).astype(jnp.int32),
            logit_scale=scale,
        )

    def contrastive_embeddings(
        self, images: jnp.ndarray, tokens: jnp.ndarray, input_mask: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Late (or joint) fusion on (image, caption) pairs: L2-normalised image [B, C'] and
        text [B, C'] embeddings, and the logit scale.

        Image: mean of the projected tokens of each image; text: mean of the LM's final hidden
        states over the real tokens of each row (no image placeholders in ``tokens``).
        """
        if self.config.fusion not in CONTRASTIVE_FUSIONS:
            raise ValueError(
                f"contrastive_embeddings needs fusion in {CONTRASTIVE_FUSIONS}, "
                f"not {self.config.fusion!r}"
            )
        pooled_image = jnp.mean(self.encode_images(images[:, None])[:, 0], axis=1)
        hidden = self.lm.hidden_states(
            self.lm.embed(tokens), input_mask=input_mask, segment_ids=input_mask.astype(jnp.int32)
        )
        weights = input_mask.astype(hidden.dtype)[:, :, None]
        pooled_text = jnp.sum(hidden * weights, axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return self._contrastive_heads(pooled_image, pooled_text)

    def _contrastive_heads(
        self, pooled_image: jnp.ndarray, pooled_text: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Pooled [..., D] image and text -> normalised [..., C'] each, and exp(logit_scale)."""
        return (
            _l2_normalise(self.image_head(pooled_image)),
            _l2_normalise(self.text_head(pooled_text)),
            jnp.exp(self.logit_scale),
        )
