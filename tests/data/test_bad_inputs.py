"""Bad input is refused early and by name, or skipped and counted; nothing is decoded wrongly or
lost silently: image modes, answers holding images, all-bad streams, damaged shards."""

import io
import re

import grain
import numpy as np
import pytest
from PIL import Image

from mllm_jax.data.hf_image_processor import HFImageProcessor
from mllm_jax.data.images import ImagePreprocessing, decode_rgb
from mllm_jax.data.packing import PackableSample, PackingSpec
from mllm_jax.data.pipeline import (
    BatchStream,
    NoUsableRecordsError,
    PackIterDataset,
    PipelineOptions,
    SampleProcessor,
    SkippedRecord,
    make_packed_dataset,
)
from mllm_jax.data.sample import BadRecordError, Sample, Turn, validate_sample
from mllm_jax.data.templates import check_trainable, tokenize_sample
from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer

GRADIENT_16 = (np.arange(24, dtype=np.uint32).reshape(4, 6) * 2849).astype(np.uint16)  # 0..65527


def _encode(image: Image.Image, file_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **kwargs)
    return buffer.getvalue()


def _pgm_16(samples: np.ndarray) -> bytes:
    height, width = samples.shape
    return f"P5 {width} {height} 65535\n".encode() + samples.astype(">u2").tobytes()


def _rgb(encoded: bytes) -> np.ndarray:
    return np.asarray(decode_rgb(encoded, "r", "images[0]"), np.int32)


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, np.int32)[..., None], 3, axis=-1)


@pytest.mark.parametrize(
    "encoded",
    [
        _encode(Image.fromarray(GRADIENT_16), "PNG"),
        _encode(Image.fromarray(GRADIENT_16), "TIFF"),
        _pgm_16(GRADIENT_16),  # PIL reads a 16-bit PGM as mode "I"
    ],
    ids=["png I;16", "tiff I;16", "pgm I"],
)
def test_sixteen_bit_grayscale_is_scaled_not_clipped(encoded):
    expected = np.round(GRADIENT_16 / 257.0)
    np.testing.assert_array_equal(_rgb(encoded), _gray(expected))


def test_palette_image_reads_its_palette_and_transparency_becomes_white():
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    np.testing.assert_array_equal(_rgb(_encode(image, "PNG")), palette[indices])
    transparent = _rgb(_encode(image, "PNG", transparency=1))
    np.testing.assert_array_equal(
        transparent, np.where(indices[..., None] == 1, 255, palette[indices])
    )


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_onto_white(mode):
    rng = np.random.default_rng(0)
    channels = 2 if mode == "LA" else 4
    pixels = rng.integers(0, 256, (3, 5, channels), dtype=np.uint8)
    colour, alpha = pixels[..., :-1].astype(np.float64), pixels[..., -1:] / 255.0
    expected = np.broadcast_to(colour * alpha + 255.0 * (1 - alpha), (3, 5, 3))
    got = _rgb(_encode(Image.fromarray(pixels, mode), "PNG"))
    np.testing.assert_allclose(got, expected, atol=1)


