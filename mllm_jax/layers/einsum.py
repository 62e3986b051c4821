"""A projection whose kernel has any shape and named logical axes, with an optional bias."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


class Einsum(nn.Module):
    """Holds ``kernel`` of ``shape`` and applies ``jnp.einsum(equation, x, kernel) (+ bias)``.

    Attributes:
      shape: kernel shape, e.g. (E, H, D) for a query projection.
      logical_axes: one logical name per kernel dimension, e.g. ("embed", "heads", "head_dim").
      in_axis: kernel dimension(s) contracted with the input (the fan-in of the LeCun-normal init).
      out_axis: the remaining kernel dimension(s).
      use_bias: add ``bias`` (zeros at init), shaped like the ``out_axis`` dimensions of the
        kernel; the equation's output must end with those dimensions, in order (e.g.
        "bne,ehd->bnhd" with out_axis (1, 2)), as every projection here does.
    """

    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    in_axis: int | tuple[int, ...] = 0
    out_axis: int | tuple[int, ...] = -1
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, equation: str, x: jnp.ndarray) -> jnp.ndarray:
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(
                f"kernel shape {self.shape} needs one logical name per dim, got {self.logical_axes}"
            )
        init = nn.initializers.lecun_normal(in_axis=self.in_axis, out_axis=self.out_axis)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.logical_axes),
            self.shape,
            self.param_dtype,
        )
        y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if not self.use_bias:
            return y
        out_axes = (self.out_axis,) if isinstance(self.out_axis, int) else self.out_axis
        out_axes = [a % len(self.shape) for a in out_axes]
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(
                nn.initializers.zeros, tuple(self.logical_axes[a] for a in out_axes)
            ),
            tuple(self.shape[a] for a in out_axes),
            self.param_dtype,
        )
        return y + bias.astype(self.dtype)
