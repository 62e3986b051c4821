"""Where the non-causal spans of a METALM row lie (SPEC §4): ``span_ids`` [N] per packed row.

``span_ids`` is 0 outside spans and k = 1..K on the k-th span of the row, numbered along the
row. A span never crosses a packed-segment boundary (a document, or a document piece cut by the
window), and spans never overlap. Layouts (``SpanSamplingConfig.layout``):

  random        semi-causal LM pretraining: span lengths uniform in [a, b] until the spans cover
                ``fraction`` of the row's real tokens (or nothing more fits), placed uniformly
                among the free stretches of one segment
  prefix        prefix-LM: one span at the start of every segment, length uniform in [a, b],
                at most the segment length - 1 (a segment shorter than a + 1 gets none)
  image_prefix  vision-language pretraining: from the segment start through its last image
                token plus a text prefix of uniform random length, leaving at least one token
  prompt        fine-tuning and evaluation: from the segment start up to its first supervised
                token (the prompt; the decoder predicts the answer)

Sampling is deterministic given (seed, batch index, row): ``SpanBatchStream`` adds ``span_ids``
to every batch of a stream and saves its position with the stream's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LAYOUTS = ("random", "prefix", "image_prefix", "prompt")
# METALM's language setting: spans of 64-128 tokens in 2048-token sequences, 25% of the tokens.
PAPER_SEQ_LEN, PAPER_MIN_LENGTH, PAPER_MAX_LENGTH, PAPER_FRACTION = 2048, 64, 128, 0.25


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpanSamplingConfig:
    """How spans are drawn: ``layout`` (one of ``LAYOUTS``), lengths in [min_length,
    max_length] (random, prefix) and the target ``fraction`` of real tokens (random)."""

    layout: str
    min_length: int = 1
    max_length: int = 1
    fraction: float = PAPER_FRACTION

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"span layout {self.layout!r} is not one of {LAYOUTS}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                f"span lengths need 1 <= min_length <= max_length, got "
                f"[{self.min_length}, {self.max_length}]"
            )
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"span fraction must be in (0, 1), got {self.fraction}")


def scaled_span_lengths(seq_len: int) -> tuple[int, int]:
    """The paper's [64, 128] at 2048 tokens scaled to ``seq_len`` (at least [2, 2])."""
    low = max(2, round(seq_len * PAPER_MIN_LENGTH / PAPER_SEQ_LEN))
    high = max(low, round(seq_len * PAPER_MAX_LENGTH / PAPER_SEQ_LEN))
    return low, high


def segment_bounds(segment_ids: np.ndarray) -> list[tuple[int, int]]:
    """[N] segment ids (0 = padding) -> [(start, end)) of every non-padding segment run."""
    ids = np.asarray(segment_ids)
    change = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(ids)]])
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True) if ids[s] > 0]


def _random_spans(segment_ids: np.ndarray, rng: np.random.Generator, config) -> list:
    free = segment_ids > 0
    budget = int(round(config.fraction * free.sum()))
    spans, covered, low, high = [], 0, config.min_length, config.max_length
    while budget - covered >= low:
        span_length = min(int(rng.integers(low, high + 1)), budget - covered)
        starts = _valid_starts(free, segment_ids, span_length)
        if not len(starts):
            # Nothing that long fits any more; the shortest allowed length may still fit.
            if span_length == low:
                break
            high = span_length - 1
            continue
        start = int(rng.choice(starts))
        free[start : start + span_length] = False
        spans.append((start, start + span_length))
        covered += span_length
    return sorted(spans)


def _valid_starts(free: np.ndarray, segment_ids: np.ndarray, span_length: int) -> np.ndarray:
    """Starts s with [s, s + span_length) all free and inside one segment."""
    if span_length > len(free):
        return np.zeros(0, np.int64)
    free_count = np.concatenate([[0], np.cumsum(free)])
    all_free = free_count[span_length:] - free_count[:-span_length] == span_length
    same_segment = segment_ids[: len(free) - span_length + 1] == segment_ids[span_length - 1 :]
    return np.flatnonzero(all_free & same_segment)


def _span_ids(bounds: list[tuple[int, int]], length: int) -> np.ndarray:
    """[N] span ids of the spans [start, end), given in row order."""
    spans = np.zeros(length, np.int32)
    for k, (start, end) in enumerate(bounds, start=1):
        spans[start:end] = k
    return spans


