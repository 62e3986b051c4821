"""The Grain pipeline end to end on synthetic records: contract, resume, sharding, bad input."""

import io
import re

import numpy as np
import pytest
from absl import flags
from PIL import Image

from mllm_jax.data.batch import check_batch
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.packing import PackingSpec
from mllm_jax.data.pipeline import (
    BatchStream,
    PipelineOptions,
    SampleProcessor,
    make_packed_dataset,
)
from mllm_jax.data.sample import BadRecordError, Sample, Turn
from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer

NUM_RECORDS = 24
SIZE = 8


def _png(value: int, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(index: int) -> dict:
    """Record i: i % 3 images, each a solid colour 10 * i + k, one question and one answer."""
    num_images = index % 3
    return {
        "id": f"rec{index}",
        "question": "<image>" * num_images + f"what is item {index}?",
        "answer": f"item {index} is shape {index % 5}",
        "images": [_png(10 * index + k) for k in range(num_images)],
    }


def to_sample(record: dict) -> Sample:
    return Sample(
        id=record["id"],
        turns=(
            Turn(role="user", text=record["question"]),
            Turn(role="assistant", text=record["answer"]),
        ),
        images=tuple(record["images"]),
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"what is item {i}? item {i} is shape {i % 5}" for i in range(200)]
    path = train_tokenizer(texts, str(tmp_path_factory.mktemp("spm") / "tok"), vocab_size=320)
    return Tokenizer.load(path)


def _processor(tokenizer, on_bad_record="raise", seq_len=96):
    spec = PackingSpec(
        seq_len=seq_len,
        max_images=4,
        image_size=SIZE,
        tokens_per_image=2,
        image_id=tokenizer.image_id,
        pad_id=tokenizer.pad_id,
    )
    return SampleProcessor(
        to_sample,
        tokenizer,
        template="plain",
        spec=spec,
        preprocessing=ImagePreprocessing(size=SIZE),
        on_bad_record=on_bad_record,
    )


def _records():
    return [_record(i) for i in range(NUM_RECORDS)]


def _image_indices(batch) -> list[int]:
    """Record index of every image in a batch, read back from its (normalised) colour."""
    pixels = batch["images"][batch["image_mask"]]
    values = np.round((pixels.mean(axis=(1, 2, 3)) * 0.5 + 0.5) * 255).astype(int)
    return sorted(values // 10)


def _as_lists(batches):
    return [{k: np.asarray(v).tolist() for k, v in b.items()} for b in batches]


def test_batches_follow_the_contract_and_carry_every_record_once(tokenizer):
    options = PipelineOptions(batch_size=2, num_epochs=1, seed=3)
    stream = BatchStream(make_packed_dataset(_records(), _processor(tokenizer), options))
    batches = list(stream)
    for batch in batches:
        check_batch(batch, with_images=True)
    images = sorted(i for b in batches for i in _image_indices(b))
    # images of records with 1 or 2 images; drop_remainder may drop at most the last row
    expected = sorted(i for i in range(NUM_RECORDS) for _ in range(i % 3))
    assert set(images) <= set(expected) and len(images) >= len(expected) - 8
    assert stream.num_skipped == 0


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_records(tokenizer, process_count):
    seen, num_samples = [], 0
    for index in range(process_count):
        options = PipelineOptions(batch_size=1, num_epochs=1, seed=0)
        dataset = make_packed_dataset(
            _records(),
            _processor(tokenizer),
            options,
            process_index=index,
            process_count=process_count,
        )
        batches = list(dataset)
        seen.append([i for b in batches for i in _image_indices(b)])
        num_samples += sum(int(b["segment_ids"].max()) for b in batches)
    assert num_samples == NUM_RECORDS  # records without images are counted too
    flat = [i for shard in seen for i in shard]
    assert sorted(flat) == sorted(i for i in range(NUM_RECORDS) for _ in range(i % 3))
    for a in range(process_count):
        for b in range(a + 1, process_count):
            assert not set(seen[a]) & set(seen[b])


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_restored_pipeline_yields_exactly_the_uninterrupted_batches(tokenizer, stop_after):
    options = PipelineOptions(batch_size=2, seed=7, augment=True)  # repeats forever, reshuffles
    dataset = make_packed_dataset(_records(), _processor(tokenizer), options)
    total = 14
    reference = BatchStream(dataset)
    uninterrupted = _as_lists(next(reference) for _ in range(total))
    first = BatchStream(make_packed_dataset(_records(), _processor(tokenizer), options))
    head = _as_lists(next(first) for _ in range(stop_after))
    state = first.get_state()
    resumed = BatchStream(make_packed_dataset(_records(), _processor(tokenizer), options))
    resumed.set_state(state)
    tail = _as_lists(next(resumed) for _ in range(total - stop_after))
    assert head + tail == uninterrupted


def test_different_seeds_give_different_orders(tokenizer):
    def first_batches(seed):
        options = PipelineOptions(batch_size=2, seed=seed)
        stream = BatchStream(make_packed_dataset(_records(), _processor(tokenizer), options))
        return _as_lists(next(stream) for _ in range(3))

    assert first_batches(1) == first_batches(1)
    assert first_batches(1) != first_batches(2)


BAD_RECORDS = {
    "corrupt image": (
        dict(images=[b"\x89PNG not really"], question="<image>what?"),
        "field 'images[0]': cannot decode image",
    ),
    "no answer": (dict(answer=""), "field 'turns[1].text'"),
    "too long": (dict(answer="item " * 200), "field 'tokens'"),
    "more placeholders than images": (dict(question="<image><image>what?"), "field 'images'"),
    "fewer placeholders than images": (dict(question="what?"), "field 'images'"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_raises_naming_the_record_and_field(tokenizer, case):
    overrides, message = BAD_RECORDS[case]
    record = {**_record(1), **overrides}
    with pytest.raises(BadRecordError, match=re.escape(f"record 'rec1', {message}")):
        _processor(tokenizer)(record)


def test_bad_records_are_skipped_and_counted_when_asked(tokenizer):
    records = _records()
    for k, (overrides, _) in enumerate(BAD_RECORDS.values()):
        records[k * 4 + 1] = {**records[k * 4 + 1], **overrides}
    options = PipelineOptions(batch_size=1, num_epochs=1, shuffle=False)
    stream = BatchStream(make_packed_dataset(records, _processor(tokenizer, "skip"), options))
    batches = list(stream)
    assert stream.num_skipped == len(BAD_RECORDS)
    assert "5 bad records skipped" in stream.report()
    segments = sum(int(b["segment_ids"].max()) for b in batches)
    assert segments == NUM_RECORDS - len(BAD_RECORDS)
    strict = make_packed_dataset(records, _processor(tokenizer, "raise"), options)
    with pytest.raises(BadRecordError):
        list(strict)


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_lose_nothing(tokenizer):
    flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads absl flags
    # batch_size 1: no partial batch is dropped, so every record must come out exactly once.
    serial = make_packed_dataset(
        _records(), _processor(tokenizer), PipelineOptions(batch_size=1, num_epochs=1, seed=5)
    )
    expected = sorted(i for b in serial for i in _image_indices(b))

    def with_workers():
        options = PipelineOptions(batch_size=1, num_epochs=1, seed=5, worker_count=2)
        return list(make_packed_dataset(_records(), _processor(tokenizer), options))

    first, second = with_workers(), with_workers()
    assert _as_lists(first) == _as_lists(second)
    assert sorted(i for b in first for i in _image_indices(b)) == expected
