"""What a METALM training stage hands to ``trainer.train``: loss, held-out loss, answer ranking.

Training loss (SPEC §4, Eq. 1): next-token cross-entropy on the batch's ``loss_mask``, minus the
positions inside a span that would predict a token the span's bidirectional encoding has seen
(``span_target_mask``). The causal baseline trains on every target.

Held-out loss and answer ranking score every mode on the same tokens: the targets that Eq. 1
keeps for the evaluation batches' spans. A causal model reads those spans causally, a prefix-LM
as a bidirectional block in its decoder, a semi-causal model through its encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models.semi_causal_lm import SemiCausalLM, span_target_mask
from mllm_jax.train.losses import head_cross_entropy_loss
from mllm_jax.train.step import SumLossFn

IMAGE_KEYS = ("images", "image_slot", "image_patch")


def _outputs(
    model: SemiCausalLM,
    params: Any,
    batch: dict,
    rng: jax.Array | None = None,
    return_hidden: bool = False,
):
    """The model's logits [B, N, V] on ``batch``, or its final hidden states [B, N, D]."""
    images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    return model.apply(
        {"params": params},
        batch["tokens"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        span_ids=batch["span_ids"],
        return_hidden=return_hidden,
        rngs=None if rng is None else {"dropout": rng},
        **images,
    )


def _semi_causal_head(model: SemiCausalLM, hidden: jnp.ndarray) -> jnp.ndarray:
    """The LM head of a SemiCausalLM (a ``method=``): [B, C, D] hidden -> [B, C, V] logits."""
    return model.lm.logits(hidden)


def _loss_sums(model, params, batch, mask, rng=None, chunk_size: int = 0):
    outputs = _outputs(model, params, batch, rng, return_hidden=bool(chunk_size))
    return head_cross_entropy_loss(
        model, params, outputs, batch["targets"], mask,
        head=_semi_causal_head, chunk_size=chunk_size,
    )  # fmt: skip


def scored_mask(batch: dict) -> jnp.ndarray:
    """[B, N] float32: the batch's ``loss_mask`` where Eq. 1 keeps the target."""
    return batch["loss_mask"] * span_target_mask(batch["span_ids"]).astype(jnp.float32)


def semi_causal_loss_fn(model: SemiCausalLM, *, loss_chunk_size: int = 0) -> SumLossFn:
    """``(params, batch, rng) -> (loss_sum, num_targets)`` on a batch with ``span_ids``.

    Eq. 1's exclusions apply in prefix and semi-causal modes; causal mode trains every target.
    ``loss_chunk_size`` > 0 computes the logits that many positions at a time (config
    ``model.loss_chunk_size``).
    """
    exclude = model.config.mode != "causal"

    def loss_fn(params: Any, batch: dict, rng: jax.Array):
        mask = scored_mask(batch) if exclude else batch["loss_mask"]
        return _loss_sums(model, params, batch, mask, rng, loss_chunk_size)

    return loss_fn


def make_heldout_loss(model: SemiCausalLM, *, loss_chunk_size: int = 0):
    """``(params, batches) -> mean cross-entropy`` over the Eq. 1 targets of ``batches``;
    ``loss_chunk_size`` as ``semi_causal_loss_fn``."""

    @jax.jit
    def sums(params, batch):
        return _loss_sums(model, params, batch, scored_mask(batch), chunk_size=loss_chunk_size)

    def heldout_loss(params: Any, batches: Sequence[dict]) -> float:
        total, count = 0.0, 0.0
        for batch in batches:
            loss_sum, num = jax.device_get(sums(params, batch))
            total, count = total + float(loss_sum), count + float(num)
        if count == 0:
            raise ValueError("the held-out batches hold no scored target")
        return total / count

    return heldout_loss


def make_sequence_scorer(model: SemiCausalLM):
    """``(params, batch) -> [B]`` summed log-likelihood of each row's scored targets."""

    @jax.jit
    def score(params, batch):
        log_probs = jax.nn.log_softmax(_outputs(model, params, batch), axis=-1)
        picked = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(picked * scored_mask(batch), axis=1)

    return score


def rank_answers(
    scorer, params: Any, candidate_batches: Sequence[dict], num_candidates: int
) -> np.ndarray:
    """Index of the most likely candidate per question.

    ``candidate_batches``: rows ordered question-major (question q's candidate c is row
    q·num_candidates + c over the concatenated batches), each scoring its answer tokens.
    """
    scores = np.concatenate([np.asarray(scorer(params, b)) for b in candidate_batches])
    if len(scores) % num_candidates:
        raise ValueError(f"{len(scores)} rows are not a multiple of {num_candidates} candidates")
    return scores.reshape(-1, num_candidates).argmax(axis=1)
