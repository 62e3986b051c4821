"""Symmetric multi-positive InfoNCE: CLIP's loss for batches where captions repeat.

With few distinct captions (easy-VQA has 24), a batch holds many pairs with the same caption, and
CLIP's one-positive-per-row loss would push apart an image and a caption that match. Here row i's
positives are all j with ``labels[j] == labels[i]``. With logits s = scale · img · txtᵀ [B, B],
p = softmax over a row, P(i) = {j : labels[j] == labels[i]}:

  "mass" (default)  l_i = -log Σ_{j∈P(i)} p_ij            (log of the softmax mass on positives)
  "supcon"          l_i = -1/|P(i)| Σ_{j∈P(i)} log p_ij   (SupCon's L_out: mean log-likelihood)

loss_sum = Σ_i (l_i^{image→text} + l_i^{text→image}) / 2, count = B. Both forms equal CLIP's
loss when all labels differ. They differ in the text→image direction, where a caption's
positives are several different images: "supcon" also asks them to be equally likely, so part of
its gradient moves probability between images that already match (its minimum is log |P(i)|, not
0); "mass" only separates positives from negatives. On easy-VQA (24 captions) "mass" was never
worse: zero-shot shape accuracy 0.89 vs 0.82 (batch 256, 200 steps), 0.98 for both at batch 128
and 800 steps (experiments/stage0_vision_sweep.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MULTI_POSITIVE_FORMS = ("mass", "supcon")


def _row_losses(logits: jnp.ndarray, positives: jnp.ndarray, form: str) -> jnp.ndarray:
    """[B, B] logits and bool positives (each row has >= 1) -> [B] per-row losses."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if form == "mass":
        return -jax.nn.logsumexp(jnp.where(positives, log_probs, -jnp.inf), axis=-1)
    weights = positives.astype(log_probs.dtype)
    return -jnp.sum(log_probs * weights, axis=-1) / jnp.sum(weights, axis=-1)


def multi_positive_info_nce(
    image_emb: jnp.ndarray,
    text_emb: jnp.ndarray,
    logit_scale: jnp.ndarray | float,
    labels: jnp.ndarray,
    *,
    form: str = "mass",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Summed symmetric multi-positive InfoNCE over a batch, and the row count.

    Args:
      image_emb: [B, C] image embeddings (L2-normalised by the caller, as in CLIP).
      text_emb: [B, C] text embeddings of the paired captions (likewise normalised).
      logit_scale: scalar multiplying the cosine similarities (CLIP's exp(t)).
      labels: [B] int, the caption class of each pair; equal labels are positives.
      form: "mass" or "supcon" (see the module docstring).

    Returns:
      (loss_sum, count): float32 Σ_i of the mean of the two directions' losses, and float32 B.
    """
    if form not in MULTI_POSITIVE_FORMS:
        raise ValueError(f"form {form!r} is not one of {MULTI_POSITIVE_FORMS}")
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"expected two [B, C] embeddings, got {image_emb.shape}, {text_emb.shape}")
    if labels.shape != image_emb.shape[:1]:
        raise ValueError(f"labels {labels.shape} do not match the batch {image_emb.shape[:1]}")
    logits = jnp.einsum(
        "ic,jc->ij", image_emb, text_emb, preferred_element_type=jnp.float32
    ) * jnp.asarray(logit_scale, jnp.float32)
    positives = labels[:, None] == labels[None, :]
    image_to_text = _row_losses(logits, positives, form)
    text_to_image = _row_losses(logits.T, positives, form)
    loss_sum = 0.5 * jnp.sum(image_to_text + text_to_image)
    return loss_sum, jnp.asarray(labels.shape[0], jnp.float32)
