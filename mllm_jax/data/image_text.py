"""Grain pipeline of (image, caption) batches for CLIP-style contrastive pretraining.

  SampleSource (one image + caption per record)
  -> ImageTextTable: decoded once, in memory (easy-VQA's 3.5k 64x64 images are 174 MB as
     float32; decoding them every epoch would cost a CPU core ~1 ms per image)
  -> this process's shard -> seeded shuffle (reshuffled every epoch) -> repeat
  -> optional label-preserving augmentation -> batch -> prefetch thread
  -> {"images" [B, H, W, 3] float32, "tokens" [B, L] int32 (0-padded),
      "text_mask" [B, L] bool, "labels" [B] int32}

``labels`` index the table's ``classes`` (sorted distinct captions unless given), so equal
captions share a label: the positives of the multi-positive contrastive loss. Deterministic
given the seed; ``get_state``/``set_state`` of the iterator restore the exact position.

Augmentation (for synthetic single-object images on a plain background, such as easy-VQA):
``flip`` mirrors left-right; ``translate`` moves the object's bounding box (pixels differing
from the background colour) to a uniformly drawn position inside the image, filling with the
background colour. An object touching an image edge is not moved along that axis, since moving
it would reveal its cut-off side. Neither changes the object's colour or shape class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mllm_jax.data.builders.registry import SampleSource
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.sample import BadRecordError, Sample

TEXT_FIELDS = ("tokens", "text_mask", "labels")


def sample_caption(sample: Sample) -> str:
    """The caption of an (image, caption) sample: its assistant turns' text.

    Raises:
      BadRecordError: the sample does not hold exactly one image, or its caption is empty.
    """
    if len(sample.images) != 1:
        raise BadRecordError(sample.id, "images", f"expected 1 image, got {len(sample.images)}")
    caption = " ".join(t.text for t in sample.turns if t.role == "assistant").strip()
    if not caption:
        raise BadRecordError(sample.id, "caption", "no assistant turn with a caption")
    return caption


def background_and_box(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The background colour [3] of an [H, W, 3] image and the box [4] of everything else.

    The background is the colour shared by most of the four corners (an object can cover at most
    one corner of easy-VQA's images); box = (top, bottom, left, right), inclusive, of the pixels
    differing from it, or the whole image when no two corners agree or nothing differs.
    """
    height, width = image.shape[:2]
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
    agree = np.all(corners[:, None] == corners[None, :], axis=-1).sum(axis=1)
    background = corners[int(np.argmax(agree))]
    whole = np.array([0, height - 1, 0, width - 1], np.int32)
    if agree.max() < 2:
        return background, whole
    foreground = np.any(image != background, axis=-1)
    rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    if not len(rows):
        return background, whole
    return background, np.array([rows[0], rows[-1], cols[0], cols[-1]], np.int32)


@dataclasses.dataclass(frozen=True)
class ImageTextTable:
    """Decoded (image, caption) pairs, indexable as Grain elements.

    Attributes:
      ids: record id of each row.
      classes: caption of each label.
      images: [N, H, W, 3] float32, preprocessed.
      tokens: [N, L] int32 caption ids, padded with 0; text_mask: [N, L] bool.
      labels: [N] int32 index into ``classes``.
      backgrounds: [N, 3] float32 background colour; boxes: [N, 4] int32 object box
        (top, bottom, left, right), see ``background_and_box``.
      class_tokens: [K, L] int32 ids of each class caption; class_mask: [K, L] bool.
    """

    ids: tuple[str, ...]
    classes: tuple[str, ...]
    class_tokens: np.ndarray
    class_mask: np.ndarray
    images: np.ndarray
    tokens: np.ndarray
    text_mask: np.ndarray
    labels: np.ndarray
    backgrounds: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {
            "images": self.images[index],
            "tokens": self.tokens[index],
            "text_mask": self.text_mask[index],
            "labels": self.labels[index],
            "background": self.backgrounds[index],
            "box": self.boxes[index],
        }

    def caption_batch(self) -> dict[str, np.ndarray]:
        """The class captions as one batch (zero-shot candidates): tokens, text_mask [K, L]."""
        return {"tokens": self.class_tokens, "text_mask": self.class_mask}


def _tokenize(tokenizer: Any, caption: str, max_text_len: int, record_id: str) -> np.ndarray:
    """[max_text_len] int32 caption ids padded with 0; BadRecordError if they do not fit."""
    ids = tokenizer.encode(caption)
    if len(ids) > max_text_len:
        raise BadRecordError(
            record_id,
            "caption",
            f"{caption!r} is {len(ids)} tokens, more than max_text_len={max_text_len}",
        )
    padded = np.zeros((max_text_len,), np.int32)
    padded[: len(ids)] = ids
    return padded


