"""Transformer feed-forward blocks: SwiGLU (gated) and the GELU family (exact, tanh, quick)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.layers.lora import AdapterConfig, make_projection


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
    """x · sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * nn.sigmoid(1.702 * x)


# The ungated activations, by the name configs use (Hugging Face's hidden_act in brackets).
UNGATED_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact, erf ("gelu")
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # SigLIP ("gelu_pytorch_tanh")
    "quick_gelu": quick_gelu,  # CLIP ("quick_gelu")
}
ACTIVATIONS = ("swiglu", *UNGATED_ACTIVATIONS)


class MLP(nn.Module):
    """Position-wise feed-forward network.

    ``swiglu``: wo(silu(x wi_gate) * (x wi_up)); ``gelu`` / ``gelu_tanh`` / ``quick_gelu``:
    wo(act(x wi)) with exact (erf) GELU, its tanh approximation, or x·sigmoid(1.702x).

    Attributes:
      hidden_dim: inner width F.
      activation: one of ``ACTIVATIONS``.
      adapter: LoRA / Dual-LoRA on the projections it targets (``wi_gate``, ``wi_up``, ``wi``,
        ``wo``); their adapter params sit beside ``kernel``.
      use_bias: every projection adds a bias (CLIP, SigLIP); Llama-style MLPs have none.

    Parameters (logical axes): ``wi_gate``, ``wi_up`` or ``wi`` [embed, mlp]; ``wo`` [mlp, embed];
    with ``use_bias`` also ``bias`` [mlp] / [embed] beside each kernel.
    """

    hidden_dim: int
    activation: str = "swiglu"
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    adapter: AdapterConfig = AdapterConfig(kind="none")
    use_bias: bool = False

    def _dense(self, shape: tuple[int, int], axes: tuple[str, str], name: str) -> nn.Module:
        return make_projection(
            name,
            shape=shape,
            logical_axes=axes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            use_bias=self.use_bias,
        )

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, N, E] -> [B, N, E]."""
        in_shape = (x.shape[-1], self.hidden_dim)
        if self.activation == "swiglu":
            gate = self._dense(in_shape, ("embed", "mlp"), "wi_gate")("...e,ef->...f", x)
            up = self._dense(in_shape, ("embed", "mlp"), "wi_up")("...e,ef->...f", x)
            hidden = nn.silu(gate) * up
        elif self.activation in UNGATED_ACTIVATIONS:
            hidden = self._dense(in_shape, ("embed", "mlp"), "wi")("...e,ef->...f", x)
            hidden = UNGATED_ACTIVATIONS[self.activation](hidden)
        else:
            raise ValueError(
                f"unknown MLP activation {self.activation!r}; expected one of {ACTIVATIONS}"
            )
        hidden = nn.with_logical_constraint(hidden, ("act_batch", "act_length", "act_mlp"))
        return self._dense((self.hidden_dim, x.shape[-1]), ("mlp", "embed"), "wo")(
            "...f,fe->...e", hidden
        )