def sample_span_ids(
    segment_ids: np.ndarray,
    config: SpanSamplingConfig,
    rng: np.random.Generator,
    *,
    image_slot: np.ndarray | None = None,
    loss_mask: np.ndarray | None = None,
) -> np.ndarray:
    """[N] span ids of one packed row under ``config.layout``.

    Args:
      segment_ids: [N] the row's packed-segment ids (0 = padding).
      rng: the row's generator (``row_rng``).
      image_slot: [N] (batch contract), needed by ``image_prefix``.
      loss_mask: [N] (batch contract: position t trains token t + 1), needed by ``prompt``.
    """
    segment_ids = np.asarray(segment_ids)
    length = len(segment_ids)
    if config.layout == "random":
        return _span_ids(_random_spans(segment_ids, rng, config), length)
    spans = []
    for start, end in segment_bounds(segment_ids):
        if config.layout == "prefix":
            longest = min(config.max_length, end - start - 1)
            if longest >= config.min_length:
                spans.append((start, start + int(rng.integers(config.min_length, longest + 1))))
        elif config.layout == "image_prefix":
            if image_slot is None:
                raise ValueError("span layout 'image_prefix' needs the batch's image_slot")
            images = np.flatnonzero(np.asarray(image_slot)[start:end] >= 0)
            anchor = start + int(images[-1]) + 1 if len(images) else start + 1
            if anchor < end:
                spans.append((start, anchor + int(rng.integers(0, end - anchor))))
        else:
            if loss_mask is None:
                raise ValueError("span layout 'prompt' needs the batch's loss_mask")
            trained = np.flatnonzero(np.asarray(loss_mask)[start:end] > 0)
            if len(trained):
                # Position t trains token t + 1: the prompt ends before the first trained token.
                spans.append((start, start + int(trained[0]) + 1))
    return _span_ids(spans, length)


def row_rng(seed: int, batch_index: int, row: int) -> np.random.Generator:
    """The generator of one row: a function of (seed, batch index, row) only."""
    return np.random.default_rng([seed, batch_index, row])


def check_spans(
    span_ids: np.ndarray,
    segment_ids: np.ndarray,
    *,
    max_spans: int,
    max_span_length: int,
    image_slot: np.ndarray | None = None,
) -> None:
    """Raises ValueError naming the row and span that breaks the layout a model relies on.

    Checks, per row of [B, N] arrays: spans numbered 1..K along the row, each contiguous and
    inside one segment; K <= ``max_spans``; each span <= ``max_span_length`` tokens; with
    ``image_slot``, every image token inside a span (semi-causal vision-language).
    """
    span_ids, segment_ids = np.atleast_2d(span_ids), np.atleast_2d(segment_ids)
    for row, (spans, segments) in enumerate(zip(span_ids, segment_ids, strict=True)):
        bounds = segment_bounds(spans)
        ids = [int(spans[s]) for s, _ in bounds]
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(
                f"span_ids row {row}: spans are numbered {ids}, expected 1..K in order"
            )
        if len(ids) > max_spans:
            raise ValueError(f"span_ids row {row}: {len(ids)} spans exceed max_spans={max_spans}")
        for k, (start, end) in enumerate(bounds, start=1):
            if end - start > max_span_length:
                raise ValueError(
                    f"span_ids row {row}, span {k}: {end - start} tokens exceed "
                    f"max_span_length={max_span_length}"
                )
            if segments[start] == 0 or np.any(segments[start:end] != segments[start]):
                raise ValueError(
                    f"span_ids row {row}, span {k} [{start}, {end}) crosses a segment boundary "
                    "or covers padding"
                )
        if image_slot is not None:
            outside = np.flatnonzero((np.atleast_2d(image_slot)[row] >= 0) & (spans == 0))
            if len(outside):
                raise ValueError(
                    f"span_ids row {row}: image tokens at {outside[:4].tolist()} lie outside "
                    "every span (the semi-causal encoder must see the images)"
                )


class SpanBatchStream:
    """Adds ``span_ids`` [B, N] int32 to every batch of a resumable stream of contract batches.

    Row r of the i-th batch is drawn with ``row_rng(seed, i, r)``; the state is the inner
    stream's plus i, so a resumed stream draws the same spans. With ``max_spans`` set, every
    batch goes through ``check_spans`` (``images_in_spans``: every image token in a span).
    """

    def __init__(
        self,
        stream: Any,
        config: SpanSamplingConfig,
        *,
        seed: int,
        max_spans: int | None = None,
        max_span_length: int | None = None,
        images_in_spans: bool = False,
    ):
        self.stream = stream
        self.config = config
        self.seed = seed
        self.limits = (max_spans, max_span_length)
        self.images_in_spans = images_in_spans
        self.batch_index = 0

    def __iter__(self) -> SpanBatchStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.stream))
        batch["span_ids"] = self.span_ids_of(batch, self.batch_index)
        self.batch_index += 1
        max_spans, max_span_length = self.limits
        if max_spans is not None:
            check_spans(
                batch["span_ids"],
                batch["segment_ids"],
                max_spans=max_spans,
                max_span_length=max_span_length or batch["span_ids"].shape[1],
                image_slot=batch["image_slot"] if self.images_in_spans else None,
            )
        return batch

    def span_ids_of(self, batch: dict, batch_index: int) -> np.ndarray:
        """[B, N] span ids of ``batch`` as the ``batch_index``-th batch of the stream."""
        rows = []
        for r, segments in enumerate(np.asarray(batch["segment_ids"])):
            rows.append(
                sample_span_ids(
                    segments,
                    self.config,
                    row_rng(self.seed, batch_index, r),
                    image_slot=batch["image_slot"][r] if "image_slot" in batch else None,
                    loss_mask=batch["loss_mask"][r],
                )
            )
        return np.stack(rows).astype(np.int32)

    def get_state(self) -> dict:
        return {"stream": self.stream.get_state(), "batch_index": self.batch_index}

    def set_state(self, state: dict) -> None:
        self.stream.set_state(state["stream"])
        self.batch_index = int(state["batch_index"])