def load_image_text_table(
    source: SampleSource,
    tokenizer: Any,
    preprocessing: ImagePreprocessing,
    *,
    max_text_len: int = 8,
    classes: Sequence[str] | None = None,
) -> ImageTextTable:
    """Decodes every record of ``source`` (one image and one caption each) into a table.

    Args:
      source: e.g. ``load_samples("easy_vqa_captions", data_dir, split)``.
      tokenizer: has ``encode(text) -> list[int]`` (ids > 0; 0 is padding).
      preprocessing: decode + resize + normalise, as for the downstream model.
      max_text_len: L; captions are padded to it.
      classes: the label set; default the sorted distinct captions of ``source``. Give the
        train table's ``classes`` when loading a test split, so labels agree.

    Raises:
      BadRecordError: naming the record, for an undecodable image, a sample without exactly
        one image or without a caption, a caption of more than ``max_text_len`` tokens, or a
        caption outside ``classes``.
    """
    samples = [source[i] for i in range(len(source))]
    captions = [sample_caption(s) for s in samples]
    classes = tuple(sorted(set(captions))) if classes is None else tuple(classes)
    if not samples or not classes:
        raise ValueError(f"no records ({len(samples)}) or no classes ({len(classes)}) to load")
    label_of = {caption: k for k, caption in enumerate(classes)}
    count = len(samples)
    tokens = np.zeros((count, max_text_len), np.int32)
    size = preprocessing.size
    images = np.zeros((count, size, size, 3), np.float32)
    labels = np.zeros((count,), np.int32)
    backgrounds = np.zeros((count, 3), np.float32)
    boxes = np.zeros((count, 4), np.int32)
    for i, (sample, caption) in enumerate(zip(samples, captions, strict=True)):
        if caption not in label_of:
            raise BadRecordError(
                sample.id, "caption", f"{caption!r} is not one of the {len(classes)} classes"
            )
        tokens[i] = _tokenize(tokenizer, caption, max_text_len, sample.id)
        labels[i] = label_of[caption]
        images[i] = preprocessing(sample.images[0], sample.id, "images[0]")
        backgrounds[i], boxes[i] = background_and_box(images[i])
    class_tokens = np.stack(
        [_tokenize(tokenizer, c, max_text_len, f"classes[{k}]") for k, c in enumerate(classes)]
    )
    return ImageTextTable(
        ids=tuple(s.id for s in samples),
        classes=classes,
        class_tokens=class_tokens,
        class_mask=class_tokens != 0,
        images=images,
        tokens=tokens,
        text_mask=tokens != 0,
        labels=labels,
        backgrounds=backgrounds,
        boxes=boxes,
    )


@dataclasses.dataclass(frozen=True)
class LabelPreservingAugmentation:
    """Random left-right flip and/or object translation of one table element (see module doc)."""

    flip: bool = False
    translate: bool = False

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        image, (top, bottom, left, right) = element["images"], element["box"]
        height, width = image.shape[:2]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            left, right = width - 1 - right, width - 1 - left
        if self.translate:
            dy = self._shift(rng, top, bottom, height)
            dx = self._shift(rng, left, right, width)
            if dy or dx:
                moved = np.empty_like(image)
                moved[...] = element["background"]
                moved[top + dy : bottom + dy + 1, left + dx : right + dx + 1] = image[
                    top : bottom + 1, left : right + 1
                ]
                image = moved
        return {**element, "images": np.ascontiguousarray(image)}

    @staticmethod
    def _shift(rng: np.random.Generator, start: int, end: int, size: int) -> int:
        """A shift keeping [start, end] inside [0, size); 0 if it touches an edge."""
        if start == 0 or end == size - 1:
            return 0
        return int(rng.integers(-start, size - end))


def _model_fields(element: dict) -> dict:
    return {key: element[key] for key in ("images", *TEXT_FIELDS)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTextOptions:
    """Per-process batch size, order, epochs, augmentation and prefetching of the pipeline."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    flip: bool = False
    translate: bool = False
    drop_remainder: bool = True
    prefetch_batches: int = 2  # batches a background thread keeps ready (0: off)


def make_image_text_dataset(
    table: ImageTextTable,
    options: ImageTextOptions,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The Grain pipeline over ``table`` (see the module docstring for the batch contract)."""
    dataset = grain.MapDataset.source(table)[process_index::process_count]
    if options.shuffle:
        dataset = dataset.shuffle(seed=options.seed)
    if options.num_epochs != 1:
        dataset = dataset.repeat(options.num_epochs)
    if options.flip or options.translate:
        augmentation = LabelPreservingAugmentation(flip=options.flip, translate=options.translate)
        dataset = dataset.random_map(augmentation, seed=options.seed + 1)
    dataset = dataset.map(_model_fields)
    dataset = dataset.batch(options.batch_size, drop_remainder=options.drop_remainder)
    iterable = dataset.to_iter_dataset()
    if options.prefetch_batches:
        iterable = grain.experimental.ThreadPrefetchIterDataset(
            iterable, prefetch_buffer_size=options.prefetch_batches
        )
    return iterable
