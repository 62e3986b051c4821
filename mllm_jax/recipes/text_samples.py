"""Image-text samples turned into text-only training text for LM pretraining."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mllm_jax.data.builders import SampleSource
from mllm_jax.data.sample import IMAGE_PLACEHOLDER, BadRecordError, Sample, Turn


class WithoutImages:
    """record -> the record's Sample with its images and placeholders removed, every non-system
    turn supervised (so the LM learns the questions as well as the answers). Picklable."""

    def __init__(self, to_sample: Callable[[Any], Sample]):
        self.to_sample = to_sample

    def __call__(self, record: Any) -> Sample:
        sample = self.to_sample(record)
        turns = []
        for turn in sample.turns:
            text = turn.text.replace(IMAGE_PLACEHOLDER, "")
            if turn.role == "user":
                text = text.strip()
            if not text.strip():
                continue
            turns.append(Turn(role=turn.role, text=text, supervised=turn.role != "system"))
        if not turns:
            raise BadRecordError(sample.id, "turns", "no text left once the images are removed")
        return dataclasses.replace(sample, turns=tuple(turns), images=())


def text_only(source: SampleSource) -> SampleSource:
    """The same records, read as text-only samples (``WithoutImages``)."""
    return SampleSource(records=source.records, to_sample=WithoutImages(source.to_sample))
