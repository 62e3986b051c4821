"""Trainable adapter params of a decoder stack, analytically, and the LoRA rank matching a budget.

Used to compare adapters at equal trainable parameter count (e.g. Dual-LoRA vs plain LoRA): the
counts follow from the ``TransformerConfig`` and the embedding width alone, without building
params, and equal ``count_adapter_params`` of the initialised tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import adapter_param_count, lora_moe_param_count
from mllm_jax.layers.transformer import TransformerConfig


def projection_shapes(config: TransformerConfig, embed_dim: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every adaptable projection of one block, by name.

    Multi-dim kernels count as flattened: ``query`` is E -> H·D_h, ``out`` is H·D_h -> E.
    """
    heads = config.num_heads * config.head_dim
    kv_heads = config.num_kv_heads * config.head_dim
    shapes = {
        "query": (embed_dim, heads),
        "key": (embed_dim, kv_heads),
        "value": (embed_dim, kv_heads),
        "out": (heads, embed_dim),
        "wo": (config.mlp_dim, embed_dim),
    }
    if config.mlp_activation == "swiglu":
        shapes |= {"wi_gate": (embed_dim, config.mlp_dim), "wi_up": (embed_dim, config.mlp_dim)}
    else:
        shapes["wi"] = (embed_dim, config.mlp_dim)
    return shapes


def projection_adapter_params(d_in: int, d_out: int, adapter: AdapterConfig) -> int:
    """Params ``adapter`` adds to one d_in -> d_out projection (LoRA-MoE with its own E)."""
    if adapter.kind == "lora_moe":
        return lora_moe_param_count(d_in, d_out, adapter.rank, adapter.num_experts)
    return adapter_param_count(d_in, d_out, adapter.rank, adapter.kind)


def decoder_adapter_param_count(config: TransformerConfig, embed_dim: int) -> int:
    """Trainable params of ``config.adapter`` over the whole stack of ``config.num_layers`` blocks.

    Adapters wrap the attention projections of every block and the MLP projections of the dense
    blocks only: a block whose feed-forward is sparse MoE (blocks 0, every, 2·every, ...) has no
    MLP projections, and gated cross-attention blocks carry no adapters.
    """
    adapter = config.adapter
    if adapter.kind == "none":
        return 0
    shapes = projection_shapes(config, embed_dim)
    attention = sum(
        projection_adapter_params(*shapes[name], adapter)
        for name in adapter.targets
        if name in ("query", "key", "value", "out")
    )
    mlp = sum(
        projection_adapter_params(*shapes[name], adapter)
        for name in adapter.targets
        if name not in ("query", "key", "value", "out")
    )
    moe_blocks = len(range(0, config.num_layers, config.moe.every)) if config.moe else 0
    return config.num_layers * attention + (config.num_layers - moe_blocks) * mlp


def closest_lora_rank(
    config: TransformerConfig,
    embed_dim: int,
    budget: int,
    targets: Sequence[str] | None = None,
) -> int:
    """The plain-LoRA rank r >= 1 whose trainable params are closest to ``budget``.

    ``targets`` default to those of ``config.adapter``; alpha and dropout do not change the count.
    A LoRA's count is linear in r, so the answer is the floor or the ceiling of budget / count(1);
    on a tie the smaller rank (the one within the budget) wins.
    """
    if budget < 1:
        raise ValueError(f"budget must be a positive param count, got {budget}")
    targets = tuple(config.adapter.targets if targets is None else targets)

    def count(rank: int) -> int:
        lora = AdapterConfig(kind="lora", rank=rank, targets=targets)
        return decoder_adapter_param_count(dataclasses.replace(config, adapter=lora), embed_dim)

    per_rank = count(1)
    if per_rank == 0:
        raise ValueError(f"LoRA on {targets} adds no params to this stack (all blocks are MoE?)")
    below = max(1, budget // per_rank)
    return min((below, below + 1), key=lambda rank: (abs(count(rank) - budget), rank))
