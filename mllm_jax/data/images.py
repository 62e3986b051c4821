"""Image decoding and preprocessing for the input pipeline (numpy, host side)."""

from __future__ import annotations

import dataclasses
import io
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from mllm_jax.data.sample import BadRecordError


class ImageProcessor(Protocol):
    """Prepares one image for a vision tower: ``ImagePreprocessing``, or an imported model's
    ``hf_image_processor.HFImageProcessor``."""

    def __call__(self, encoded: bytes, record_id: str, field: str) -> np.ndarray:
        """Encoded image bytes -> [H, W, 3] float32; BadRecordError if undecodable."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImagePreprocessing:
    """Decode -> RGB -> resize to size x size (bilinear) -> (x / 255 - mean) / std."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, encoded: bytes, record_id: str, field: str) -> np.ndarray:
        """Encoded image bytes -> [size, size, 3] float32; BadRecordError if undecodable."""
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                image = image.convert("RGB")
                if image.size != (self.size, self.size):
                    image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise BadRecordError(record_id, field, f"cannot decode image: {err}") from err
        return (pixels / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(
            self.std, np.float32
        )
