"""Learned maps between widths: ``Linear`` (kernel + bias) and LLaVA's ``MLPProjector``."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

Initializer = Callable[..., jnp.ndarray]


class Linear(nn.Module):
    """y = x · kernel + bias, contracting the last ``num_input_axes`` axes of x.

    The kernel has shape ``x.shape[-num_input_axes:] + features``, e.g. [C, H, C/H] for a
    projection into heads or [H, C/H, C] for a projection out of them.

    Attributes:
      features: output shape (an int for a single output axis).
      logical_axes: one logical name per kernel dimension, input dims first; the bias takes the
        output dims' names.
      num_input_axes: how many trailing axes of x are contracted.
      use_bias: add a learned bias of shape ``features``.
      kernel_init: initialiser of the full kernel shape; None = LeCun normal with the fan-in over
        the contracted axes (Flax's Dense default).
      bias_init: initialiser of the bias (zeros).
    """

    features: int | tuple[int, ...]
    logical_axes: tuple[str, ...]
    num_input_axes: int = 1
    use_bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[..., *in] -> [..., *features]."""
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        num_in = self.num_input_axes
        shape = tuple(x.shape[x.ndim - num_in :]) + features
        if len(shape) != len(self.logical_axes):
            raise ValueError(
                f"{self.name}: kernel shape {shape} needs one logical name per dim, "
                f"got {self.logical_axes}"
            )
        kernel_init = self.kernel_init or nn.initializers.lecun_normal(
            in_axis=tuple(range(num_in)), out_axis=tuple(range(num_in, len(shape)))
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(kernel_init, self.logical_axes),
            shape,
            self.param_dtype,
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=num_in)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, self.logical_axes[num_in:]),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class MLPProjector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear(C→D) → exact (erf) GELU → Linear(D→D), with biases.

    Attributes:
      out_dim: D, the language model's width.

    Parameters (logical axes): ``fc1/kernel`` [embed, mlp], ``fc1/bias`` [mlp],
    ``fc2/kernel`` [mlp, embed], ``fc2/bias`` [embed]. Kernels LeCun normal, biases zero.
    """

    out_dim: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, P, C] -> [B, P, D]."""
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = Linear(self.out_dim, ("embed", "mlp"), name="fc1", **dense)(x)
        hidden = nn.gelu(hidden, approximate=False)
        hidden = nn.with_logical_constraint(hidden, ("act_batch", "act_length", "act_mlp"))
        return Linear(self.out_dim, ("mlp", "embed"), name="fc2", **dense)(hidden)
