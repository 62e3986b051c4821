"""Packing samples and images into contract rows, and the packing iterator's exact resume."""

import dataclasses

import grain
import numpy as np
import pytest

from mllm_jax.data.batch import check_batch
from mllm_jax.data.packing import PackableSample, PackingSpec, check_packable, pack_samples
from mllm_jax.data.pipeline import PackIterDataset, SkippedRecord
from mllm_jax.data.sample import BadRecordError
from mllm_jax.layers.masks import make_attention_mask

IMAGE_ID, P = 4, 3
SPEC = PackingSpec(seq_len=24, max_images=3, image_size=2, tokens_per_image=P, image_id=IMAGE_ID)


def _sample(index, num_images, text_len, rng):
    """<bos>, then per image P image tokens followed by text; unique text ids per sample."""
    pieces, supervised = [np.array([2])], [np.array([False])]
    for _ in range(num_images):
        pieces.append(np.full(P, IMAGE_ID))
        supervised.append(np.zeros(P, bool))
    text = 1000 * (index + 1) + np.arange(text_len)
    pieces.append(text)
    supervised.append(rng.random(text_len) < 0.6)
    supervised[-1][-1] = True
    images = np.zeros((num_images, 2, 2, 3), np.float32)
    images += (10 * index + np.arange(num_images))[:, None, None, None]
    return PackableSample(
        id=f"s{index}",
        tokens=np.concatenate(pieces).astype(np.int32),
        supervised=np.concatenate(supervised),
        images=images,
    )


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    return [_sample(i, i % 4, int(rng.integers(2, 9)), rng) for i in range(40)]


def test_every_token_appears_exactly_once_in_order(samples):
    rows = list(pack_samples(samples, SPEC))
    recovered = []
    for row in rows:
        for segment in range(1, row["segment_ids"].max() + 1):
            recovered.append(row["tokens"][row["segment_ids"] == segment])
    assert len(recovered) == len(samples)
    for got, sample in zip(recovered, samples, strict=True):
        np.testing.assert_array_equal(got, sample.tokens)
    packed_tokens = sum(int((row["segment_ids"] > 0).sum()) for row in rows)
    assert packed_tokens == sum(len(s.tokens) for s in samples)
    assert len(rows) < len(samples)  # something was actually packed together


def test_rows_follow_the_batch_contract_and_never_cross_segments(samples):
    rows = list(pack_samples(samples, SPEC))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    check_batch(batch, with_images=True)
    for row in rows:
        seg, n = row["segment_ids"], SPEC.seq_len
        for t in range(n):
            if row["loss_mask"][t]:
                assert seg[t] > 0 and t + 1 < n and seg[t + 1] == seg[t]
                assert row["targets"][t] == row["tokens"][t + 1]
            else:
                assert row["targets"][t] == 0 or seg[t + 1] == seg[t]
        # positions restart per segment
        for segment in range(1, seg.max() + 1):
            np.testing.assert_array_equal(
                row["positions"][seg == segment], np.arange((seg == segment).sum())
            )


def test_no_position_attends_across_a_packed_boundary(samples):
    rows = list(pack_samples(samples, SPEC))
    segments = np.stack([r["segment_ids"] for r in rows])
    mask = np.asarray(make_attention_mask(np.ones_like(segments), segment_ids=segments))[:, 0]
    same_segment = segments[:, :, None] == segments[:, None, :]
    assert mask.any() and not (mask & ~same_segment).any()
    real = segments > 0
    # Every real token sees itself and all earlier tokens of its own sample, nothing else.
    for b, t in zip(*np.nonzero(real), strict=True):
        start = np.flatnonzero(segments[b] == segments[b, t])[0]
        np.testing.assert_array_equal(np.flatnonzero(mask[b, t]), np.arange(start, t + 1))


def test_supervision_moves_to_the_predicting_position(samples):
    row = next(pack_samples(samples[:1], SPEC))
    sample = samples[0]
    length = len(sample.tokens)
    np.testing.assert_array_equal(row["loss_mask"][: length - 1], sample.supervised[1:])
    assert row["loss_mask"][length - 1 :].sum() == 0


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_image_tokens_map_to_their_slot_and_patch(num_images):
    rng = np.random.default_rng(num_images)
    first = _sample(0, 1, 3, rng)
    second = _sample(1, num_images, 4, rng)
    spec = dataclasses.replace(SPEC, max_images=4)
    row = next(pack_samples([first, second], spec))
    # slot 0 is the first sample's image; the second sample's images follow in order.
    expected_images = np.concatenate([first.images, second.images])
    np.testing.assert_array_equal(row["images"][: 1 + num_images], expected_images)
    np.testing.assert_array_equal(row["image_mask"], np.arange(4) < 1 + num_images)
    assert not row["images"][1 + num_images :].any()
    image_positions = np.flatnonzero(row["tokens"] == IMAGE_ID)
    assert len(image_positions) == (1 + num_images) * P
    for k in range(1 + num_images):
        run = image_positions[k * P : (k + 1) * P]
        np.testing.assert_array_equal(row["image_slot"][run], k)
        np.testing.assert_array_equal(row["image_patch"][run], np.arange(P))
    text = np.setdiff1d(np.arange(SPEC.seq_len), image_positions)
    assert (row["image_slot"][text] == -1).all() and (row["image_patch"][text] == -1).all()


def test_unpackable_samples_are_errors_naming_the_record():
    rng = np.random.default_rng(0)
    with pytest.raises(BadRecordError, match="record 's0', field 'tokens': 30 tokens exceed"):
        check_packable(_sample(0, 0, 29, rng), SPEC)
    with pytest.raises(BadRecordError, match="field 'images': 4 images exceed the 3"):
        check_packable(_sample(0, 4, 1, rng), SPEC)
    broken = _sample(0, 1, 2, rng)
    broken = PackableSample(
        id="s0", tokens=broken.tokens[1:], supervised=broken.supervised[1:], images=broken.images
    )
    broken = PackableSample(
        id="s0",
        tokens=np.concatenate([broken.tokens, [IMAGE_ID]]).astype(np.int32),
        supervised=np.concatenate([broken.supervised, [False]]),
        images=broken.images,
    )
    with pytest.raises(BadRecordError, match="4 image tokens for 1 images"):
        check_packable(broken, SPEC)


def _stream(samples, skip_every=7):
    elements = [
        SkippedRecord(f"bad{i}", "images[0]", "corrupt") if i % skip_every == 3 else s
        for i, s in enumerate(samples)
    ]
    return grain.MapDataset.source(elements).to_iter_dataset()


def _flat(row):
    return {k: np.asarray(v).tolist() for k, v in row.items()}


def test_pack_iterator_counts_skips_and_matches_pack_samples(samples):
    rows = list(PackIterDataset(_stream(samples), SPEC))
    kept = [s for i, s in enumerate(samples) if i % 7 != 3]
    expected = list(pack_samples(kept, SPEC))
    assert sum(int(r.pop("num_skipped")) for r in rows) == len(samples) - len(kept)
    assert [_flat(r) for r in rows] == [_flat(r) for r in expected]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 5])
def test_pack_iterator_resumes_exactly_from_a_saved_state(samples, stop_after):
    uninterrupted = [_flat(r) for r in PackIterDataset(_stream(samples), SPEC)]
    iterator = iter(PackIterDataset(_stream(samples), SPEC))
    head = [_flat(next(iterator)) for _ in range(stop_after)]
    state = iterator.get_state()
    restored = iter(PackIterDataset(_stream(samples), SPEC))
    restored.set_state(state)
    assert head + [_flat(r) for r in restored] == uninterrupted
