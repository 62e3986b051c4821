"""Vision Transformer (the LLaVA/CLIP vision tower) returning hidden states by layer index.

Hidden states follow CLIP's (Hugging Face's ``output_hidden_states``) numbering: with L blocks
there are L + 1 of them; index 0 is the embeddings (patches + position embeddings, with the CLS
token when used, after CLIP's ``ln_pre`` when ``pre_norm``), index i the output of block i, and
negative indices count from the end (-1 = the last block's output, -2 = the penultimate one,
LLaVA's feature layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.layers.masks import bidirectional_mask_ar, make_attention_mask
from mllm_jax.layers.mlp import UNGATED_ACTIVATIONS
from mllm_jax.layers.norms import LayerNorm
from mllm_jax.layers.projectors import Linear
from mllm_jax.layers.transformer import REMAT_POLICIES, TransformerBlock, TransformerConfig

ImageSize = int | tuple[int, int]


def grid_shape(image_size: ImageSize, patch_size: int) -> tuple[int, int]:
    """(h, w): patches per column and per row of an image of ``image_size`` (int = square)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {(height, width)} is not a multiple of the patch size {patch_size}"
        )
    return height // patch_size, width // patch_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Hyper-parameters of a ViT.

    ``image_size`` is the size the position table is learned for; other input sizes (multiples
    of ``patch_size``) get that table bilinearly resized. ``norm_epsilon`` defaults to CLIP's.
    ``remat_policy`` (a key of ``REMAT_POLICIES``) recomputes each block in the backward pass.

    Options pretrained towers need (the defaults are the from-scratch tower's choices):
    ``mlp_activation`` ("gelu" exact, "quick_gelu" for CLIP, "gelu_tanh" for SigLIP);
    ``attention_bias`` ("none", "qkv", "all") and ``mlp_bias`` (CLIP and SigLIP: "all", True);
    ``patch_bias`` (the patch projection's bias: SigLIP has one, CLIP's conv has none);
    ``pre_norm`` (CLIP's ``ln_pre``: a LayerNorm over the embeddings before block 0).
    """

    image_size: ImageSize
    patch_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    use_cls_token: bool = True
    norm_epsilon: float = 1e-5
    remat_policy: str = "none"
    mlp_activation: str = "gelu"
    attention_bias: str = "none"
    mlp_bias: bool = False
    patch_bias: bool = True
    pre_norm: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
        if self.mlp_activation not in UNGATED_ACTIVATIONS:
            known = sorted(UNGATED_ACTIVATIONS)
            raise ValueError(f"mlp_activation {self.mlp_activation!r} is not one of {known}")
        self.transformer_config()  # checks remat_policy and attention_bias
        self.grid_shape()

    def grid_shape(self, image_size: ImageSize | None = None) -> tuple[int, int]:
        """(h, w) patch grid of ``image_size`` (default: the config's own)."""
        return grid_shape(self.image_size if image_size is None else image_size, self.patch_size)

    def transformer_config(self) -> TransformerConfig:
        """Pre-LN, GELU-family MLP, no RoPE (positions are learned), full multi-head attention."""
        return TransformerConfig(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=self.width // self.num_heads,
            mlp_dim=self.mlp_dim,
            mlp_activation=self.mlp_activation,
            norm="layernorm",
            norm_epsilon=self.norm_epsilon,
            use_rope=False,
            remat_policy=self.remat_policy,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, h·w, p·p·C]: non-overlapping patches in row-major grid order.

    Each patch is flattened in (row, column, channel) order, so projecting it with a conv kernel
    [p, p, C, D] reshaped to [p·p·C, D] equals a stride-p convolution.
    """
    batch, height, width, channels = images.shape
    rows, cols = grid_shape((height, width), patch_size)
    patches = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


def resize_position_grid(
    table: jnp.ndarray, source: tuple[int, int], target: tuple[int, int]
) -> jnp.ndarray:
    """Bilinearly resizes a [h·w, C] grid of position embeddings to [h'·w', C].

    Half-pixel centres with edge values held (no antialiasing), i.e.
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``; computed in
    float32. Returns ``table`` itself when the grids agree.
    """
    if tuple(source) == tuple(target):
        return table
    grid = table.astype(jnp.float32).reshape(*source, table.shape[-1])
    resized = jax.image.resize(grid, (*target, table.shape[-1]), method="bilinear", antialias=False)
    return resized.reshape(target[0] * target[1], table.shape[-1]).astype(table.dtype)


def _resolve_index(index: int, num_layers: int) -> int:
    num_states = num_layers + 1
    if not -num_states <= index < num_states:
        raise ValueError(
            f"hidden-state index {index} is out of range for a ViT with {num_layers} layers "
            f"(valid: {-num_states}..{num_layers}; 0 = embeddings, -1 = last block)"
        )
    return index % num_states


class VisionTransformer(nn.Module):
    """Images -> hidden states of the chosen layers.

    Parameters (logical axes): ``patch_embedding/kernel`` [patch, embed] and, with
    ``patch_bias``, ``/bias`` [embed]; ``cls_token`` [embed] (N(0, 1/C)); ``position_embedding``
    [position, embed] (N(0, 1/C), the CLS position first); with ``pre_norm``, ``pre_norm/scale``
    and ``/bias`` [norm]; blocks ``layers_0`` ... ``layers_{L-1}`` (see ``TransformerBlock``).
    """

    config: ViTConfig

    @nn.compact
    def __call__(
        self,
        images: jnp.ndarray,
        layer_indices: Sequence[int] = (-2,),
        *,
        drop_cls: bool = True,
    ) -> tuple[jnp.ndarray, ...]:
        """[B, H, W, C] images -> one [B, P(+1), width] hidden state per entry of layer_indices.

        Args:
          images: H and W multiples of ``patch_size``; P = (H/p)·(W/p).
          layer_indices: CLIP-style indices into the L + 1 hidden states (see module doc).
          drop_cls: return the patch tokens only (the CLS token is kept when False).

        Raises:
          ValueError: an index outside [-(L+1), L], or an image size that is no multiple of p.
        """
        cfg = self.config
        wanted = [_resolve_index(i, cfg.num_layers) for i in layer_indices]
        rows, cols = cfg.grid_shape(tuple(images.shape[1:3]))
        x = Linear(
            cfg.width,
            ("patch", "embed"),
            use_bias=cfg.patch_bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="patch_embedding",
        )(patchify(images, cfg.patch_size))
        batch = x.shape[0]
        embed_init = nn.initializers.normal(stddev=cfg.width**-0.5)
        num_cls = int(cfg.use_cls_token)
        if cfg.use_cls_token:
            cls = self.param(
                "cls_token",
                nn.with_logical_partitioning(embed_init, ("embed",)),
                (cfg.width,),
                cfg.param_dtype,
            )
            cls = jnp.broadcast_to(cls.astype(cfg.dtype), (batch, 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1)
        table = self.param(
            "position_embedding",
            nn.with_logical_partitioning(embed_init, ("position", "embed")),
            (num_cls + math.prod(cfg.grid_shape()), cfg.width),
            cfg.param_dtype,
        )
        patch_positions = resize_position_grid(table[num_cls:], cfg.grid_shape(), (rows, cols))
        positions_table = jnp.concatenate([table[:num_cls], patch_positions], axis=0)
        x = x + positions_table.astype(cfg.dtype)[None]
        if cfg.pre_norm:
            x = LayerNorm(
                epsilon=cfg.norm_epsilon,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="pre_norm",
            )(x)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        length = x.shape[1]
        mask = make_attention_mask(bidirectional_mask_ar(batch, length))
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        block_cls = TransformerBlock
        if cfg.remat_policy != "none":
            block_cls = nn.remat(TransformerBlock, policy=REMAT_POLICIES[cfg.remat_policy])
        block_config = cfg.transformer_config()
        hidden_states = [x]
        # Every block runs (so init creates them all); jit drops those no requested index needs.
        for i in range(cfg.num_layers):
            x = block_cls(block_config, name=f"layers_{i}")(x, mask, positions)
            hidden_states.append(x)
        start = num_cls if drop_cls else 0
        return tuple(hidden_states[i][:, start:] for i in wanted)


class PooledVisionTransformer(nn.Module):
    """A ViT with a final LayerNorm: one embedding per image, or the normed tokens.

    The final LayerNorm runs over the last block's output. ``__call__`` pools its CLS token
    (CLIP's ``pooler_output``), or the mean over the patch tokens when the config has no CLS
    token; ``encode`` also returns all normed tokens (SigLIP's ``last_hidden_state``) and any
    hidden states. Parameters: ``vit`` (a ``VisionTransformer``, reusable as the LLaVA tower)
    and ``final_norm`` (scale and bias [norm]).
    """

    config: ViTConfig

    def setup(self):
        cfg = self.config
        self.vit = VisionTransformer(cfg)
        self.final_norm = LayerNorm(
            epsilon=cfg.norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )

    def encode(
        self, images: jnp.ndarray, layer_indices: Sequence[int] = ()
    ) -> tuple[tuple[jnp.ndarray, ...], jnp.ndarray]:
        """[B, H, W, C] images -> (hidden states of ``layer_indices``, normed last tokens).

        Every array is [B, N, width] with the CLS token (when used) first; ``layer_indices``
        are ``VisionTransformer``'s (0 = embeddings, -1 = last block's output, before the norm).
        """
        *states, last = self.vit(images, (*layer_indices, -1), drop_cls=False)
        return tuple(states), self.final_norm(last)

    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """[B, H, W, C] images -> [B, width]."""
        _, normed = self.encode(images)
        return normed[:, 0] if self.config.use_cls_token else jnp.mean(normed, axis=1)
