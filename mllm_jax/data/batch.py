"""The batch contract: the one place that says what a training batch holds.

Every pipeline (text-only or multimodal) yields dicts with these keys; models and train steps
consume exactly these. B = batch, N = sequence length, M = image slots per sequence,
H x W = image size, P = tokens per image.

  tokens       [B, N] int32    input ids; each image occupies P positions holding IMAGE id;
                               padding holds PAD id (0)
  targets      [B, N] int32    the id to predict at each position: tokens[b, t + 1] when t + 1 is
                               in the same packed segment, else 0
  loss_mask    [B, N] float32  1.0 where predicting targets[b, t] is trained
  segment_ids  [B, N] int32    1, 2, ... for the packed samples of a row, 0 on padding
  positions    [B, N] int32    position inside the packed sample (restarts at 0 per segment)

Multimodal batches add:

  images       [B, M, H, W, 3] float32  normalised pixels; unused slots are zeros
  image_mask   [B, M] bool     True where the slot holds an image
  image_slot   [B, N] int32    for an image position, the slot of its image; -1 for text
  image_patch  [B, N] int32    for an image position, which of the image's P tokens; -1 for text

Image k of a row (in order of appearance, across its packed samples) is in slot k, and its P
tokens are the k-th run of IMAGE positions, so a model replaces the embedding at (b, t) by
projected_image_tokens[b, image_slot[b, t], image_patch[b, t]] wherever image_slot >= 0.
"""

from __future__ import annotations

import numpy as np

TEXT_FIELDS = {
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}
IMAGE_FIELDS = {
    "images": np.float32,
    "image_mask": np.bool_,
    "image_slot": np.int32,
    "image_patch": np.int32,
}


def check_batch(batch: dict, *, with_images: bool) -> None:
    """Raises ValueError naming the field that breaks the contract (name, shape or dtype)."""
    fields = TEXT_FIELDS | (IMAGE_FIELDS if with_images else {})
    missing = sorted(set(fields) - set(batch))
    if missing:
        raise ValueError(f"batch is missing fields {missing}")
    batch_size, length = np.shape(batch["tokens"])
    expected_shapes = {name: (batch_size, length) for name in TEXT_FIELDS}
    if with_images:
        images_shape = np.shape(batch["images"])
        if len(images_shape) != 5 or images_shape[0] != batch_size or images_shape[-1] != 3:
            raise ValueError(f"batch['images'] has shape {images_shape}, expected [B, M, H, W, 3]")
        expected_shapes |= {
            "images": images_shape,
            "image_mask": images_shape[:2],
            "image_slot": (batch_size, length),
            "image_patch": (batch_size, length),
        }
    for name, dtype in fields.items():
        value = np.asarray(batch[name])
        if value.dtype != dtype:
            raise ValueError(f"batch[{name!r}] has dtype {value.dtype}, expected {np.dtype(dtype)}")
        if value.shape != expected_shapes[name]:
            raise ValueError(
                f"batch[{name!r}] has shape {value.shape}, expected {expected_shapes[name]}"
            )
