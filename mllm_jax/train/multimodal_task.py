"""The pieces a MultimodalLM training stage hands to ``trainer.train``: loss and data stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mllm_jax.data.builders import SampleSource
from mllm_jax.data.images import ImagePreprocessing, ImageProcessor
from mllm_jax.data.packing import PackingSpec
from mllm_jax.data.pipeline import (
    BatchStream,
    PipelineOptions,
    SampleProcessor,
    ToSampleBySource,
    make_mixed_packed_dataset,
)
from mllm_jax.data.sharded_stream import ShardedStream
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.models.decoder_lm import DecoderLM
from mllm_jax.models.multimodal_lm import MultimodalLM
from mllm_jax.train.losses import apply_with_moe_losses, head_cross_entropy_loss
from mllm_jax.train.step import SumLossFn


def multimodal_loss_fn(model: MultimodalLM, *, loss_chunk_size: int = 0) -> SumLossFn:
    """``(params, batch, rng) -> (loss_sum, num_targets, moe_metrics)`` of next-token prediction
    on a multimodal batch of the contract (``data/batch.py``); ``rng`` drives adapter dropout.
    With MoE layers in the LM, ``loss_sum`` includes their auxiliary loss times the target
    count (so the step's mean loss is cross-entropy + aux loss). ``loss_chunk_size`` > 0
    computes the logits that many positions at a time (config ``model.loss_chunk_size``)."""

    def loss_fn(params: Any, batch: dict, rng: jax.Array):
        outputs, aux_loss, moe_metrics = apply_with_moe_losses(
            model,
            {"params": params},
            batch["tokens"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
            images=batch["images"],
            image_slot=batch["image_slot"],
            image_patch=batch["image_patch"],
            return_hidden=bool(loss_chunk_size),
            rngs={"dropout": rng},
        )
        loss_sum, count = head_cross_entropy_loss(
            model, params, outputs, batch["targets"], batch["loss_mask"],
            head=_multimodal_head, chunk_size=loss_chunk_size,
        )  # fmt: skip
        return loss_sum + aux_loss * count, count, moe_metrics

    return loss_fn


def text_loss_fn(model: DecoderLM, *, loss_chunk_size: int = 0) -> SumLossFn:
    """The same for a text-only decoder on the text fields of the contract."""

    def loss_fn(params: Any, batch: dict, rng: jax.Array):
        outputs, aux_loss, moe_metrics = apply_with_moe_losses(
            model,
            {"params": params},
            batch["tokens"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
            return_hidden=bool(loss_chunk_size),
            rngs={"dropout": rng},
        )
        loss_sum, count = head_cross_entropy_loss(
            model, params, outputs, batch["targets"], batch["loss_mask"],
            head=DecoderLM.logits, chunk_size=loss_chunk_size,
        )  # fmt: skip
        return loss_sum + aux_loss * count, count, moe_metrics

    return loss_fn


def _multimodal_head(model: MultimodalLM, hidden: jnp.ndarray) -> jnp.ndarray:
    """The LM head of a MultimodalLM (a ``method=``): [B, C, D] hidden -> [B, C, V] logits."""
    return model.lm.logits(hidden)


def make_stream(
    sources: Sequence[SampleSource],
    weights: Sequence[float],
    tokenizer: Tokenizer,
    *,
    template: str,
    system_prompt: str,
    spec: PackingSpec,
    options: PipelineOptions,
    text_only: bool = False,
    preprocessing: ImageProcessor | None = None,
    num_shards: int | None = None,
) -> ShardedStream:
    """An endless, resumable stream of packed batches drawn from ``sources`` by ``weights``.

    ``options.batch_size`` is the global batch. It is cut into ``num_shards`` data shards
    (default: one per process; ``data/sharded_stream.py``), each packing its own records
    (``v::num_shards`` of every source) into ``batch_size // num_shards`` rows per step; this
    process reads its share of the shards, so the global batches do not depend on the process
    count. ``text_only`` drops the image fields (for a text decoder; the sources must then hold
    no images). ``preprocessing`` prepares the images (default: resized to ``spec.image_size``,
    normalised with mean 0.5, std 0.5).
    """
    processor = SampleProcessor(
        ToSampleBySource([s.to_sample for s in sources]),
        tokenizer,
        template=template,
        spec=spec,
        preprocessing=preprocessing or ImagePreprocessing(size=spec.image_size),
        system_prompt=system_prompt,
    )

    def make_shard(shard_index: int, shards: int):
        if options.batch_size % shards:
            raise ValueError(
                f"batch size {options.batch_size} does not split into {shards} data shards "
                "(data.num_data_shards; default one per process)"
            )
        dataset = make_mixed_packed_dataset(
            [s.records for s in sources],
            weights,
            processor,
            dataclasses.replace(options, batch_size=options.batch_size // shards),
            process_index=shard_index,
            process_count=shards,
        )
        return _TextOnly(BatchStream(dataset)) if text_only else BatchStream(dataset)

    return ShardedStream(make_shard, num_shards or jax.process_count())


class _TextOnly:
    """A BatchStream without the image fields."""

    IMAGE_KEYS = ("images", "image_mask", "image_slot", "image_patch")

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.stream)
        return {k: v for k, v in batch.items() if k not in self.IMAGE_KEYS}

    @property
    def num_skipped(self) -> int:
        return self.stream.num_skipped

    def get_state(self) -> dict:
        return self.stream.get_state()

    def set_state(self, state: dict) -> None:
        self.stream.set_state(state)
