"""RMSNorm and LayerNorm over the last axis, computed in float32."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, over the last axis.

    Attributes:
      epsilon: added to the mean square.
      dtype: output dtype (statistics are always float32).
      param_dtype: dtype of ``scale`` (logical axis ``norm``), initialised to ones.
    """

    epsilon: float = 1e-6
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[..., D] -> [..., D]."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(
            jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        )
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias, over the last axis.

    Attributes:
      epsilon: added to the variance.
      use_bias: learn ``bias`` (zeros) alongside ``scale`` (ones); both on logical axis ``norm``.
    """

    epsilon: float = 1e-6
    use_bias: bool = True
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[..., D] -> [..., D]."""
        features = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (features,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                (features,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(kind: str, **kwargs) -> nn.Module:
    """Returns ``RMSNorm`` for "rmsnorm" and ``LayerNorm`` for "layernorm"."""
    if kind == "rmsnorm":
        return RMSNorm(**kwargs)
    if kind == "layernorm":
        return LayerNorm(**kwargs)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'rmsnorm' or 'layernorm'")
