"""A Hugging Face CLIP / SigLIP image processor, run as a checkpoint's config says (numpy + PIL).

  decode -> RGB (``images.to_rgb``: transparency composited onto white, 16-bit scaled)
         -> resize (PIL, ``resample``)
         -> center crop (zero-padded where the image is smaller) -> x * rescale_factor
         -> (x - image_mean) / image_std                      -> [H, W, 3] float32

The steps are transformers' PIL backend (``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``;
its default torchvision backend resizes with torchvision's kernels instead): resize and crop work
on the uint8 image, rescaling multiplies in float64 and casts to float32, normalising is float32.
The config is ``preprocessor_config.json`` or, as transformers 5's processors save it, the
``image_processor`` entry of ``processor_config.json``. Its fields:

  do_convert_rgb            convert to RGB (else the image must already be RGB)
  do_resize, size           {"shortest_edge": s}: the shorter side becomes s and the longer
                            int(s * long / short); {"height": h, "width": w}; an int is
                            shortest_edge (as transformers 5 reads it)
  resample                  PIL filter code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box,
                            5 hamming)
  do_center_crop, crop_size {"height": h, "width": w} or an int (square)
  do_rescale, rescale_factor
  do_normalize, image_mean, image_std   per channel, or one number for all three

A field left out or null takes the class default (``image_processor_type``). Any other field,
a ``do_pad`` that is set, or a value of the wrong kind is a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from mllm_jax.data.images import UnsupportedImageMode, open_image, to_rgb
from mllm_jax.data.sample import BadRecordError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLASS_DEFAULTS = {
    "CLIPImageProcessor": dict(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": 224}, resample=3,
        do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ),
    "SiglipImageProcessor": dict(
        do_convert_rgb=True, do_resize=True, size={"height": 224, "width": 224}, resample=3,
        do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    ),
}  # fmt: skip
_LEGACY_TYPES = {"CLIPFeatureExtractor": "CLIPImageProcessor"}
_METADATA = ("image_processor_type", "feature_extractor_type", "processor_class")
_PIL_FILTERS = (0, 1, 2, 3, 4, 5)


def _class_name(config: Mapping[str, Any], where: str) -> str:
    """The processor class whose defaults fill the fields the config leaves out."""
    raw = config.get("image_processor_type") or config.get("feature_extractor_type")
    name = _LEGACY_TYPES.get(raw, raw)
    if isinstance(name, str):
        name = name.removesuffix("Fast").removesuffix("Pil")
    if name not in _CLASS_DEFAULTS:
        raise ValueError(
            f"{where} field 'image_processor_type' is {raw!r}; supported: "
            f"{sorted(_CLASS_DEFAULTS)} (and their Fast / Pil variants)"
        )
    return name


def _boolean(value: Any, field: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} field {field!r} is {value!r}, expected true or false")
    return value


def _positive_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} field {field!r} holds {value!r}, expected a positive integer")
    return value


def _size(value: Any, field: str, where: str, *, shortest_edge: bool) -> dict[str, int]:
    """{"height": h, "width": w}, or {"shortest_edge": s} where ``shortest_edge`` allows it."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"shortest_edge": value} if shortest_edge else {"height": value, "width": value}
    keys = {k for k, v in value.items() if v is not None} if isinstance(value, Mapping) else None
    if keys == {"height", "width"} or (shortest_edge and keys == {"shortest_edge"}):
        return {k: _positive_int(value[k], f"{field}.{k}", where) for k in sorted(keys)}
    expected = '{"height": h, "width": w} or an int'
    if shortest_edge:
        expected = '{"shortest_edge": s}, ' + expected
    raise ValueError(f"{where} field {field!r} is {value!r}: supported are {expected}")


