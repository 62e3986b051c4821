"""METALM's semi-causal LM (SPEC §4): bidirectional encoders docked into a causal decoder.

One model family, three modes (``SemiCausalConfig.mode``):

  causal       a plain decoder LM over the whole sequence (the baseline); spans are ignored
  prefix       every span is a bidirectional block inside the decoder itself, through the
               ``mask_ar`` convention (``layers/masks.py``); with one span at the start of each
               sample (what the prefix span sampler draws) this is the prefix-LM
  semi_causal  every span is encoded by its own bidirectional transformer pass, a connector maps
               the encoder outputs to the decoder width, and they replace the span's input
               embeddings; the decoder is causal over all positions (METALM, no cross-attention)

Spans arrive as ``span_ids`` [B, N]: 0 outside spans, k = 1..K on the k-th span of the row (in
order along the row; ``data/span_sampling.py`` draws them and checks the limits). In semi-causal
mode the row's spans are gathered into K slots of L = ``max_span_length`` tokens, encoded as a
[B·K, L] batch with padding masked, and scattered back: the encoder costs K·L tokens per row
whatever the span layout, and a token never attends outside its span.

With a vision tower (vision-language), image positions (``image_slot`` >= 0, as in the batch
contract of ``data/batch.py``) take projected ViT tokens: in the encoder's input in semi-causal
mode (every image must then lie inside a span: the encoder sees the image plus a text prefix),
in the decoder's input otherwise.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.layers.embed import Embedder
from mllm_jax.layers.image_tokens import insert_image_tokens
from mllm_jax.layers.masks import (
    bidirectional_mask_ar,
    make_attention_mask,
    positions_from_segment_ids,
)
from mllm_jax.layers.projectors import Linear, MLPProjector
from mllm_jax.layers.transformer import DecoderStack, TransformerConfig
from mllm_jax.layers.vit import VisionTransformer, ViTConfig
from mllm_jax.models.decoder_lm import DecoderLM

MODES = ("causal", "prefix", "semi_causal")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SemiCausalConfig:
    """Everything that defines a SemiCausalLM.

    Attributes:
      vocab_size, embed_dim, decoder, tie_embeddings: the causal decoder (a ``DecoderLM``).
      mode: one of ``MODES``.
      encoder: the bidirectional encoder's blocks (semi_causal mode only).
      encoder_embed_dim: its width E' (it has its own token embedding of that width).
      connector_layers: 1 = a linear connector, n > 1 = an n-layer FFN with GELU between layers
        (METALM: linear for language, 3 layers for vision-language).
      connector_hidden_dim: width of the FFN's hidden layers.
      max_spans: K, span slots per row; ``max_span_length``: L, tokens per slot.
      vision: a ViT whose tokens fill the image positions (vision-language), or None.
      vision_feature_layer: the ViT hidden state used (CLIP numbering, -1 = last block).
    """

    vocab_size: int
    embed_dim: int
    decoder: TransformerConfig
    mode: str = "semi_causal"
    tie_embeddings: bool = True
    encoder: TransformerConfig | None = None
    encoder_embed_dim: int = 0
    connector_layers: int = 1
    connector_hidden_dim: int = 0
    max_spans: int = 0
    max_span_length: int = 0
    vision: ViTConfig | None = None
    vision_feature_layer: int = -1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if self.mode != "semi_causal":
            return
        if self.encoder is None or self.encoder_embed_dim < 1:
            raise ValueError("mode='semi_causal' needs an encoder config and encoder_embed_dim")
        if self.max_spans < 1 or self.max_span_length < 1:
            raise ValueError(
                f"mode='semi_causal' needs max_spans >= 1 and max_span_length >= 1, got "
                f"{self.max_spans} and {self.max_span_length}"
            )
        if self.connector_layers < 1:
            raise ValueError(f"connector_layers must be >= 1, got {self.connector_layers}")
        if self.connector_layers > 1 and self.connector_hidden_dim < 1:
            raise ValueError("an FFN connector (connector_layers > 1) needs connector_hidden_dim")


def span_mask_ar(span_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, N] span ids -> [B, N] ``mask_ar``: 0 on a span's tokens after its first, else 1.

    Each span becomes one bidirectional block and everything else is causal.
    """
    joins_previous = (span_ids[:, 1:] > 0) & (span_ids[:, 1:] == span_ids[:, :-1])
    first = jnp.zeros_like(span_ids[:, :1], bool)
    return 1 - jnp.concatenate([first, joins_previous], axis=1).astype(jnp.int32)


