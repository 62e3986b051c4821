"""FuseMix's fusion adapters: small MLPs mapping frozen latents into one shared space (SPEC §6).

  adapter f(z) = Linear(d -> e)( LN( Block^n(z) ) ),  z [B, d] -> [B, e]
  Block(x) = x + W2(Dropout(GELU(W1(LN(x)))))          W1: d -> r·d (r = 4 in the paper)
  FuseMixModel: u = normalize(f_X(z_x)), v = normalize(f_Y(z_y)), and the temperature τ

τ is a learnable scalar (init 0.07) used clipped to [0.001, 0.5]; ``clamp_temperature`` also
puts the parameter itself back into that range after every update (as the paper's code does in
place), so it never sits outside where the clipped value has no gradient.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.layers.norms import LayerNorm
from mllm_jax.layers.projectors import Linear

TEMPERATURE_RANGE = (0.001, 0.5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Hyper-parameters of both adapters (paper: e 512, n 4, r 4, dropout 0.6)."""

    embed_dim: int = 512
    num_blocks: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.6
    temperature_init: float = 0.07


class ResidualBlock(nn.Module):
    """x + W2(Dropout(GELU(W1(LN(x))))) over [B, d], hidden width ``hidden_dim``."""

    hidden_dim: int
    dropout: float

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        h = LayerNorm(epsilon=1e-5, name="norm")(x)
        h = nn.gelu(Linear(self.hidden_dim, ("embed", "mlp"), name="fc1")(h), approximate=False)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return x + Linear(x.shape[-1], ("mlp", "embed"), name="fc2")(h)


class FusionAdapter(nn.Module):
    """f(z) = Linear(LN(Block^n(z))): [B, d] -> [B, e] (not normalised)."""

    config: AdapterConfig

    @nn.compact
    def __call__(self, z: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        c = self.config
        hidden_dim = max(1, round(z.shape[-1] * c.mlp_ratio))
        x = z.astype(jnp.float32)
        for i in range(c.num_blocks):
            x = ResidualBlock(hidden_dim, c.dropout, name=f"block_{i}")(x, train=train)
        x = LayerNorm(epsilon=1e-5, name="norm")(x)
        return Linear(c.embed_dim, ("embed", "joint"), name="head")(x)


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class FuseMixModel(nn.Module):
    """The image and text adapters and the temperature.

    Parameters: ``image_adapter/...``, ``text_adapter/...``, ``temperature`` [] (raw; use
    ``temperature()``, which clips it).
    """

    config: AdapterConfig

    def setup(self):
        self.image_adapter = FusionAdapter(self.config)
        self.text_adapter = FusionAdapter(self.config)
        self.raw_temperature = self.param(
            "temperature",
            nn.with_logical_partitioning(
                nn.initializers.constant(self.config.temperature_init), ()
            ),
            (),
            jnp.float32,
        )

    def temperature(self) -> jnp.ndarray:
        """τ clipped to ``TEMPERATURE_RANGE``, a scalar."""
        return jnp.clip(self.raw_temperature, *TEMPERATURE_RANGE)

    def embed_images(self, z_x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        """[B, d_x] image latents -> [B, e] unit vectors u."""
        return l2_normalize(self.image_adapter(z_x, train=train))

    def embed_texts(self, z_y: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        """[B, d_y] text latents -> [B, e] unit vectors v."""
        return l2_normalize(self.text_adapter(z_y, train=train))

    def __call__(self, z_x, z_y, *, train: bool = False):
        """-> (u [B, e], v [B, e], τ [])."""
        return (
            self.embed_images(z_x, train=train),
            self.embed_texts(z_y, train=train),
            self.temperature(),
        )


def clamp_temperature(params: dict) -> dict:
    """``params`` with the raw ``temperature`` put back into ``TEMPERATURE_RANGE``."""
    return {**params, "temperature": jnp.clip(params["temperature"], *TEMPERATURE_RANGE)}


def count_flops_per_pair(config: AdapterConfig, image_dim: int, text_dim: int) -> int:
    """Forward matmul FLOPs of both adapters for one (image, text) latent pair."""

    def adapter(d):
        hidden = max(1, round(d * config.mlp_ratio))
        return 2 * (config.num_blocks * 2 * d * hidden + d * config.embed_dim)

    return adapter(image_dim) + adapter(text_dim)
