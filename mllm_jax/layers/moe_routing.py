"""Token-choice top-k routing for sparse mixture-of-experts layers (SPEC §5): pure functions.

Shapes: T tokens (or [B, N] when grouped by sequence), E experts, k choices per token, C the
per-expert capacity of one group.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def route_top_k(
    logits: jnp.ndarray, top_k: int, *, renormalize: bool
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Softmax router with token-choice top-k selection, in float32.

    Args:
      logits: [..., E] router logits.
      top_k: k, how many experts each token picks.
      renormalize: divide the k chosen probabilities by their sum (Mixtral / MaxText); otherwise
        the gates are the raw probabilities (Switch / flaxformer).

    Returns:
      (gates [..., k] float32, experts [..., k] int32 in descending probability, probs [..., E]).
      Ties go to the lower expert index.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, experts.astype(jnp.int32), probs


def expert_capacity(
    tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float
) -> int:
    """C = min(ceil(k · T / E · capacity_factor), T), T = tokens per group.

    The GShard / MaxText form with k in the numerator (every token makes k assignments); capped
    at T because one expert can receive a token at most once.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    wanted = math.ceil(top_k * tokens_per_group / num_experts * capacity_factor)
    return max(1, min(wanted, tokens_per_group))


def capacity_slots(experts: jnp.ndarray, num_experts: int, capacity: int) -> jnp.ndarray:
    """Slot of each (token, choice) in its expert's buffer, or -1 when dropped.

    Slots are given in priority order within each group: every token's top-1 choice (in token
    order) before any token's top-2 choice, and so on, so a capacity shortfall drops second
    choices first. An assignment whose slot would be >= ``capacity`` is dropped.

    Args:
      experts: [G, T, k] int expert ids per group, token and choice.
      num_experts: E.
      capacity: C, slots per expert and group.

    Returns:
      [G, T, k] int32 slots in [0, C), -1 for dropped assignments.
    """
    groups, tokens, top_k = experts.shape
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [G, T, k, E]
    by_priority = jnp.swapaxes(one_hot, 1, 2).reshape(groups, top_k * tokens, num_experts)
    position = jnp.cumsum(by_priority, axis=1) - 1
    position = jnp.sum(position * by_priority, axis=-1)  # [G, k*T]: slot in the chosen expert
    position = jnp.swapaxes(position.reshape(groups, top_k, tokens), 1, 2)
    return jnp.where(position < capacity, position, -1).astype(jnp.int32)


def dispatch_and_combine(
    experts: jnp.ndarray, gates: jnp.ndarray, slots: jnp.ndarray, num_experts: int, capacity: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Dispatch and combine tensors of capacity routing.

    Args:
      experts: [G, T, k] expert ids; gates: [G, T, k]; slots: [G, T, k] from ``capacity_slots``.

    Returns:
      dispatch [G, T, E, C] float32 (1 where token t fills slot c of expert e), combine
      [G, T, E, C] float32 (the same weighted by the token's gate for that expert).
    """
    kept = (slots >= 0)[..., None, None]
    per_choice = (
        jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)[..., None]
        * jax.nn.one_hot(slots, capacity, dtype=jnp.float32)[..., None, :]
        * kept
    )  # [G, T, k, E, C]
    dispatch = jnp.sum(per_choice, axis=2)
    combine = jnp.einsum("gtk,gtkec->gtec", gates.astype(jnp.float32), per_choice)
    return dispatch, combine


def assignment_fraction(experts: jnp.ndarray, num_experts: int) -> jnp.ndarray:
    """f_e: fraction of tokens that have e among their k choices, [E]; sums to k.

    ``experts``: [..., k] expert ids.
    """
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
    return jnp.mean(jnp.sum(one_hot, axis=-2).reshape(-1, num_experts), axis=0)


def load_balance_loss(probs: jnp.ndarray, experts: jnp.ndarray) -> jnp.ndarray:
    """Switch / GShard auxiliary loss L_aux = E · Σ_e f_e · P_e (float32 scalar).

    f_e = ``assignment_fraction`` (Σ_e f_e = k), P_e = mean router probability of expert e over
    tokens. Uniform routing gives L_aux = k; its minimum. Gradients flow through P_e only.

    Args:
      probs: [..., E] router probabilities; experts: [..., k] the chosen expert ids.
    """
    num_experts = probs.shape[-1]
    fraction = assignment_fraction(experts, num_experts)
    mean_probs = jnp.mean(probs.reshape(-1, num_experts).astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(fraction * mean_probs)


def router_z_loss(logits: jnp.ndarray) -> jnp.ndarray:
    """ST-MoE router z-loss mean_t (logsumexp_e logits_te)^2, float32 scalar. logits: [..., E]."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(log_z**2)


def router_entropy(probs: jnp.ndarray) -> jnp.ndarray:
    """Mean over tokens of -Σ_e p_e log p_e (nats), float32 scalar. probs: [..., E]."""
    probs = probs.astype(jnp.float32)
    return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))
