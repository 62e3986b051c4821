"""Counting the records a builder skips, so that nothing is lost silently.

Each skip is counted under a reason; the first few of each reason (or, when asked, every one) are
logged with their record ids. At the end of
a split the counts are logged and stored in the dataset's ``metadata.json`` (``builder.info.metadata
["skipped"][split]``), where ``prepare`` and later readers find them.
"""

from __future__ import annotations

import collections

import tensorflow_datasets as tfds
from absl import logging

_LOGGED_PER_REASON = 5


class SkippedRecords:
    """Skip counts by reason for one split of one dataset."""

    def __init__(self, dataset: str, split: str, *, log_every_record: bool = False):
        self.dataset, self.split = dataset, split
        self.log_every_record = log_every_record
        self.counts: collections.Counter[str] = collections.Counter()

    def skip(self, record_id: str, reason: str, detail: str = "") -> None:
        """Counts ``record_id`` as skipped for ``reason``; logs it if it is among the first few
        of that reason or ``log_every_record`` is set."""
        self.counts[reason] += 1
        if self.log_every_record or self.counts[reason] <= _LOGGED_PER_REASON:
            logging.warning(
                "%s/%s: skipping record %r (%s) %s",
                self.dataset,
                self.split,
                record_id,
                reason,
                detail,
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, metadata: tfds.core.MetadataDict, kept: int) -> None:
        """Logs the counts and stores them under ``metadata["skipped"][split]``."""
        logging.info(
            "%s/%s: kept %d records, skipped %d %s",
            self.dataset,
            self.split,
            kept,
            self.total,
            dict(self.counts),
        )
        metadata.setdefault("skipped", {})[self.split] = dict(self.counts)
