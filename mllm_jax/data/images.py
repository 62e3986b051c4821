"""Image decoding and preprocessing for the input pipeline (numpy, host side).

Every decoder here reads an image as 8-bit RGB the same way (``to_rgb``):

  mode                               read as
  RGB                                itself
  1, L, P, RGBX, CMYK, YCbCr         PIL's conversion to RGB
  LA, PA, RGBA, RGBa; L, P, RGB with composited onto white (as transformers' ``convert_rgb``),
  a transparent colour (tRNS)        so a transparent background is white, not whatever colour
                                     the hidden pixels hold
  I;16, I;16B, I;16L, I;16N, and I   scaled from 0..65535 to 0..255 (round(x / 257)); PIL's own
  read from PNG or PPM (16-bit)      conversion clips everything above 255 to white
  F, I from other files (32-bit),    refused by name: their white level is not defined
  LAB, La, any other mode
"""

from __future__ import annotations

import dataclasses
import io
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from mllm_jax.data.sample import BadRecordError

_CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")  # formats whose mode "I" holds 16-bit samples
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
"""What opening, decoding or converting a bad image file raises."""


class UnsupportedImageMode(ValueError):
    """An image whose pixel mode has no defined reading as 8-bit RGB."""

    def __init__(self, where: str, problem: str):
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def _is_sixteen_bit(image: Image.Image) -> bool:
    return image.mode in _SIXTEEN_BIT_MODES or (
        image.mode == "I" and image.format in _SIXTEEN_BIT_I_FORMATS
    )


def to_rgb(image: Image.Image, where: str = "image") -> Image.Image:
    """A decoded PIL image as 8-bit RGB, read as the module docstring's table says.

    Raises:
      UnsupportedImageMode: naming ``where`` and the mode, for a mode the table refuses.
    """
    transparent_colour = image.info.get("transparency") is not None
    if image.mode in _ALPHA_MODES or (transparent_colour and image.mode in ("L", "P", "RGB")):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    if _is_sixteen_bit(image):
        samples = np.asarray(image).astype(np.uint32)
        gray = ((samples * 255 + 32767) // 65535).astype(np.uint8)  # round(x / 257)
        return Image.fromarray(gray, "L").convert("RGB")
    described = {
        "F": "32-bit float pixels have no defined white level",
        "I": "32-bit integer pixels have no defined white level",
    }.get(image.mode, "it has no defined reading as RGB")
    raise UnsupportedImageMode(
        where,
        f"image mode {image.mode!r} is not supported ({described}); save the image as 8-bit or "
        "16-bit grayscale or RGB (PNG or JPEG)",
    )


def open_image(encoded: bytes, record_id: str, field: str) -> Image.Image:
    """Encoded image bytes -> the fully decoded PIL image, in the file's own mode.

    Raises:
      BadRecordError: naming the record and field, for bytes that are no image, a truncated
        file or an image over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``).
    """
    try:
        image = Image.open(io.BytesIO(encoded))
        image.load()
    except UnidentifiedImageError as err:
        raise BadRecordError(
            record_id, field, "cannot decode image: not in an image format PIL can read"
        ) from err
    except DECODE_ERRORS as err:
        raise BadRecordError(record_id, field, f"cannot decode image: {err}") from err
    return image


def decode_rgb(encoded: bytes, record_id: str, field: str) -> Image.Image:
    """Encoded image bytes -> the fully decoded image as 8-bit RGB (``to_rgb``).

    Raises:
      BadRecordError: naming the record and field, as ``open_image`` does or for a mode
        ``to_rgb`` refuses.
    """
    image = open_image(encoded, record_id, field)
    try:
        return to_rgb(image, f"record {record_id!r}, field {field!r}")
    except UnsupportedImageMode as err:
        raise BadRecordError(record_id, field, err.problem) from err


class ImageProcessor(Protocol):
    """Prepares one image for a vision tower: ``ImagePreprocessing``, or an imported model's
    ``hf_image_processor.HFImageProcessor``."""

    def __call__(self, encoded: bytes, record_id: str, field: str) -> np.ndarray:
        """Encoded image bytes -> [H, W, 3] float32; BadRecordError if undecodable."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImagePreprocessing:
    """Decode -> RGB (``to_rgb``) -> resize to size x size (bilinear) -> (x / 255 - mean) / std."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, encoded: bytes, record_id: str, field: str) -> np.ndarray:
        """Encoded image bytes -> [size, size, 3] float32; BadRecordError if undecodable."""
        image = decode_rgb(encoded, record_id, field)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, np.float32)
        return (pixels / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(
            self.std, np.float32
        )
