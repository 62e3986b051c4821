"""Pre-norm transformer block and a decoder stack with optional ``nn.scan`` and ``nn.remat``."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.layers.attention import ATTENTION_BIAS, MultiHeadAttention
from mllm_jax.layers.cross_attention import GatedCrossAttentionBlock
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.mlp import ACTIVATIONS, MLP
from mllm_jax.layers.moe import MOE_COLLECTION, MoEConfig, MoEFeedForward
from mllm_jax.layers.norms import make_norm
from mllm_jax.layers.rope import RopeScaling

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_NAMES = ("query", "key", "value", "out")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Hyper-parameters shared by every block of a stack.

    ``scan_layers`` stacks the blocks' params along a leading ``layers`` axis and runs them with
    ``nn.scan`` (one compiled block: fast compiles on TPU); ``remat_policy`` (a key of
    ``REMAT_POLICIES``) recomputes activations in the backward pass to save memory.
    ``adapter`` puts LoRA / Dual-LoRA on the attention and MLP projections it targets.
    ``cross_attention_every`` > 0 inserts a gated cross-attention block (Flamingo) before
    blocks 0, k, 2k, ... (unrolled stacks only). ``decode`` keeps a KV cache for generation.
    ``moe`` replaces the dense MLP of blocks 0, every, 2·every, ... by a sparse MoE feed-forward
    (scanned stacks with ``moe.every`` > 1 scan groups of ``every`` blocks).
    ``attention_bias`` ("none", "qkv", "all") and ``mlp_bias`` add biases to the projections,
    as imported checkpoints need (Qwen2: "qkv"; CLIP and SigLIP: "all" and ``mlp_bias``).
    ``rope_scaling`` rescales the RoPE frequencies (Llama 3.1's "llama3", "linear"); None keeps
    the plain ladder of base ``rope_max_wavelength``.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    mlp_activation: str = "swiglu"
    norm: str = "rmsnorm"
    norm_epsilon: float = 1e-6
    use_rope: bool = True
    rope_max_wavelength: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    adapter: AdapterConfig = AdapterConfig(kind="none")
    cross_attention_every: int = 0
    decode: bool = False
    moe: MoEConfig | None = None
    attention_bias: str = "none"
    mlp_bias: bool = False

    def __post_init__(self):
        if self.attention_bias not in ATTENTION_BIAS:
            raise ValueError(
                f"attention_bias {self.attention_bias!r} is not one of {ATTENTION_BIAS}"
            )
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation {self.mlp_activation!r} is not one of {ACTIVATIONS}")
        if self.moe is not None and self.scan_layers and self.num_layers % self.moe.every:
            raise ValueError(
                f"moe.every={self.moe.every} must divide num_layers={self.num_layers} when the "
                "layers are scanned (one scanned step is a group of `every` blocks)"
            )
        if self.cross_attention_every < 0:
            raise ValueError(
                f"cross_attention_every must be >= 0, got {self.cross_attention_every}"
            )
        if self.cross_attention_every and self.scan_layers:
            raise ValueError("cross_attention_every needs an unrolled stack (scan_layers=False)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        mlp_names = ("wi_gate", "wi_up", "wo") if self.mlp_activation == "swiglu" else ("wi", "wo")
        absent = [t for t in self.adapter.targets if t not in ATTENTION_NAMES + mlp_names]
        if self.adapter.kind != "none" and absent:
            raise ValueError(
                f"adapter targets {absent} are not projections of this block "
                f"(attention {ATTENTION_NAMES}, {self.mlp_activation} MLP {mlp_names})"
            )


class TransformerBlock(nn.Module):
    """x + Attn(Norm(x)), then + MLP(Norm(.)) (or + MoE(Norm(.)) when ``use_moe``).

    Returns ``(x, None)`` when ``config.scan_layers`` (the ``nn.scan`` carry convention), else x.
    The MoE feed-forward's params live under ``moe`` instead of ``mlp``.
    """

    config: TransformerConfig
    use_moe: bool = False

    def _norm(self, name: str) -> nn.Module:
        cfg = self.config
        return make_norm(
            cfg.norm,
            epsilon=cfg.norm_epsilon,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None, positions: jnp.ndarray):
        """x [B, N, E], mask [B, 1, N, S] bool (S = N unless decoding), positions [B, N]."""
        cfg = self.config
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        attended = MultiHeadAttention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            use_rope=cfg.use_rope,
            rope_max_wavelength=cfg.rope_max_wavelength,
            rope_scaling=cfg.rope_scaling,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            adapter=cfg.adapter,
            decode=cfg.decode,
            bias=cfg.attention_bias,
            name="attention",
        )(self._norm("pre_attention_norm")(x), mask, positions)
        x = x + attended
        if self.use_moe:
            feed_forward = MoEFeedForward(
                config=cfg.moe,
                hidden_dim=cfg.moe.expert_mlp_dim or cfg.mlp_dim,
                activation=cfg.mlp_activation,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="moe",
            )
        else:
            feed_forward = MLP(
                hidden_dim=cfg.mlp_dim,
                activation=cfg.mlp_activation,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                adapter=cfg.adapter,
                use_bias=cfg.mlp_bias,
                name="mlp",
            )
        x = x + feed_forward(self._norm("pre_mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return (x, None) if cfg.scan_layers else x


class TransformerBlockGroup(nn.Module):
    """``moe.every`` consecutive blocks, the first with the MoE feed-forward: one scanned step.

    Params ``block_0`` ... ``block_{every-1}``; returns ``(x, None)`` like a scanned block.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None, positions: jnp.ndarray):
        """x [B, N, E], mask [B, 1, N, S] bool, positions [B, N]."""
        block_cls = _maybe_remat(TransformerBlock, self.config)
        for j in range(self.config.moe.every):
            x, _ = block_cls(self.config, use_moe=j == 0, name=f"block_{j}")(x, mask, positions)
        return x, None


