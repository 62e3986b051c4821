"""Training losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.layers.moe import MOE_COLLECTION, summarize_moe


def _masked_nll_sum(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """sum(weights * -log softmax(logits)[targets]) in float32; logits [..., V], the rest [...]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights)


def cross_entropy_loss(
    logits: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Summed masked cross-entropy of ``targets`` under ``logits`` (the batch contract's form).

    Args:
      logits: [B, N, V]; position t scores ``targets[:, t]`` (the next token).
      targets: [B, N] int ids.
      loss_mask: [B, N], 1 where position t is trained (0 on padding, prompts, across segments).

    Returns:
      (sum of masked negative log-likelihoods, sum of the mask), both float32 scalars.
    """
    weights = loss_mask.astype(jnp.float32)
    return _masked_nll_sum(logits, targets, weights), jnp.sum(weights)


def chunked_cross_entropy_loss(
    hidden: jnp.ndarray,
    project: Callable[[jnp.ndarray], jnp.ndarray],
    targets: jnp.ndarray,
    loss_mask: jnp.ndarray,
    *,
    chunk_size: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``cross_entropy_loss(project(hidden), targets, loss_mask)`` without [B, N, V] logits.

    The sequence is cut into chunks of ``chunk_size`` positions (the last one padded and
    masked); each chunk's logits are computed, reduced to its loss and dropped, in the forward
    pass and, recomputed under ``jax.checkpoint``, in the backward pass. So at most one chunk's
    [B, chunk_size, V] float32 logits (and their gradient) are live at a time.

    Args:
      hidden: [B, N, E] final hidden states (after the final norm).
      project: the output head, [B, C, E] -> [B, C, V] logits (for a DecoderLM its ``logits``
        method, so tied/untied weights and dtype casts are exactly the model's).
      targets: [B, N] int ids; loss_mask: [B, N], as ``cross_entropy_loss``.
      chunk_size: positions per chunk, >= 1.

    Returns:
      (sum of masked negative log-likelihoods, sum of the mask), both float32 scalars.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, length = targets.shape
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    weights = loss_mask.astype(jnp.float32)
    count = jnp.sum(weights)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def chunks(x):  # [B, K·C, ...] -> [K, B, C, ...]
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(h, t, w):
        return _masked_nll_sum(project(h), t, w)

    def accumulate(total, chunk):
        return total + chunk_loss(*chunk), None

    total, _ = jax.lax.scan(
        accumulate,
        jnp.zeros((), jnp.float32),
        (chunks(hidden), chunks(targets), chunks(weights)),
    )
    return total, count


def loss_chunk_size_from(model_config: Any) -> int:
    """A config's ``model.loss_chunk_size`` (0, the plain loss, when absent).

    Raises:
      ValueError: if it is negative.
    """
    chunk_size = int(model_config.get("loss_chunk_size", 0))
    if chunk_size < 0:
        raise ValueError(f"model.loss_chunk_size must be >= 0 (0: plain loss), got {chunk_size}")
    return chunk_size


def head_cross_entropy_loss(
    model: nn.Module,
    params: Any,
    outputs: jnp.ndarray,
    targets: jnp.ndarray,
    loss_mask: jnp.ndarray,
    *,
    head: Callable,
    chunk_size: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(loss_sum, num_targets) of a model's outputs, plain or chunked.

    ``chunk_size`` 0: ``outputs`` are the logits [B, N, V] (``cross_entropy_loss``). Otherwise
    they are the final hidden states [B, N, E] (the model's ``return_hidden=True``) and
    ``model.apply({"params": params}, h, method=head)`` is the head applied per chunk
    (``chunked_cross_entropy_loss``).
    """
    if not chunk_size:
        return cross_entropy_loss(outputs, targets, loss_mask)

    def project(hidden):
        return model.apply({"params": params}, hidden, method=head)

    return chunked_cross_entropy_loss(outputs, project, targets, loss_mask, chunk_size=chunk_size)


def apply_with_moe_losses(
    model: nn.Module, variables: Any, *args, **kwargs
) -> tuple[Any, jnp.ndarray, dict[str, jnp.ndarray]]:
    """``model.apply(variables, *args, **kwargs)`` that also collects what MoE layers sow.

    Returns (the model's output, the weighted MoE auxiliary loss to add to the mean training
    loss — load balance + router z-loss, float32 scalar, 0 without MoE layers — and the MoE
    metrics of ``layers.moe.summarize_moe``, empty without MoE layers).
    """
    out, state = model.apply(variables, *args, mutable=[MOE_COLLECTION], **kwargs)
    aux_loss, metrics = summarize_moe(state.get(MOE_COLLECTION, {}))
    return out, aux_loss, metrics
