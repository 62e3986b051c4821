"""One adapted projection per kernel layout, shared by the LoRA, Dual-LoRA and LoRA-MoE tests."""

from __future__ import annotations

import flax.linen as nn

from mllm_jax.layers.lora import AdapterConfig, make_projection

# name -> (equation, kernel shape, logical axes, number of leading in dims, x shape).
KERNELS = {
    "dense_2d": ("bne,ef->bnf", (6, 5), ("embed", "mlp"), 1, (2, 3, 6)),
    "query_3d": ("bne,ehd->bnhd", (6, 2, 4), ("embed", "heads", "head_dim"), 1, (2, 3, 6)),
    "out_3d": ("bnhd,hde->bne", (2, 4, 6), ("heads", "head_dim", "embed"), 2, (2, 3, 2, 4)),
}


class Projection(nn.Module):
    """One projection named "wo", built by the factory the attention and MLP use."""

    case: str
    adapter: AdapterConfig

    @nn.compact
    def __call__(self, x):
        equation, shape, axes, num_in, _ = KERNELS[self.case]
        return make_projection(
            "wo",
            shape=shape,
            logical_axes=axes,
            in_axis=tuple(range(num_in)),
            out_axis=tuple(range(num_in, len(shape))),
            adapter=self.adapter,
        )(equation, x)
