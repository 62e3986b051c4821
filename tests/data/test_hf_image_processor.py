"""HFImageProcessor vs transformers' own CLIP / SigLIP image processors, and its config errors.

The reference is transformers' PIL backend (``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``:
what ``CLIPImageProcessor`` falls back to without torchvision, which is not installed here).
Images of odd sizes in modes RGB, RGBA (composited onto white), L and P with a transparent
index, some smaller than the crop (zero padding). Tolerance: max |Δ| <= 1e-6 on the normalised
float32 pixels (measured: 0.0, the same arithmetic).
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")

from mllm_jax.data.hf_image_processor import HFImageProcessor  # noqa: E402
from mllm_jax.data.sample import BadRecordError  # noqa: E402

MAX_ABS = 1e-6


def _encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _images() -> list[bytes]:
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 256, (64, 33, 3), np.uint8)).convert("P")
    palette.info["transparency"] = 7
    return [
        _encoded(Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8))),
        _encoded(Image.fromarray(rng.integers(0, 256, (91, 20, 4), np.uint8), "RGBA")),
        _encoded(Image.fromarray(rng.integers(0, 256, (15, 15), np.uint8), "L")),
        _encoded(palette),
    ]


REFERENCES = {
    "clip_shortest_edge_crop": lambda: transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
    ),
    "clip_crop_larger_than_image": lambda: transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 24}, crop_size={"height": 40, "width": 28}, resample=2
    ),
    "siglip_height_width": lambda: transformers.SiglipImageProcessorPil(
        size={"height": 32, "width": 24}
    ),
    "siglip_lanczos_unnormalised": lambda: transformers.SiglipImageProcessorPil(
        size={"height": 20, "width": 36}, resample=1, do_normalize=False
    ),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_pixels_match_transformers_image_processor(name):
    reference = REFERENCES[name]()
    ours = HFImageProcessor.from_config(reference.to_dict())
    for k, encoded in enumerate(_images()):
        with Image.open(io.BytesIO(encoded)) as image:
            expected = reference(image, return_tensors="np")["pixel_values"][0]
        pixels = ours(encoded, f"image[{k}]", "image")
        assert pixels.dtype == np.float32
        assert pixels.shape == expected.shape[1:] + (3,) == ours.output_size + (3,)
        max_abs = np.max(np.abs(pixels - expected.transpose(1, 2, 0)))
        assert max_abs <= MAX_ABS, (name, k, max_abs)


def test_integer_sizes_read_as_transformers_5_reads_them():
    as_ints = HFImageProcessor.from_config(
        {"image_processor_type": "CLIPImageProcessor", "size": 30, "crop_size": 20}
    )
    assert as_ints.resize_to == {"shortest_edge": 30}
    assert as_ints.crop_to == {"height": 20, "width": 20}
    reference = transformers.CLIPImageProcessorPil(size=30, crop_size=20)
    encoded = _images()[0]
    with Image.open(io.BytesIO(encoded)) as image:
        expected = reference(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.max(np.abs(as_ints(encoded, "r", "f") - expected)) <= MAX_ABS


def test_loads_preprocessor_config_else_processor_config(tmp_path):
    reference = REFERENCES["siglip_height_width"]()
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "processor_config.json").write_text(
        json.dumps({"image_processor": reference.to_dict(), "patch_size": 14})
    )
    reference.save_pretrained(tmp_path)  # preprocessor_config.json
    expected = HFImageProcessor.from_config(reference.to_dict())
    assert HFImageProcessor.load(tmp_path) == expected == HFImageProcessor.load(nested)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        HFImageProcessor.load(tmp_path / "missing")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image_processor_type": "ViTImageProcessor"}, "image_processor_type"),
        ({"do_pad": True}, "do_pad"),
        ({"do_reduce_labels": True}, "do_reduce_labels"),
        ({"size": {"longest_edge": 30}}, "'size'"),
        ({"crop_size": {"shortest_edge": 30}}, "'crop_size'"),
        ({"resample": 9}, "resample"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"do_resize": "yes"}, "do_resize"),
    ],
)
def test_unsupported_fields_and_values_name_the_field(fields, message):
    config = {"image_processor_type": "CLIPImageProcessor", **fields}
    with pytest.raises(ValueError, match=message):
        HFImageProcessor.from_config(config, where="preprocessor_config.json")


def test_undecodable_bytes_and_non_rgb_without_conversion_are_errors():
    processor = HFImageProcessor.from_config({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(BadRecordError, match="cannot decode image"):
        processor(b"not an image", "cat.png", "--image")
    strict = HFImageProcessor.from_config(
        {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": False}
    )
    with pytest.raises(ValueError, match="mode 'L'"):
        strict(_images()[2], "gray.png", "--image")
