"""VCE, the Visual Cue Enhancement projector (SPEC §2): multi-scale deformable cross-attention.

Each patch of the anchor feature map (the query) gathers local cues from L feature maps (the
levels) at K learned sampling points per level and head, Deformable-DETR style; the result is
added to the anchor, optionally layer-normalised, and projected by LLaVA's ``mlp2x_gelu``::

    q        = levels[0]                                       [B, P, C]  the ANCHOR
    v        = value_proj(feature_norm(concat_l levels_l))     [B, Σ P_l, H, C/H]
    offsets  = sampling_offsets(query_norm(q))                 [B, P, H, L, K, 2]
    weights  = softmax_{L·K}(attention_weights(query_norm(q))) [B, P, H, L, K]
    loc      = ref(p) + offsets / (w_l, h_l),  ref(p) = ((j + .5) / w, (i + .5) / h)
    out      = Σ_{l,k} weights · bilinear(v_l[b, :, h], loc)   [B, P, H, C/H]  (float32)
    x        = output_norm(q + output_proj(out))   (or q + output_proj(out))
    tokens   = mlp2x_gelu(x)                                   [B, P, D]

The anchor is the FIRST level and must be the final ViT map (layer -2 with the default
``level_indices``). The released code took the last list entry (layer -20) as the anchor;
``VCEConfig`` rejects index orders whose first entry is not the deepest layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.layers.bilinear import bilinear_sample
from mllm_jax.layers.norms import LayerNorm
from mllm_jax.layers.projectors import Linear, MLPProjector

SpatialShape = tuple[int, int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VCEConfig:
    """Hyper-parameters of the VCE module.

    Attributes:
      level_indices: ViT hidden-state indices of the levels (CLIP numbering, see layers/vit.py),
        anchor first: the first entry is the query map and must be the deepest layer.
      num_heads: H; the anchor width C must be a multiple of it (16 for CLIP-L's C = 1024).
      num_points: K sampling points per head and level.
      normalize_output: x = LayerNorm(q + f*) as in the paper; False gives the released code's
        q + f* (it computed the norm and discarded the result).
      norm_epsilon: of the query, feature and output LayerNorms (the released code's 1e-6).
    """

    level_indices: tuple[int, ...] = (-2, -8, -14, -20)
    num_heads: int = 16
    num_points: int = 4
    normalize_output: bool = True
    norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if not self.level_indices:
            raise ValueError("level_indices needs at least the anchor level")
        if self.num_heads < 1 or self.num_points < 1:
            raise ValueError(
                f"num_heads={self.num_heads}, num_points={self.num_points} must be >= 1"
            )
        anchor, *others = self.level_indices
        same_sign = all((i < 0) == (anchor < 0) for i in others)
        if same_sign and any(i >= anchor for i in others):
            raise ValueError(
                f"level_indices {self.level_indices}: the first entry is the anchor (query) and "
                f"must be the deepest layer, e.g. (-2, -8, -14, -20), with every other level "
                f"shallower"
            )

    @property
    def num_levels(self) -> int:
        return len(self.level_indices)


def ring_offsets(num_heads: int, num_levels: int, num_points: int) -> np.ndarray:
    """[H, L, K, 2] initial sampling offsets (x, y) in pixels of each level.

    Head h points along θ_h = 2πh/H, the (cos, sin) pair scaled so its larger |component| is 1;
    point k lies (k + 1) steps out; every level gets the same ring (Deformable-DETR's init).
    """
    theta = 2.0 * math.pi * np.arange(num_heads) / num_heads
    direction = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    direction /= np.abs(direction).max(axis=-1, keepdims=True)
    steps = np.arange(1, num_points + 1, dtype=np.float64)
    ring = direction[:, None, None, :] * steps[None, None, :, None]
    return np.broadcast_to(ring, (num_heads, num_levels, num_points, 2)).copy()


def reference_points(spatial_shape: SpatialShape) -> jnp.ndarray:
    """[h·w, 2] normalised (x, y) centres of the patches, row-major: ((j + .5)/w, (i + .5)/h)."""
    height, width = spatial_shape
    ys, xs = jnp.meshgrid(
        (jnp.arange(height) + 0.5) / height, (jnp.arange(width) + 0.5) / width, indexing="ij"
    )
    return jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


def multi_scale_deformable_sample(
    values: Sequence[jnp.ndarray],
    spatial_shapes: Sequence[SpatialShape],
    locations: jnp.ndarray,
    weights: jnp.ndarray,
) -> jnp.ndarray:
    """out[b,p,h] = Σ_{l,k} weights[b,p,h,l,k] · bilinear(values_l[b, :, h], locations[b,p,h,l,k]).

    Args:
      values: L arrays [B, h_l·w_l, H, Dh] (row-major maps).
      spatial_shapes: L pairs (h_l, w_l).
      locations: [B, P, H, L, K, 2] normalised (x, y); zero contribution outside a map.
      weights: [B, P, H, L, K].

    Returns:
      [B, P, H, Dh] float32.
    """
    batch, num_queries, num_heads, num_levels, num_points, _ = locations.shape
    out = jnp.zeros((batch, num_queries, num_heads, values[0].shape[-1]), jnp.float32)
    for level, (value, (height, width)) in enumerate(zip(values, spatial_shapes, strict=True)):
        head_dim = value.shape[-1]
        maps = value.reshape(batch, height, width, num_heads, head_dim).transpose(0, 3, 1, 2, 4)
        points = locations[:, :, :, level].transpose(0, 2, 1, 3, 4)
        points = points.reshape(batch, num_heads, num_queries * num_points, 2)
        sampled = bilinear_sample(maps, points).reshape(
            batch, num_heads, num_queries, num_points, head_dim
        )
        out = out + jnp.einsum(
            "bhpkd,bphk->bphd", sampled, weights[:, :, :, level].astype(jnp.float32)
        )
    return out


def _spatial_shapes(
    levels: Sequence[jnp.ndarray], spatial_shapes: Sequence[SpatialShape] | None
) -> tuple[SpatialShape, ...]:
    if spatial_shapes is None:
        side = [math.isqrt(level.shape[1]) for level in levels]
        if any(s * s != level.shape[1] for s, level in zip(side, levels, strict=True)):
            raise ValueError(
                f"levels with {[level.shape[1] for level in levels]} tokens are not all square "
                f"maps; pass spatial_shapes=[(h, w), ...]"
            )
        return tuple((s, s) for s in side)
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if len(shapes) != len(levels):
        raise ValueError(f"{len(levels)} levels but {len(shapes)} spatial shapes")
    for index, (level, (h, w)) in enumerate(zip(levels, shapes, strict=True)):
        if level.ndim != 3 or level.shape[1] != h * w:
            raise ValueError(f"level {index} has shape {level.shape}, expected [B, {h}·{w}, C]")
    return shapes


class VisualCueEnhancement(nn.Module):
    """Enriches the anchor map with deformable samples of all levels: x [B, P, C] (see module doc).

    Parameters (logical axes):
      ``level_proj_{l}`` kernel [level_embed, embed], bias [embed]: only for a level whose width
        differs from the anchor's (xavier-uniform, bias 0);
      ``query_norm``, ``feature_norm``, ``output_norm`` (if normalize_output): LayerNorm [norm];
      ``value_proj`` kernel [embed, heads, head_dim], bias [heads, head_dim]: xavier-uniform, 0;
      ``sampling_offsets`` kernel [embed, heads, sampling] = 0, bias [heads, sampling] = the
        ``ring_offsets`` flattened over (L, K, 2);
      ``attention_weights`` kernel [embed, heads, sampling] and bias [heads, sampling] = 0, so
        attention starts uniform over the L·K samples;
      ``output_proj`` kernel [heads, head_dim, embed], bias [embed]: xavier-uniform, 0.
    """

    config: VCEConfig

    def _norm(self, name: str) -> LayerNorm:
        cfg = self.config
        return LayerNorm(
            epsilon=cfg.norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )

    @nn.compact
    def __call__(
        self,
        levels: Sequence[jnp.ndarray],
        spatial_shapes: Sequence[SpatialShape] | None = None,
    ) -> jnp.ndarray:
        """L feature maps, anchor first -> enhanced anchor [B, P, C].

        Args:
          levels: [B, P_l, C_l] each; levels[0] is the anchor (query) [B, P, C]. Maps may differ
            in size and width (a width other than C is first projected to C).
          spatial_shapes: (h_l, w_l) per level with h_l·w_l = P_l; None = square maps.
        """
        cfg = self.config
        if len(levels) != cfg.num_levels:
            raise ValueError(f"config has {cfg.num_levels} levels, got {len(levels)} maps")
        shapes = _spatial_shapes(levels, spatial_shapes)
        query = levels[0]  # The anchor is the FIRST level (the final ViT map), never the last.
        batch, num_queries, width = query.shape
        num_heads, num_levels, num_points = cfg.num_heads, cfg.num_levels, cfg.num_points
        if width % num_heads:
            raise ValueError(f"anchor width {width} is not a multiple of num_heads={num_heads}")
        head_dim = width // num_heads
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        xavier = nn.initializers.xavier_uniform

        memory = []
        for index, level in enumerate(levels):
            if level.shape[-1] != width:
                level = Linear(
                    width,
                    ("level_embed", "embed"),
                    kernel_init=xavier(),
                    name=f"level_proj_{index}",
                    **dense,
                )(level)
            memory.append(level)
        value = Linear(
            (num_heads, head_dim),
            ("embed", "heads", "head_dim"),
            kernel_init=xavier(in_axis=0, out_axis=(1, 2)),
            name="value_proj",
            **dense,
        )(self._norm("feature_norm")(jnp.concatenate(memory, axis=1)))
        value = nn.with_logical_constraint(value, ("act_batch", "act_length", "act_heads", None))
        starts = np.cumsum([0] + [h * w for h, w in shapes])
        values = [value[:, starts[i] : starts[i + 1]] for i in range(num_levels)]

        ring = ring_offsets(num_heads, num_levels, num_points).reshape(num_heads, -1)
        # Locations and attention logits in float32: in bf16 a location near 1 is off by ~0.004,
        # a tenth of a patch on a 24×24 map.
        query_normed = self._norm("query_norm")(query).astype(jnp.float32)
        offsets = Linear(
            (num_heads, num_levels * num_points * 2),
            ("embed", "heads", "sampling"),
            kernel_init=nn.initializers.zeros,
            bias_init=lambda key, shape, dtype: jnp.asarray(ring, dtype).reshape(shape),
            dtype=jnp.float32,
            param_dtype=cfg.param_dtype,
            name="sampling_offsets",
        )(query_normed)
        logits = Linear(
            (num_heads, num_levels * num_points),
            ("embed", "heads", "sampling"),
            kernel_init=nn.initializers.zeros,
            dtype=jnp.float32,
            param_dtype=cfg.param_dtype,
            name="attention_weights",
        )(query_normed)
        offsets = offsets.reshape(batch, num_queries, num_heads, num_levels, num_points, 2)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = weights.reshape(batch, num_queries, num_heads, num_levels, num_points)
        pixels_per_unit = jnp.array([(w, h) for h, w in shapes], jnp.float32)  # [L, 2] (x, y)
        locations = (
            reference_points(shapes[0])[None, :, None, None, None, :]
            + offsets / pixels_per_unit[None, None, None, :, None, :]
        )
        sampled = multi_scale_deformable_sample(values, shapes, locations, weights)
        enhanced = Linear(
            width,
            ("heads", "head_dim", "embed"),
            num_input_axes=2,
            kernel_init=xavier(in_axis=(0, 1), out_axis=2),
            name="output_proj",
            **dense,
        )(sampled)
        x = query.astype(cfg.dtype) + enhanced
        if cfg.normalize_output:
            x = self._norm("output_norm")(x)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class VCEProjector(nn.Module):
    """VCE then LLaVA's mlp2x_gelu: L feature maps (anchor first) -> visual tokens [B, P, D].

    Parameters: ``vce`` (``VisualCueEnhancement``) and ``mlp_projector`` (``MLPProjector``).
    """

    config: VCEConfig
    out_dim: int

    @nn.compact
    def __call__(
        self,
        levels: Sequence[jnp.ndarray],
        spatial_shapes: Sequence[SpatialShape] | None = None,
    ) -> jnp.ndarray:
        """levels [B, P_l, C_l] (levels[0] the anchor [B, P, C]) -> [B, P, out_dim]."""
        cfg = self.config
        x = VisualCueEnhancement(cfg, name="vce")(levels, spatial_shapes)
        return MLPProjector(
            self.out_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="mlp_projector"
        )(x)
