"""Sparse mixture-of-experts feed-forward layer (SPEC §5) and its sown losses and metrics.

Every MoE layer sows into the ``"moe"`` collection (only when the caller makes it mutable:
``model.apply(..., mutable=["moe"])``): ``aux_loss`` (the weighted sum that joins the training
loss), ``load_balance_loss``, ``router_z_loss``, ``expert_load`` [E], ``dropped_fraction`` and
``router_entropy``. ``summarize_moe`` folds them over layers into one loss and a metrics dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.layers import moe_routing as routing
from mllm_jax.layers.mlp import MLP

MOE_COLLECTION = "moe"
MOE_MODES = ("dropless", "capacity")
EXPERT_AXIS = "exp"
ACT_EXPERT_AXIS = "act_exp"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A sparse MoE feed-forward in place of the dense MLP of some decoder blocks.

    Attributes:
      num_experts: E.
      top_k: k experts per token (token choice).
      mode: "dropless" (grouped matmul, no token dropped) or "capacity" (static shapes; tokens
        past an expert's capacity are dropped for that expert).
      capacity_factor: scales the capacity C (see ``moe_routing.expert_capacity``).
      renormalize_gates: gates sum to 1 over the k choices (Mixtral); False keeps the raw
        probabilities (Switch). With k = 1 renormalising makes every gate 1, so the router then
        learns from the auxiliary losses alone.
      every: blocks i with ``i % every == 0`` get the MoE feed-forward, the others stay dense.
      expert_mlp_dim: inner width F of each expert; 0 means the stack's ``mlp_dim``.
      shared_expert_mlp_dim: width of a dense expert every token also passes (0: none).
      router_init_std: the router kernel starts as N(0, std^2).
      load_balance_weight: weight of the load-balancing loss in ``aux_loss``.
      z_loss_weight: weight of the router z-loss in ``aux_loss``.
    """

    num_experts: int
    top_k: int = 2
    mode: str = "dropless"
    capacity_factor: float = 1.25
    renormalize_gates: bool = True
    every: int = 1
    expert_mlp_dim: int = 0
    shared_expert_mlp_dim: int = 0
    router_init_std: float = 0.02
    load_balance_weight: float = 0.01
    z_loss_weight: float = 1e-3

    def __post_init__(self):
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"moe.{name} must be a positive int, got {value!r}")

        for name in ("num_experts", "top_k", "every"):
            positive_int(name)
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}")
        if self.mode not in MOE_MODES:
            raise ValueError(f"moe.mode {self.mode!r} is not one of {MOE_MODES}")
        if not self.capacity_factor > 0:
            raise ValueError(f"moe.capacity_factor must be positive, got {self.capacity_factor}")
        for name in ("expert_mlp_dim", "shared_expert_mlp_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("router_init_std", "load_balance_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")


class MoEFeedForward(nn.Module):
    """y = Σ_j gate_j · FFN_{expert_j}(x) over each token's top-k experts (+ a shared expert).

    The router runs in float32: logits = x W_r, p = softmax(logits), (gate, expert) = top_k(p).
    Each expert is a bias-free SwiGLU or GELU feed-forward like ``MLP``.

    ``capacity`` mode groups tokens by sequence (a group is one row of the batch, T = N tokens)
    and gives every expert C = min(ceil(k · N / E · capacity_factor), N) slots per group. Slots
    are filled in priority order: all top-1 choices (in token order), then all top-2 choices, ...
    An assignment past C is dropped: it contributes zero, so a token dropped by all its experts
    leaves the layer as 0 and the block's residual carries it unchanged. Dispatch and combine
    are einsums with [B, N, E, C] one-hot tensors; shapes are static.

    ``dropless`` mode repeats each token k times, sorts the B·N·k copies by expert, runs each
    expert on its contiguous group with ``jax.lax.ragged_dot`` (group sizes = tokens per expert),
    scatters the results back and sums them weighted by the gates in float32.

    Expert parallelism: expert kernels carry the logical axis ``exp`` (rule ``exp -> expert``);
    in capacity mode the dispatched [B, E, C, D] activations are constrained to
    (``act_batch``, ``act_exp``, ...), so XLA moves tokens to their experts' devices.

    Attributes:
      config: E, k, mode, capacity, loss weights (``MoEConfig``).
      hidden_dim: F, each expert's inner width.
      activation: "swiglu" or "gelu".

    Parameters (logical axes): ``router`` [embed, exp]; ``wi_gate``, ``wi_up`` (SwiGLU) or
    ``wi`` (GELU) [exp, embed, mlp]; ``wo`` [exp, mlp, embed]; ``shared_expert`` an ``MLP``.
    """

    config: MoEConfig
    hidden_dim: int
    activation: str = "swiglu"
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def _kernel(self, name: str, shape: tuple[int, int, int], axes: tuple[str, ...]):
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        kernel = self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
        return kernel.astype(self.dtype)

    def _expert_kernels(self, embed_dim: int) -> dict[str, jnp.ndarray]:
        experts, hidden = self.config.num_experts, self.hidden_dim
        in_axes, out_axes = (EXPERT_AXIS, "embed", "mlp"), (EXPERT_AXIS, "mlp", "embed")
        if self.activation == "swiglu":
            names = ("wi_gate", "wi_up")
        elif self.activation == "gelu":
            names = ("wi",)
        else:
            raise ValueError(
                f"unknown MoE activation {self.activation!r}; expected 'swiglu' or 'gelu'"
            )
        kernels = {n: self._kernel(n, (experts, embed_dim, hidden), in_axes) for n in names}
        kernels["wo"] = self._kernel("wo", (experts, hidden, embed_dim), out_axes)
        return kernels

    def _activate(self, project) -> jnp.ndarray:
        """Applies the activation to ``project(name)`` = the input projected by kernel ``name``."""
        if self.activation == "swiglu":
            return nn.silu(project("wi_gate")) * project("wi_up")
        return nn.gelu(project("wi"), approximate=False)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, N, D] -> [B, N, D] in ``dtype``."""
        cfg = self.config
        embed_dim = x.shape[-1]
        router = self.param(
            "router",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.router_init_std), ("embed", EXPERT_AXIS)
            ),
            (embed_dim, cfg.num_experts),
            self.param_dtype,
        )
        logits = jnp.einsum(
            "bnd,de->bne",
            x.astype(jnp.float32),
            router.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        gates, experts, probs = routing.route_top_k(
            logits, cfg.top_k, renormalize=cfg.renormalize_gates
        )
        kernels = self._expert_kernels(embed_dim)
        x = x.astype(self.dtype)
        if cfg.mode == "capacity":
            out, dropped_fraction = self._capacity_forward(x, gates, experts, kernels)
        else:
            out, dropped_fraction = self._dropless_forward(x, gates, experts, kernels), 0.0
        if cfg.shared_expert_mlp_dim:
            out = out + MLP(
                hidden_dim=cfg.shared_expert_mlp_dim,
                activation=self.activation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="shared_expert",
            )(x)
        self._sow_statistics(logits, probs, experts, dropped_fraction)
        return out

    def _capacity_forward(self, x, gates, experts, kernels):
        """Einsum dispatch into [B, E, C, D] expert buffers and einsum combine back."""
        cfg = self.config
        capacity = routing.expert_capacity(
            x.shape[1], cfg.num_experts, cfg.top_k, cfg.capacity_factor
        )
        slots = routing.capacity_slots(experts, cfg.num_experts, capacity)
        dispatch, combine = routing.dispatch_and_combine(
            experts, gates, slots, cfg.num_experts, capacity
        )
        buffers = jnp.einsum("bnec,bnd->becd", dispatch.astype(self.dtype), x)
        buffers = nn.with_logical_constraint(
            buffers, ("act_batch", ACT_EXPERT_AXIS, None, "act_embed")
        )
        hidden = self._activate(lambda name: jnp.einsum("becd,edf->becf", buffers, kernels[name]))
        hidden = nn.with_logical_constraint(hidden, ("act_batch", ACT_EXPERT_AXIS, None, "act_mlp"))
        expert_out = jnp.einsum("becf,efd->becd", hidden, kernels["wo"])
        expert_out = nn.with_logical_constraint(
            expert_out, ("act_batch", ACT_EXPERT_AXIS, None, "act_embed")
        )
        out = jnp.einsum("becd,bnec->bnd", expert_out.astype(jnp.float32), combine)
        dropped_fraction = jnp.mean((slots < 0).astype(jnp.float32))
        return out.astype(self.dtype), dropped_fraction

    def _dropless_forward(self, x, gates, experts, kernels):
        """Sort the B·N·k token copies by expert and run ``ragged_dot`` over expert groups."""
        cfg = self.config
        batch, length, embed_dim = x.shape
        tokens = x.reshape(batch * length, embed_dim)
        flat_experts = experts.reshape(-1)  # [T·k], copy i is token i // k
        order = jnp.argsort(flat_experts, stable=True)
        sorted_tokens = tokens[order // cfg.top_k]
        group_sizes = jnp.bincount(flat_experts, length=cfg.num_experts).astype(jnp.int32)
        hidden = self._activate(
            lambda name: jax.lax.ragged_dot(sorted_tokens, kernels[name], group_sizes)
        )
        sorted_out = jax.lax.ragged_dot(hidden, kernels["wo"], group_sizes)
        copies = jnp.zeros_like(sorted_out).at[order].set(sorted_out, unique_indices=True)
        copies = copies.reshape(batch, length, cfg.top_k, embed_dim).astype(jnp.float32)
        return jnp.einsum("bnk,bnkd->bnd", gates, copies).astype(self.dtype)

    def _sow_statistics(self, logits, probs, experts, dropped_fraction) -> None:
        cfg = self.config
        load_balance = routing.load_balance_loss(probs, experts)
        z_loss = routing.router_z_loss(logits)
        aux_loss = cfg.load_balance_weight * load_balance + cfg.z_loss_weight * z_loss
        load = routing.assignment_fraction(experts, cfg.num_experts) / cfg.top_k
        self.sow(MOE_COLLECTION, "aux_loss", aux_loss)
        self.sow(MOE_COLLECTION, "load_balance_loss", load_balance)
        self.sow(MOE_COLLECTION, "router_z_loss", z_loss)
        self.sow(MOE_COLLECTION, "expert_load", jax.lax.stop_gradient(load))
        self.sow(MOE_COLLECTION, "dropped_fraction", jnp.asarray(dropped_fraction, jnp.float32))
        self.sow(MOE_COLLECTION, "router_entropy", routing.router_entropy(probs))


def summarize_moe(collection: Mapping[str, Any]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Folds the ``"moe"`` variables of all layers into (aux loss, metrics).

    Works on unrolled stacks (one sown value per layer) and scanned ones (values with a leading
    ``layers`` axis). Returns the summed ``aux_loss`` of all MoE layers (float32 scalar, 0 when
    nothing was sown) and scalar metrics averaged over layers: ``moe/load_balance_loss``,
    ``moe/router_z_loss``, ``moe/dropped_fraction``, ``moe/router_entropy``, and the share of
    routing assignments per expert ``moe/expert_load/<e>`` (uniform: 1/E); plus
    ``moe/aux_loss`` itself. Metrics are empty when nothing was sown.
    """
    values: dict[str, list[jnp.ndarray]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
        name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        values.setdefault(str(name), []).append(leaf)
    if not values:
        return jnp.zeros((), jnp.float32), {}
    aux_loss = sum(jnp.sum(v.astype(jnp.float32)) for v in values.pop("aux_loss"))
    metrics = {"moe/aux_loss": aux_loss}
    for name, leaves in values.items():
        if name == "expert_load":
            stacked = jnp.concatenate([v.reshape(-1, v.shape[-1]) for v in leaves])
            for expert, share in enumerate(jnp.mean(stacked, axis=0)):
                metrics[f"moe/expert_load/{expert}"] = share
        else:
            metrics[f"moe/{name}"] = jnp.mean(jnp.concatenate([v.reshape(-1) for v in leaves]))
    return aux_loss, metrics