def _channels(value: Any, field: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{where} field {field!r} is {value!r}, expected 3 numbers (R, G, B)")
    if field == "image_std" and any(v == 0 for v in value):
        raise ValueError(f"{where} field {field!r} is {value!r}: a zero std divides by zero")
    return tuple(float(v) for v in value)


def _rgb(image: Image.Image, convert: bool, name: str) -> Image.Image:
    if not convert:
        if image.mode != "RGB":
            raise ValueError(
                f"{name}: image mode {image.mode!r} is not RGB and do_convert_rgb=false"
            )
        return image
    return to_rgb(image, name)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, C] -> [height, width, C]: the centre, zero-padded (centred) where too small."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, *padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFImageProcessor:
    """Encoded image -> [H, W, 3] float32 pixels, as a CLIP / SigLIP image processor computes them.

    ``resize_to`` and ``crop_to`` are None when the step is off.
    """

    convert_rgb: bool
    resize_to: dict[str, int] | None
    resample: int
    crop_to: dict[str, int] | None
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, where: str = "image processor config"):
        """Reads a CLIP / SigLIP image processor config dict (``where`` names it in errors)."""
        class_name = _class_name(config, where)
        unknown = sorted(set(config) - set(_CLASS_DEFAULTS[class_name]) - {*_METADATA, "do_pad"})
        if unknown:
            raise ValueError(
                f"{where} has fields this image processor does not implement: {unknown} "
                f"(supported: {sorted(_CLASS_DEFAULTS[class_name])})"
            )
        if config.get("do_pad"):
            raise ValueError(
                f"{where} field 'do_pad' is {config['do_pad']!r}: padding is not supported"
            )
        fields = dict(_CLASS_DEFAULTS[class_name])
        fields |= {k: v for k, v in config.items() if k in fields and v is not None}
        on = {k: _boolean(fields[k], k, where) for k in fields if k.startswith("do_")}
        resample = fields["resample"]
        if resample not in _PIL_FILTERS or isinstance(resample, bool):
            raise ValueError(
                f"{where} field 'resample' is {resample!r}, expected a PIL filter code "
                f"{_PIL_FILTERS}"
            )
        rescale = fields["rescale_factor"]
        if on["do_rescale"] and (
            isinstance(rescale, bool) or not isinstance(rescale, (int, float))
        ):
            raise ValueError(f"{where} field 'rescale_factor' is {rescale!r}, expected a number")
        resize_to = crop_to = mean = std = None
        if on["do_resize"]:
            resize_to = _size(fields["size"], "size", where, shortest_edge=True)
        if on["do_center_crop"]:
            crop_to = _size(fields["crop_size"], "crop_size", where, shortest_edge=False)
        if on["do_normalize"]:
            mean = _channels(fields["image_mean"], "image_mean", where)
            std = _channels(fields["image_std"], "image_std", where)
        return cls(
            convert_rgb=on["do_convert_rgb"],
            resize_to=resize_to,
            resample=int(resample),
            crop_to=crop_to,
            rescale_factor=float(rescale) if on["do_rescale"] else None,
            mean=mean,
            std=std,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFImageProcessor:
        """The image processor a model directory saves: ``preprocessor_config.json``, else
        ``processor_config.json``'s ``image_processor``; FileNotFoundError if it has neither."""
        directory = pathlib.Path(directory)
        for name, key in ((PREPROCESSOR_CONFIG, None), (PROCESSOR_CONFIG, "image_processor")):
            path = directory / name
            if not path.is_file():
                continue
            try:
                config = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
            where = str(path) if key is None else f"{path} entry {key!r}"
            if key is not None:
                if key not in config:
                    continue
                config = config[key]
            if not isinstance(config, dict):
                raise ValueError(f"{where} is a {type(config).__name__}, expected a JSON object")
            return cls.from_config(config, where=where)
        raise FileNotFoundError(
            f"{directory} has no {PREPROCESSOR_CONFIG} (nor a {PROCESSOR_CONFIG} with an "
            "'image_processor' entry): the image processor config is needed to prepare images"
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the input image's size."""
        if self.crop_to is not None:
            return self.crop_to["height"], self.crop_to["width"]
        if self.resize_to is not None and "height" in self.resize_to:
            return self.resize_to["height"], self.resize_to["width"]
        return None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the resize step gives an image of height x width."""
        if self.resize_to is None:
            return height, width
        if "height" in self.resize_to:
            return self.resize_to["height"], self.resize_to["width"]
        short, long = sorted((height, width))
        edge = self.resize_to["shortest_edge"]
        scaled = int(edge * long / short)
        return (scaled, edge) if width <= height else (edge, scaled)

    def preprocess(self, image: Image.Image, name: str = "image") -> np.ndarray:
        """A decoded image -> [H, W, 3] float32."""
        image = _rgb(image, self.convert_rgb, name)
        if self.resize_to is not None:
            height, width = self.resized_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        if self.crop_to is not None:
            pixels = _center_crop(pixels, self.crop_to["height"], self.crop_to["width"])
        if self.rescale_factor is not None:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        pixels = pixels.astype(np.float32)
        if self.mean is not None:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels

    def __call__(self, encoded: bytes, record_id: str, field: str) -> np.ndarray:
        """Encoded image bytes -> [H, W, 3] float32; BadRecordError if they do not decode."""
        image = open_image(encoded, record_id, field)
        try:
            return self.preprocess(image, f"record {record_id!r}, field {field!r}")
        except UnsupportedImageMode as err:
            raise BadRecordError(record_id, field, err.problem) from err