def test_cmyk_jpeg_and_tiff_read_as_rgb():
    cmyk = np.array([[[100, 50, 0, 30], [0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    expected = np.stack([(255 - k) * (255 - v) / 255 for v in (c, m, y)], axis=-1)
    got = _rgb(_encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    np.testing.assert_allclose(got, expected, atol=1)


@pytest.mark.parametrize(
    "encoded, mode",
    [
        (_encode(Image.fromarray(GRADIENT_16.astype(np.int32)), "TIFF"), "I"),
        (_encode(Image.fromarray(GRADIENT_16 / 65535.0).convert("F"), "TIFF"), "F"),
    ],
    ids=["32-bit integer", "32-bit float"],
)
def test_modes_without_a_white_level_are_refused_by_name(encoded, mode):
    with pytest.raises(
        BadRecordError, match=rf"record 'r', field 'images\[0\]': image mode '{mode}'"
    ):
        _rgb(encoded)


def test_both_image_processors_decode_sixteen_bit_alike():
    encoded = _encode(Image.fromarray(GRADIENT_16), "PNG")
    ours = ImagePreprocessing(size=4, mean=(0, 0, 0), std=(1, 1, 1))(encoded, "r", "f")
    hf = HFImageProcessor.from_config(
        {"image_processor_type": "CLIPImageProcessor", "size": {"height": 4, "width": 4},
         "do_center_crop": False, "resample": 2, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}
    )(encoded, "r", "f")  # fmt: skip
    np.testing.assert_allclose(ours, hf, atol=1 / 255)
    assert 0.4 < float(ours.mean()) < 0.6  # not clipped to white (mean 0.996 before)


def test_truncated_file_and_decompression_bomb_are_bad_records(monkeypatch):
    rng = np.random.default_rng(0)
    png = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(BadRecordError, match=r"record 'r', field 'images\[0\]': cannot decode"):
        _rgb(png[: len(png) // 2])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadRecordError, match=r"field 'images\[0\]': cannot decode.*exceeds limit"):
        _rgb(png)


def test_an_answer_holding_an_image_is_refused():
    sample = Sample(
        id="s",
        turns=(Turn(role="user", text="what?"), Turn(role="assistant", text="this: <image>")),
        images=(b"png",),
    )
    with pytest.raises(BadRecordError, match=r"'turns\[1\].text': an assistant turn holds <image>"):
        validate_sample(sample)


QUESTION, ANSWER = Turn(role="user", text="q?"), Turn(role="assistant", text="a")


@pytest.mark.parametrize(
    "turns, field",
    [
        ((QUESTION, ANSWER, Turn(role="user", text="and?")), "turns[2]"),
        ((QUESTION, Turn(role="assistant", text="a", supervised=False)), "turns"),
    ],
    ids=["ends with a question", "no supervised turn"],
)
def test_samples_nothing_can_train_on_are_refused_without_a_tokenizer(turns, field):
    with pytest.raises(BadRecordError) as raised:
        check_trainable(Sample(id="s", turns=turns))
    assert raised.value.field == field


# --- the pipeline: every skip is counted, with or without a batch -------------------------

SIZE = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"what is item {i}? item {i} is shape {i % 5}" for i in range(100)]
    path = train_tokenizer(texts, str(tmp_path_factory.mktemp("spm") / "tok"), vocab_size=300)
    return Tokenizer.load(path)


def _record(index: int, answer: str | None = None) -> Sample:
    return Sample(
        id=f"rec{index}",
        turns=(
            Turn(role="user", text=f"what is item {index}?"),
            Turn(role="assistant", text=f"item {index}" if answer is None else answer),
        ),
    )


def _spec(tokenizer, seq_len=32):
    return PackingSpec(
        seq_len=seq_len, max_images=1, image_size=SIZE, tokens_per_image=2,
        image_id=tokenizer.image_id, pad_id=tokenizer.pad_id,
    )  # fmt: skip


def _processor(tokenizer, on_bad_record="skip", seq_len=32):
    return SampleProcessor(
        lambda sample: sample, tokenizer, template="plain", spec=_spec(tokenizer, seq_len),
        preprocessing=ImagePreprocessing(size=SIZE), on_bad_record=on_bad_record,
    )  # fmt: skip


def test_a_stream_whose_every_record_is_skipped_reports_the_skips(tokenizer):
    records = [_record(i, answer="") for i in range(5)]
    options = PipelineOptions(batch_size=2, num_epochs=1, shuffle=False, prefetch_batches=0)
    stream = BatchStream(make_packed_dataset(records, _processor(tokenizer), options))
    assert list(stream) == []
    assert (stream.num_batches, stream.num_skipped) == (0, 5)
    assert stream.report() == "0 batches, 5 bad records skipped"


def test_an_endless_stream_with_no_usable_record_stops_with_an_error(tokenizer):
    records = [_record(i, answer="") for i in range(3)]
    options = PipelineOptions(batch_size=1, shuffle=False, prefetch_batches=0)
    stream = BatchStream(make_packed_dataset(records, _processor(tokenizer), options))
    with pytest.raises(NoUsableRecordsError, match=r"4 bad records in a row.*the 3 one pass"):
        next(stream)


def test_a_last_partial_batch_is_counted_not_lost(tokenizer):
    # Each sample fills a row of seq_len 12 alone: 5 rows, batches of 2 -> 2 batches + 1 row.
    records = [_record(i) for i in range(5)] + [_record(5, answer="")]
    options = PipelineOptions(batch_size=2, num_epochs=1, shuffle=False, prefetch_batches=0)
    stream = BatchStream(make_packed_dataset(records, _processor(tokenizer, seq_len=12), options))
    batches = list(stream)
    samples = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
    assert (len(batches), samples) == (2, 4)
    assert (stream.num_skipped, stream.num_dropped_samples) == (1, 1)
    assert (
        stream.report()
        == "2 batches, 1 bad records skipped, 1 samples dropped in a last partial batch"
    )
    assert "partial" not in batches[0] and "num_skipped" not in batches[0]


def test_packing_counts_trailing_skips_in_a_row_without_samples(tokenizer):
    spec = _spec(tokenizer)
    sample = PackableSample(
        id="ok", tokens=np.array([1, 5, 6], np.int32), supervised=np.array([0, 1, 1], bool),
        images=np.zeros((0, SIZE, SIZE, 3), np.float32),
    )  # fmt: skip
    bad = [SkippedRecord(f"b{i}", "turns", "bad") for i in range(3)]
    rows = list(PackIterDataset(grain.MapDataset.source(bad).to_iter_dataset(), spec))
    assert [int(r["num_skipped"]) for r in rows] == [3] and not rows[0]["segment_ids"].any()
    rows = list(PackIterDataset(grain.MapDataset.source([sample, *bad]).to_iter_dataset(), spec))
    assert [int(r["num_skipped"]) for r in rows] == [3] and rows[0]["segment_ids"].max() == 1
    limited = PackIterDataset(grain.MapDataset.source(bad * 2).to_iter_dataset(), spec, 3)
    with pytest.raises(NoUsableRecordsError, match="record 'b0', field 'turns': bad"):
        list(limited)


def test_the_pipeline_and_tokenize_sample_refuse_the_same_field(tokenizer):
    sample = _record(0, answer="this: <image>")
    with pytest.raises(BadRecordError) as in_pipeline:
        _processor(tokenizer, on_bad_record="raise")(sample)
    with pytest.raises(BadRecordError) as in_templates:
        tokenize_sample(sample, tokenizer, template="plain", tokens_per_image=2)
    assert re.search(r"turns\[1\]\.text", str(in_pipeline.value))
    assert in_pipeline.value.field == in_templates.value.field
