"""Transformer feed-forward blocks: SwiGLU (gated) and GELU."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.layers.lora import AdapterConfig, make_projection

ACTIVATIONS = ("swiglu", "gelu")


class MLP(nn.Module):
    """Position-wise feed-forward network without biases.

    ``swiglu``: wo(silu(x wi_gate) * (x wi_up)); ``gelu``: wo(gelu(x wi)) with exact (erf) GELU.

    Attributes:
      hidden_dim: inner width F.
      activation: "swiglu" or "gelu".
      adapter: LoRA / Dual-LoRA on the projections it targets (``wi_gate``, ``wi_up``, ``wi``,
        ``wo``); their adapter params sit beside ``kernel``.

    Parameters (logical axes): ``wi_gate``, ``wi_up`` or ``wi`` [embed, mlp]; ``wo`` [mlp, embed].
    """

    hidden_dim: int
    activation: str = "swiglu"
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    adapter: AdapterConfig = AdapterConfig(kind="none")

    def _dense(self, shape: tuple[int, int], axes: tuple[str, str], name: str) -> nn.Module:
        return make_projection(
            name,
            shape=shape,
            logical_axes=axes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
        )

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, N, E] -> [B, N, E]."""
        in_shape = (x.shape[-1], self.hidden_dim)
        if self.activation == "swiglu":
            gate = self._dense(in_shape, ("embed", "mlp"), "wi_gate")("...e,ef->...f", x)
            up = self._dense(in_shape, ("embed", "mlp"), "wi_up")("...e,ef->...f", x)
            hidden = nn.silu(gate) * up
        elif self.activation == "gelu":
            hidden = self._dense(in_shape, ("embed", "mlp"), "wi")("...e,ef->...f", x)
            hidden = nn.gelu(hidden, approximate=False)
        else:
            raise ValueError(
                f"unknown MLP activation {self.activation!r}; expected one of {ACTIVATIONS}"
            )
        hidden = nn.with_logical_constraint(hidden, ("act_batch", "act_length", "act_mlp"))
        return self._dense((self.hidden_dim, x.shape[-1]), ("mlp", "embed"), "wo")(
            "...f,fe->...e", hidden
        )
