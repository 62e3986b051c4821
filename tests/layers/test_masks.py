"""make_attention_mask and its mask_ar helpers against masks written from each kind's definition.

The references below never use the cumsum trick of the library: each kind of attention is
written down directly from what it means (causal: k <= q; prefix P: k < P or k <= q; a
semi-causal span: its tokens see each other and everything before; ...), with explicit loops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.masks import (
    bidirectional_mask_ar,
    causal_mask_ar,
    make_attention_mask,
    positions_from_segment_ids,
    prefix_mask_ar,
)

# --------------------------------------------------------------------------------------------
# Plain-numpy references, one per kind, from the semantic definition.
# --------------------------------------------------------------------------------------------


def ref_causal(batch: int, length: int) -> np.ndarray:
    out = np.zeros((batch, 1, length, length), bool)
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                out[b, 0, q, k] = k <= q
    return out


def ref_bidirectional(batch: int, length: int) -> np.ndarray:
    return np.ones((batch, 1, length, length), bool)


def ref_prefix(prefix_lengths: list[int], length: int) -> np.ndarray:
    out = np.zeros((len(prefix_lengths), 1, length, length), bool)
    for b, p in enumerate(prefix_lengths):
        for q in range(length):
            for k in range(length):
                out[b, 0, q, k] = k < p or k <= q
    return out


def ref_spans(spans_per_row: list[list[tuple[int, int]]], length: int) -> np.ndarray:
    """Causal sequence with bidirectional spans [s, e): span tokens see the whole span."""
    out = np.zeros((len(spans_per_row), 1, length, length), bool)
    for b, spans in enumerate(spans_per_row):
        span_of = [-1] * length
        for i, (s, e) in enumerate(spans):
            for t in range(s, e):
                span_of[t] = i
        for q in range(length):
            for k in range(length):
                same_span = span_of[q] != -1 and span_of[q] == span_of[k]
                out[b, 0, q, k] = k <= q or same_span
    return out


def mask_ar_from_spans(spans_per_row: list[list[tuple[int, int]]], length: int) -> np.ndarray:
    """big_vision mask_ar input: 1 everywhere except the non-first tokens of each span."""
    mask_ar = np.ones((len(spans_per_row), length), np.int32)
    for b, spans in enumerate(spans_per_row):
        for s, e in spans:
            mask_ar[b, s + 1 : e] = 0
    return mask_ar


def ref_with_padding(base: np.ndarray, input_mask: np.ndarray) -> np.ndarray:
    out = base.copy()
    batch, _, length, _ = base.shape
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                out[b, 0, q, k] = base[b, 0, q, k] and input_mask[b, q] and input_mask[b, k]
    return out


def ref_with_segments(base: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    out = base.copy()
    batch, _, length, _ = base.shape
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                out[b, 0, q, k] = base[b, 0, q, k] and segment_ids[b, q] == segment_ids[b, k]
    return out


def ref_positions(segment_ids: np.ndarray) -> np.ndarray:
    out = np.zeros(segment_ids.shape, np.int64)
    for b in range(segment_ids.shape[0]):
        for t in range(segment_ids.shape[1]):
            if t == 0 or segment_ids[b, t] != segment_ids[b, t - 1]:
                out[b, t] = 0
            else:
                out[b, t] = out[b, t - 1] + 1
    return out


# One compiled program per shape instead of one per primitive keeps the suite fast on CPU.
jit_mask = jax.jit(make_attention_mask)


def build(mask_ar, input_mask=None, segment_ids=None) -> np.ndarray:
    as_jnp = lambda a: None if a is None else jnp.asarray(a)
    return np.asarray(jit_mask(as_jnp(mask_ar), as_jnp(input_mask), as_jnp(segment_ids)))


# --------------------------------------------------------------------------------------------
# mask_ar helpers
# --------------------------------------------------------------------------------------------


def test_causal_mask_ar_is_all_ones():
    np.testing.assert_array_equal(np.asarray(causal_mask_ar(2, 5)), np.ones((2, 5)))


def test_bidirectional_mask_ar_is_all_zeros():
    np.testing.assert_array_equal(np.asarray(bidirectional_mask_ar(3, 4)), np.zeros((3, 4)))


def test_prefix_mask_ar_zeros_over_prefix_then_ones():
    got = np.asarray(prefix_mask_ar(jnp.array([0, 2, 6]), 6))
    want = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# make_attention_mask, one test per kind
# --------------------------------------------------------------------------------------------


def test_mask_shape_and_dtype():
    mask = make_attention_mask(causal_mask_ar(3, 7))
    assert mask.shape == (3, 1, 7, 7)
    assert mask.dtype == jnp.bool_


def test_causal_mask_lets_query_see_only_itself_and_earlier_keys():
    np.testing.assert_array_equal(build(causal_mask_ar(2, 6)), ref_causal(2, 6))


def test_bidirectional_mask_lets_every_query_see_every_key():
    np.testing.assert_array_equal(build(bidirectional_mask_ar(2, 6)), ref_bidirectional(2, 6))


@pytest.mark.parametrize("prefix_lengths", [[0, 1, 3, 7], [2, 5, 4, 6]])
def test_prefix_mask_is_bidirectional_over_prefix_and_causal_after(prefix_lengths):
    length = 7
    mask_ar = prefix_mask_ar(jnp.array(prefix_lengths), length)
    np.testing.assert_array_equal(build(mask_ar), ref_prefix(prefix_lengths, length))


def test_prefix_of_length_zero_or_one_equals_causal():
    mask_ar = prefix_mask_ar(jnp.array([0, 1]), 5)
    np.testing.assert_array_equal(build(mask_ar), ref_causal(2, 5))


def test_semi_causal_span_sees_itself_and_everything_before():
    length = 8
    spans = [[(2, 5)], [(0, 3)], [(5, 8)]]
    got = build(mask_ar_from_spans(spans, length))
    np.testing.assert_array_equal(got, ref_spans(spans, length))
    # A token in the middle of the first row's span sees the end of its span, not beyond it.
    assert got[0, 0, 2, 4] and not got[0, 0, 2, 5]


def test_metalm_example_with_several_spans_and_padding():
    # Row 0: [bos] [img img img img] [txt txt] [img img img] [txt] + 2 pad; row 1: one long span.
    length = 14
    spans = [[(1, 5), (7, 10)], [(2, 9)]]
    input_mask = np.ones((2, length), bool)
    input_mask[0, 11:] = False
    input_mask[1, 13:] = False
    mask_ar = mask_ar_from_spans(spans, length)
    np.testing.assert_array_equal(
        mask_ar[0], [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    )  # the input itself, spelt out
    got = build(mask_ar, input_mask)
    want = ref_with_padding(ref_spans(spans, length), input_mask)
    np.testing.assert_array_equal(got, want)
    # Spot checks from the definition: the second span does not see its own future text ...
    assert got[0, 0, 7, 9] and not got[0, 0, 9, 10]
    # ... text after a span sees all of it, and padded tokens see and are seen by nothing.
    assert got[0, 0, 10, 1:10].all()
    assert not got[0, 0, 11:].any() and not got[0, 0, :, 11:].any()


def test_padding_removes_padded_queries_and_keys():
    length = 6
    input_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    for mask_ar, base in [
        (causal_mask_ar(3, length), ref_causal(3, length)),
        (bidirectional_mask_ar(3, length), ref_bidirectional(3, length)),
    ]:
        got = build(mask_ar, input_mask)
        np.testing.assert_array_equal(got, ref_with_padding(base, input_mask))


def test_left_padding_with_causal_mask():
    input_mask = np.array([[0, 0, 1, 1, 1]], bool)
    got = build(causal_mask_ar(1, 5), input_mask)
    np.testing.assert_array_equal(got, ref_with_padding(ref_causal(1, 5), input_mask))
    assert not got[0, 0, 4, :2].any() and got[0, 0, 4, 2:].all()


def test_packed_segments_never_attend_across_segments():
    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 1, 2, 2, 0]])
    input_mask = segment_ids != 0
    got = build(causal_mask_ar(2, 8), input_mask, segment_ids)
    want = ref_with_padding(ref_with_segments(ref_causal(2, 8), segment_ids), input_mask)
    np.testing.assert_array_equal(got, want)
    assert not got[0, 0, 3, 2]  # first token of segment 2 does not see segment 1


def test_packed_segments_with_prefix_blocks_per_segment():
    # Two packed prefix-LM examples: [p p t t] [p p p t]; mask_ar restarts per segment.
    segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    mask_ar = np.array([[0, 0, 1, 1, 0, 0, 0, 1]])
    got = build(mask_ar, segment_ids=segment_ids)
    want = np.zeros((1, 1, 8, 8), bool)
    for q in range(8):
        for k in range(8):
            seg_q, seg_k = segment_ids[0, q], segment_ids[0, k]
            start = 0 if seg_q == 1 else 4
            prefix_end = start + (2 if seg_q == 1 else 3)
            want[0, 0, q, k] = seg_q == seg_k and (k < prefix_end or k <= q)
    np.testing.assert_array_equal(got, want)


def test_bool_mask_ar_gives_same_mask_as_int():
    mask_ar = np.array([[True, False, False, True, True, False]])
    np.testing.assert_array_equal(build(mask_ar), build(mask_ar.astype(np.int32)))
    np.testing.assert_array_equal(build(mask_ar), ref_spans([[(0, 3), (4, 6)]], 6))


def test_random_mask_ar_matches_block_definition():
    """Any mask_ar: split the sequence into blocks (a 1 opens one); k visible iff block <= q's."""
    rng = np.random.default_rng(0)
    mask_ar = rng.integers(0, 2, size=(4, 10))
    input_mask = rng.random((4, 10)) > 0.2
    got = build(mask_ar, input_mask)
    want = np.zeros((4, 1, 10, 10), bool)
    for b in range(4):
        blocks, current = [], -1
        for t in range(10):
            if mask_ar[b, t] == 1 or t == 0:
                current += 1
            blocks.append(current)
        for q in range(10):
            for k in range(10):
                visible = blocks[k] <= blocks[q]
                want[b, 0, q, k] = visible and input_mask[b, q] and input_mask[b, k]
    np.testing.assert_array_equal(got, want)


def test_make_attention_mask_rejects_non_2d_mask_ar():
    with pytest.raises(ValueError, match=r"mask_ar must be \[B, N\]"):
        make_attention_mask(jnp.ones((5,), jnp.int32))


# --------------------------------------------------------------------------------------------
# positions_from_segment_ids
# --------------------------------------------------------------------------------------------


def test_positions_restart_at_each_segment():
    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    got = np.asarray(positions_from_segment_ids(jnp.asarray(segment_ids)))
    want = np.array([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, ref_positions(segment_ids))


def test_positions_restart_when_an_id_reappears_later():
    segment_ids = np.array([[1, 1, 2, 2, 2, 1, 1]])
    got = np.asarray(positions_from_segment_ids(jnp.asarray(segment_ids)))
    np.testing.assert_array_equal(got, [[0, 1, 0, 1, 2, 0, 1]])


def test_positions_from_random_segments_match_loop_reference():
    rng = np.random.default_rng(1)
    segment_ids = np.sort(rng.integers(0, 4, size=(5, 16)), axis=1)
    got = np.asarray(positions_from_segment_ids(jnp.asarray(segment_ids)))
    np.testing.assert_array_equal(got, ref_positions(segment_ids))