def span_target_mask(span_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, N] span ids -> [B, N] bool: False where position p must not be trained (SPEC Eq. 1).

    The output at p predicts token p + 1; it is excluded when p and p + 1 lie in the same span
    (p in [s_i, e_i - 2]), because the span's bidirectional encoding at p has seen token p + 1.
    So the first token of a span (predicted at s_i - 1) and the first token after it (predicted
    at e_i - 1) stay targets.
    """
    inside_next = (span_ids[:, :-1] > 0) & (span_ids[:, :-1] == span_ids[:, 1:])
    last = jnp.zeros_like(span_ids[:, :1], bool)
    return ~jnp.concatenate([inside_next, last], axis=1)


def span_slots(span_ids: jnp.ndarray, max_spans: int, max_span_length: int):
    """Where every span token goes in the [B, K·L] slot layout.

    Returns:
      (flat [B, N] int32: slot·L + offset for span tokens, K·L elsewhere;
       in_slot [B, N] bool: the token is a span token that fits the K x L slots).
    A span past slot K or a token past offset L is left out (``data.span_sampling.check_spans``
    rejects such batches on the host).
    """
    offset = positions_from_segment_ids(span_ids)
    slot = span_ids - 1
    in_slot = (span_ids > 0) & (slot < max_spans) & (offset < max_span_length)
    flat = jnp.where(in_slot, slot * max_span_length + offset, max_spans * max_span_length)
    return flat.astype(jnp.int32), in_slot


class Connector(nn.Module):
    """Encoder width E' -> decoder width D: one Linear, or ``num_layers`` Linears with GELU.

    Parameters ``layer_0`` ... ``layer_{n-1}`` (kernel + bias). Kernels are named so that no
    array repeats a logical axis: (None, embed) for the linear one; (embed, mlp), (None, mlp),
    ..., (mlp, embed) for an FFN.
    """

    out_dim: int
    num_layers: int = 1
    hidden_dim: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[..., E'] -> [..., D]."""
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.num_layers == 1:
            return Linear(self.out_dim, (None, "embed"), name="layer_0", **dense)(x)
        for i in range(self.num_layers - 1):
            axes = ("embed", "mlp") if i == 0 else (None, "mlp")
            x = nn.gelu(Linear(self.hidden_dim, axes, name=f"layer_{i}", **dense)(x), False)
        last = f"layer_{self.num_layers - 1}"
        return Linear(self.out_dim, ("mlp", "embed"), name=last, **dense)(x)