def _maybe_remat(block_cls: type[nn.Module], cfg: TransformerConfig) -> type[nn.Module]:
    if cfg.remat_policy == "none":
        return block_cls
    # Under scan, CSE cannot merge the recomputation with the forward pass anyway.
    return nn.remat(
        block_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
    )


class DecoderStack(nn.Module):
    """``num_layers`` transformer blocks followed by a final norm.

    Parameter names: ``layers`` (one scanned block, leading ``layers`` axis) when
    ``scan_layers``, else ``layers_0`` ... ``layers_{L-1}``; ``cross_attention_{i}`` before
    block i with cross-attention; then ``final_norm``. A scanned stack with ``moe.every`` > 1
    scans ``TransformerBlockGroup``s: ``layers/block_j`` with a leading axis of L / every.
    MoE blocks sow their losses and metrics into the ``"moe"`` collection (scanned: stacked).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None,
        positions: jnp.ndarray,
        cross_inputs: jnp.ndarray | None = None,
        cross_mask: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """x [B, N, E], mask [B, 1, N, S] bool, positions [B, N] -> [B, N, E].

        With cross-attention: ``cross_inputs`` [B, C, E'] and ``cross_mask`` [B, 1, N, C].
        """
        cfg = self.config
        if bool(cfg.cross_attention_every) != (cross_inputs is not None):
            raise ValueError(
                f"cross_attention_every={cfg.cross_attention_every} but cross_inputs "
                f"{'given' if cross_inputs is not None else 'missing'}"
            )
        block_cls = _maybe_remat(TransformerBlock, cfg)
        moe_every = cfg.moe.every if cfg.moe is not None else 0
        if cfg.scan_layers:
            grouped = moe_every > 1
            scanned = nn.scan(
                TransformerBlockGroup if grouped else block_cls,
                variable_axes={"params": 0, "cache": 0, MOE_COLLECTION: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers // moe_every if grouped else cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            step = (
                scanned(cfg, name="layers")
                if grouped
                else scanned(cfg, moe_every == 1, name="layers")
            )
            x, _ = step(x, mask, positions)
        else:
            for i in range(cfg.num_layers):
                if cfg.cross_attention_every and i % cfg.cross_attention_every == 0:
                    x = GatedCrossAttentionBlock(
                        num_heads=cfg.num_heads,
                        head_dim=cfg.head_dim,
                        mlp_dim=cfg.mlp_dim,
                        dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype,
                        name=f"cross_attention_{i}",
                    )(x, cross_inputs, cross_mask)
                use_moe = bool(moe_every) and i % moe_every == 0
                x = block_cls(cfg, use_moe, name=f"layers_{i}")(x, mask, positions)
        return make_norm(
            cfg.norm,
            epsilon=cfg.norm_epsilon,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="final_norm",
        )(x)


def unstack_scanned_layers(stack_params: dict, num_layers: int) -> dict:
    """Converts DecoderStack params from the scanned layout to the unrolled one.

    ``{"layers": tree with leading axis L, ...}`` -> ``{"layers_0": ..., "layers_{L-1}": ...}``;
    other entries (``final_norm``) are kept. Scanned groups of ``every`` blocks (``layers/block_j``
    with leading axis L / every) unstack to block ``g * every + j``. Useful to move checkpoints
    between TPU (scanned) and CPU (unrolled, faster there) configurations.
    """
    params = dict(stack_params)
    scanned = params.pop("layers")
    every = len([k for k in scanned if str(k).startswith("block_")])
    for i in range(num_layers):
        source, index = (scanned[f"block_{i % every}"], i // every) if every else (scanned, i)
        params[f"layers_{i}"] = jax.tree_util.tree_map(lambda a, n=index: a[n], source)
    return params
