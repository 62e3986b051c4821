"""Packing of tokenized samples (and their images) into fixed-length rows of the batch contract.

Samples are placed whole, in stream order, into a row until the next one does not fit in the
remaining tokens or image slots (next-fit); the row is then padded and emitted. See
``data/batch.py`` for the fields a row carries.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax.data.sample import BadRecordError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackingSpec:
    """Row geometry: N tokens, M image slots of H x W x 3, P tokens per image."""

    seq_len: int
    max_images: int
    image_size: int
    tokens_per_image: int
    image_id: int
    pad_id: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackableSample:
    """One templated sample: tokens [T], supervised [T] bool, images [m, H, W, 3] float32."""

    id: str
    tokens: np.ndarray
    supervised: np.ndarray
    images: np.ndarray


def check_packable(sample: PackableSample, spec: PackingSpec) -> None:
    """Raises BadRecordError if the sample can never fit a row or its image tokens are malformed."""
    length, num_images = len(sample.tokens), len(sample.images)
    if length > spec.seq_len:
        raise BadRecordError(sample.id, "tokens", f"{length} tokens exceed seq_len {spec.seq_len}")
    if num_images > spec.max_images:
        raise BadRecordError(
            sample.id, "images", f"{num_images} images exceed the {spec.max_images} image slots"
        )
    is_image = sample.tokens == spec.image_id
    if is_image.sum() != num_images * spec.tokens_per_image:
        raise BadRecordError(
            sample.id,
            "tokens",
            f"{int(is_image.sum())} image tokens for {num_images} images of "
            f"{spec.tokens_per_image} tokens each",
        )
    if num_images and sample.images.shape[1:] != (spec.image_size, spec.image_size, 3):
        raise BadRecordError(
            sample.id, "images", f"image shape {sample.images.shape[1:]} is not the row's"
        )


class RowBuilder:
    """Accumulates samples for one row; ``build()`` returns the padded row as a dict."""

    def __init__(self, spec: PackingSpec):
        self.spec = spec
        self.samples: list[PackableSample] = []
        self.num_tokens = 0
        self.num_images = 0

    def fits(self, sample: PackableSample) -> bool:
        return (
            self.num_tokens + len(sample.tokens) <= self.spec.seq_len
            and self.num_images + len(sample.images) <= self.spec.max_images
        )

    def add(self, sample: PackableSample) -> None:
        if not self.fits(sample):
            raise ValueError(f"sample {sample.id!r} does not fit the row")
        self.samples.append(sample)
        self.num_tokens += len(sample.tokens)
        self.num_images += len(sample.images)

    def build(self) -> dict[str, np.ndarray]:
        spec = self.spec
        n, m, s = spec.seq_len, spec.max_images, spec.image_size
        row = {
            "tokens": np.full(n, spec.pad_id, np.int32),
            "targets": np.zeros(n, np.int32),
            "loss_mask": np.zeros(n, np.float32),
            "segment_ids": np.zeros(n, np.int32),
            "positions": np.zeros(n, np.int32),
            "images": np.zeros((m, s, s, 3), np.float32),
            "image_mask": np.zeros(m, np.bool_),
            "image_slot": np.full(n, -1, np.int32),
            "image_patch": np.full(n, -1, np.int32),
        }
        start = slot = 0
        for segment, sample in enumerate(self.samples, start=1):
            length, count = len(sample.tokens), len(sample.images)
            span = slice(start, start + length)
            row["tokens"][span] = sample.tokens
            row["segment_ids"][span] = segment
            row["positions"][span] = np.arange(length)
            # Position t predicts token t + 1 of the same sample; the last one predicts nothing.
            row["targets"][start : start + length - 1] = sample.tokens[1:]
            row["loss_mask"][start : start + length - 1] = sample.supervised[1:]
            image_positions = start + np.flatnonzero(sample.tokens == spec.image_id)
            run = np.arange(len(image_positions))
            row["image_slot"][image_positions] = slot + run // spec.tokens_per_image
            row["image_patch"][image_positions] = run % spec.tokens_per_image
            row["images"][slot : slot + count] = sample.images
            row["image_mask"][slot : slot + count] = True
            start += length
            slot += count
        return row


def pack_samples(samples, spec: PackingSpec):
    """Yields packed rows from an iterable of PackableSamples (next-fit, order preserved)."""
    builder = RowBuilder(spec)
    for sample in samples:
        check_packable(sample, spec)
        if not builder.fits(sample):
            yield builder.build()
            builder = RowBuilder(spec)
        builder.add(sample)
    if builder.samples:
        yield builder.build()