class SemiCausalLM(nn.Module):
    """Token ids with span ids (and images) -> next-token logits [B, N, V].

    Parameter groups: ``lm`` (the causal ``DecoderLM``), and in semi-causal mode
    ``encoder_embedder``, ``encoder`` (a ``DecoderStack`` run with a bidirectional mask) and
    ``connector``; with a vision tower ``vision`` (ViT) and ``image_projector`` (LLaVA's MLP,
    into the encoder width in semi-causal mode, the decoder width otherwise).
    """

    config: SemiCausalConfig

    def setup(self):
        cfg = self.config
        dtypes = dict(dtype=cfg.decoder.dtype, param_dtype=cfg.decoder.param_dtype)
        self.lm = DecoderLM(
            vocab_size=cfg.vocab_size,
            embed_dim=cfg.embed_dim,
            transformer=cfg.decoder,
            tie_embeddings=cfg.tie_embeddings,
        )
        semi_causal = cfg.mode == "semi_causal"
        if semi_causal:
            self.encoder_embedder = Embedder(cfg.vocab_size, cfg.encoder_embed_dim, **dtypes)
            self.encoder = DecoderStack(cfg.encoder)
            self.connector = Connector(
                cfg.embed_dim, cfg.connector_layers, cfg.connector_hidden_dim, **dtypes
            )
        if cfg.vision is not None:
            self.vision = VisionTransformer(cfg.vision)
            image_width = cfg.encoder_embed_dim if semi_causal else cfg.embed_dim
            self.image_projector = MLPProjector(image_width, **dtypes)

    def encode_images(self, images: jnp.ndarray) -> jnp.ndarray:
        """[B, M, H, W, 3] pixels -> [B, M, P, width] projected image tokens."""
        batch, slots = images.shape[:2]
        flat = images.reshape(batch * slots, *images.shape[2:])
        (hidden,) = self.vision(flat, (self.config.vision_feature_layer,), drop_cls=True)
        tokens = self.image_projector(hidden)
        return tokens.reshape(batch, slots, *tokens.shape[1:])

    def _with_images(self, embeddings, images, image_slot, image_patch):
        if self.config.vision is None:
            return embeddings
        if images is None or image_slot is None or image_patch is None:
            raise ValueError("a model with a vision tower needs images, image_slot, image_patch")
        return insert_image_tokens(embeddings, self.encode_images(images), image_slot, image_patch)

    def encode_spans(
        self,
        tokens: jnp.ndarray,
        span_ids: jnp.ndarray,
        images: jnp.ndarray | None = None,
        image_slot: jnp.ndarray | None = None,
        image_patch: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Connector outputs at every span position (semi-causal mode).

        Args:
          tokens, span_ids: [B, N]; images [B, M, H, W, 3] and image_slot/image_patch [B, N]
            with a vision tower.

        Returns:
          (connector outputs [B, N, D] — meaningful where ``in_slot`` — and in_slot [B, N] bool).
        """
        cfg = self.config
        batch, length = tokens.shape
        slots, slot_length = cfg.max_spans, cfg.max_span_length
        x = self._with_images(self.encoder_embedder.encode(tokens), images, image_slot, image_patch)
        flat, in_slot = span_slots(span_ids, slots, slot_length)
        rows = jnp.arange(batch)[:, None]
        # One spare column receives the tokens outside spans, then is dropped.
        source = jnp.zeros((batch, slots * slot_length + 1), jnp.int32)
        source = source.at[rows, flat].set(jnp.broadcast_to(jnp.arange(length), (batch, length)))
        filled = jnp.zeros((batch, slots * slot_length + 1), bool).at[rows, flat].set(True)
        source, filled = source[:, :-1], filled[:, :-1]
        gathered = jnp.take_along_axis(x, source[:, :, None], axis=1)
        gathered = gathered.reshape(batch * slots, slot_length, x.shape[-1])
        filled = filled.reshape(batch * slots, slot_length)
        mask = make_attention_mask(
            bidirectional_mask_ar(batch * slots, slot_length), input_mask=filled
        )
        offsets = jnp.broadcast_to(jnp.arange(slot_length), (batch * slots, slot_length))
        encoded = self.connector(self.encoder(gathered, mask, offsets))
        encoded = encoded.reshape(batch, slots * slot_length, -1)
        back = jnp.minimum(flat, slots * slot_length - 1)
        return jnp.take_along_axis(encoded, back[:, :, None], axis=1), in_slot

    def decoder_inputs(
        self,
        tokens: jnp.ndarray,
        span_ids: jnp.ndarray,
        images: jnp.ndarray | None = None,
        image_slot: jnp.ndarray | None = None,
        image_patch: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """[B, N, D]: what the decoder reads — token embeddings (image tokens in place in
        causal and prefix modes), replaced by the connector outputs on spans (semi-causal)."""
        x = self.lm.embed(tokens)
        if self.config.mode != "semi_causal":
            return self._with_images(x, images, image_slot, image_patch)
        spans, in_slot = self.encode_spans(tokens, span_ids, images, image_slot, image_patch)
        return jnp.where(in_slot[:, :, None], spans.astype(x.dtype), x)

    def __call__(
        self,
        tokens: jnp.ndarray,
        *,
        segment_ids: jnp.ndarray,
        positions: jnp.ndarray,
        span_ids: jnp.ndarray,
        images: jnp.ndarray | None = None,
        image_slot: jnp.ndarray | None = None,
        image_patch: jnp.ndarray | None = None,
        return_hidden: bool = False,
    ) -> jnp.ndarray:
        """Batch-contract fields [B, N] plus ``span_ids`` [B, N] -> [B, N, V] float32 logits.

        Position p scores token p + 1; train it where ``span_target_mask`` (and the batch's
        ``loss_mask``) allow. ``return_hidden``: the decoder's final-norm hidden states
        [B, N, D] instead, for a loss that applies ``lm.logits`` chunk by chunk.
        """
        x = self.decoder_inputs(tokens, span_ids, images, image_slot, image_patch)
        mask_ar = span_mask_ar(span_ids) if self.config.mode == "prefix" else None
        run_lm = self.lm.hidden_states if return_hidden else self.lm.decode
        return run_lm(
            x,
            mask_ar=mask_ar,
            input_mask=segment_ids > 0,
            segment_ids=segment_ids,
            positions=positions,
        )
