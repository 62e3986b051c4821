"""Span sampling for METALM: boundaries, fraction, layouts, reproducibility, checks, resume."""

import numpy as np
import pytest

from mllm_jax.data.span_sampling import (
    SpanBatchStream,
    SpanSamplingConfig,
    check_spans,
    row_rng,
    sample_span_ids,
    scaled_span_lengths,
    segment_bounds,
)

RANDOM = SpanSamplingConfig(layout="random", min_length=4, max_length=9, fraction=0.25)


def _packed_row(rng, length=256):
    """Segment ids of a packed row: segments of 1..80 tokens, then padding."""
    ids, segment = [], 1
    while len(ids) < length - 20:
        ids += [segment] * int(rng.integers(1, 81))
        segment += 1
    ids = ids[: length - 20]
    return np.array(ids + [0] * (length - len(ids)), np.int32)


def _span_bounds(spans):
    return segment_bounds(spans)


def test_random_spans_stay_inside_one_segment_and_have_allowed_lengths():
    rng = np.random.default_rng(0)
    for trial in range(200):
        segments = _packed_row(rng)
        spans = sample_span_ids(segments, RANDOM, row_rng(7, trial, 0))
        bounds = _span_bounds(spans)
        assert [int(spans[s]) for s, _ in bounds] == list(range(1, len(bounds) + 1))
        for start, end in bounds:
            assert RANDOM.min_length <= end - start <= RANDOM.max_length
            assert segments[start] > 0 and np.all(segments[start:end] == segments[start])
        assert np.all(spans[segments == 0] == 0)
        check_spans(spans, segments, max_spans=64, max_span_length=RANDOM.max_length)


def test_random_spans_cover_the_fraction_where_segments_are_long_enough():
    for seed in range(20):
        segments = np.repeat(np.arange(1, 5), 128).astype(np.int32)
        spans = sample_span_ids(segments, RANDOM, row_rng(seed, 0, 0))
        covered = np.mean(spans > 0)
        # The budget round(0.25 * 512) = 128 is hit exactly unless the last span cannot fit.
        assert abs(covered - 0.25) <= RANDOM.min_length / 512


def test_segments_shorter_than_the_minimum_length_get_no_span():
    segments = np.repeat(np.arange(1, 33), 3).astype(np.int32)  # 3-token segments, min 4
    assert not sample_span_ids(segments, RANDOM, row_rng(0, 0, 0)).any()


def test_spans_are_reproducible_from_the_seed():
    segments = _packed_row(np.random.default_rng(1))
    first = sample_span_ids(segments, RANDOM, row_rng(3, 5, 2))
    np.testing.assert_array_equal(first, sample_span_ids(segments, RANDOM, row_rng(3, 5, 2)))
    others = [sample_span_ids(segments, RANDOM, row_rng(s, 5, 2)) for s in range(4, 8)]
    assert any(not np.array_equal(first, other) for other in others)


def test_prefix_layout_puts_one_span_at_each_long_enough_segment_start():
    config = SpanSamplingConfig(layout="prefix", min_length=4, max_length=9)
    segments = np.array([1] * 20 + [2] * 3 + [3] * 6 + [0] * 3, np.int32)
    for seed in range(30):
        spans = sample_span_ids(segments, config, row_rng(seed, 0, 0))
        bounds = _span_bounds(spans)
        assert len(bounds) == 2 and bounds[0][0] == 0 and 4 <= bounds[0][1] <= 9
        # The 6-token segment fits a 4- or 5-token prefix, never 6 (one token must follow).
        assert bounds[1][0] == 23 and 27 <= bounds[1][1] <= 28
        assert not spans[20:23].any()  # 3 tokens: shorter than min_length + 1


def test_image_prefix_layout_covers_the_images_and_leaves_text_to_predict():
    config = SpanSamplingConfig(layout="image_prefix")
    segments = np.array([1] * 10 + [2] * 8, np.int32)
    image_slot = np.full(18, -1)
    image_slot[1:5], image_slot[11:15] = 0, 1
    ends = set()
    for seed in range(40):
        spans = sample_span_ids(segments, config, row_rng(seed, 0, 0), image_slot=image_slot)
        (s1, e1), (s2, e2) = _span_bounds(spans)
        assert (s1, s2) == (0, 10) and 5 <= e1 <= 9 and 15 <= e2 <= 17
        ends.add(e1)
        check_spans(spans, segments, max_spans=2, max_span_length=9, image_slot=image_slot)
    assert ends == {5, 6, 7, 8, 9}  # the text prefix length is random, 0..4 tokens


def test_prompt_layout_ends_the_span_before_the_first_supervised_token():
    config = SpanSamplingConfig(layout="prompt")
    segments = np.array([1] * 8 + [2] * 6, np.int32)
    loss_mask = np.zeros(14, np.float32)
    loss_mask[5:7] = 1  # tokens 6 and 7 are the answer of sample 1
    loss_mask[11:13] = 1  # tokens 12 and 13 of sample 2
    spans = sample_span_ids(segments, config, row_rng(0, 0, 0), loss_mask=loss_mask)
    assert _span_bounds(spans) == [(0, 6), (8, 12)]


@pytest.mark.parametrize(
    "spans, segments, kwargs, message",
    [
        ([0, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 0], {}, "crosses a segment boundary"),
        ([0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], {"max_span_length": 3}, "exceed max_span_length"),
        ([1, 0, 2, 0, 3, 0], [1] * 6, {"max_spans": 2}, "exceed max_spans"),
        ([0, 2, 2, 0, 1, 0], [1] * 6, {}, "numbered"),
        ([0, 0, 0, 1, 1, 0], [1] * 6, {"image_slot": [-1, 0, 0, 0, 0, -1]}, "outside every span"),
    ],
)
def test_check_spans_names_the_row_and_problem(spans, segments, kwargs, message):
    limits = {"max_spans": 8, "max_span_length": 8} | kwargs
    if "image_slot" in limits:
        limits["image_slot"] = np.array([limits["image_slot"]])
    with pytest.raises(ValueError, match=message):
        check_spans(np.array([spans]), np.array([segments]), **limits)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="layout"):
        SpanSamplingConfig(layout="middle")
    with pytest.raises(ValueError, match="min_length"):
        SpanSamplingConfig(layout="random", min_length=5, max_length=4)
    with pytest.raises(ValueError, match="fraction"):
        SpanSamplingConfig(layout="random", fraction=1.5)


def test_scaled_lengths_follow_the_paper_ratio():
    assert scaled_span_lengths(2048) == (64, 128)
    assert scaled_span_lengths(256) == (8, 16)
    assert scaled_span_lengths(16) == (2, 2)


class _Counter:
    """A resumable stream of identical packed batches."""

    def __init__(self):
        self.position = 0
        rng = np.random.default_rng(9)
        self.segments = np.stack([_packed_row(rng, 128) for _ in range(3)])

    def __next__(self):
        self.position += 1
        return {"segment_ids": self.segments, "loss_mask": np.ones(self.segments.shape)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_span_stream_resumes_with_the_same_spans():
    stream = SpanBatchStream(_Counter(), RANDOM, seed=4, max_spans=32, max_span_length=9)
    next(stream)
    state = stream.get_state()
    expected = [next(stream)["span_ids"] for _ in range(2)]
    resumed = SpanBatchStream(_Counter(), RANDOM, seed=4)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["span_ids"], want)
    assert not np.array_equal(expected[0], expected[1])  # each batch index draws afresh
