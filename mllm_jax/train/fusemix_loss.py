"""FuseMix's objective (SPEC §6): latent mixup, then symmetric InfoNCE with a learned τ.

  batch of B latent pairs (B even), halves 1 = rows [0, B/2), 2 = rows [B/2, B):
  λ ~ Beta(α, α), ONE scalar per step, shared by both modalities
  z̃x = λ zx1 + (1-λ) zx2 ;  z̃y = λ zy1 + (1-λ) zy2        -> B/2 mixed pairs (row i with i + B/2)
  u = normalize(f_X(z̃x)), v = normalize(f_Y(z̃y))
  L = ½ [CE(u vᵀ/τ, diag) + CE(v uᵀ/τ, diag)]

Mixing a pair with a pair gives a new, still paired, sample: image i mixed with image j goes with
caption i mixed with caption j in the same proportion. Without mixup the B pairs go into the loss
as they are (a contrastive batch of B rather than B/2).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def mix_weight(rng: jax.Array, alpha: float) -> jnp.ndarray:
    """λ ~ Beta(α, α), a float32 scalar."""
    return jax.random.beta(rng, alpha, alpha, dtype=jnp.float32)


def fusemix(
    z_x: jnp.ndarray, z_y: jnp.ndarray, lam: jnp.ndarray | float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[B, d_x], [B, d_y] paired latents -> [B/2, d_x], [B/2, d_y] mixed with one λ.

    Raises:
      ValueError: B is odd or the two modalities have different batch sizes.
    """
    batch = z_x.shape[0]
    if z_y.shape[0] != batch or batch % 2:
        raise ValueError(f"FuseMix needs an even batch of pairs, got {z_x.shape} and {z_y.shape}")
    half = batch // 2
    lam = jnp.asarray(lam, jnp.float32)
    return (
        lam * z_x[:half] + (1.0 - lam) * z_x[half:],
        lam * z_y[:half] + (1.0 - lam) * z_y[half:],
    )


def symmetric_info_nce(
    u: jnp.ndarray, v: jnp.ndarray, temperature: jnp.ndarray | float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(Σ_i ½(l_i^{u→v} + l_i^{v→u}), B) for [B, e] embeddings whose positives are the diagonal."""
    if u.shape != v.shape or u.ndim != 2:
        raise ValueError(f"expected two [B, e] embeddings, got {u.shape} and {v.shape}")
    logits = jnp.einsum("ie,je->ij", u, v, preferred_element_type=jnp.float32) / temperature
    diagonal = jnp.diagonal(logits)
    u_to_v = jax.nn.logsumexp(logits, axis=1) - diagonal
    v_to_u = jax.nn.logsumexp(logits, axis=0) - diagonal
    return 0.5 * jnp.sum(u_to_v + v_to_u), jnp.asarray(u.shape[0], jnp.float32)


def step_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mixing key, dropout key) of one step's key."""
    mix_rng, dropout_rng = jax.random.split(rng)
    return mix_rng, dropout_rng


def make_fusemix_loss(model: nn.Module, *, alpha: float = 1.0, mix: bool = True):
    """``(params, batch, rng) -> (loss_sum, count)`` for the grouped train step.

    ``batch``: {"image" [B, d_x], "text" [B, d_y]} latents; ``model`` a ``FuseMixModel``.
    With ``mix=False`` the batch is used unmixed (the no-FuseMix baseline).
    """

    def loss_fn(params, batch, rng):
        mix_rng, dropout_rng = step_keys(rng)
        z_x, z_y = batch["image"], batch["text"]
        if mix:
            z_x, z_y = fusemix(z_x, z_y, mix_weight(mix_rng, alpha))
        u, v, temperature = model.apply(
            {"params": params}, z_x, z_y, train=True, rngs={"dropout": dropout_rng}
        )
        return symmetric_info_nce(u, v, temperature)

    return loss_fn
