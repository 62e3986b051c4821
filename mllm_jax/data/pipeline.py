"""Grain pipeline that streams packed, interleaved image-text batches.

  records (random access) -> this process's shard -> seeded shuffle (reshuffled every epoch)
  -> record to Sample -> template + tokenize -> image decode + preprocess
  -> optional augmentation -> pack into rows (data/packing.py) -> batch
  -> multiprocess workers or a prefetch thread -> batches of the contract in data/batch.py

Deterministic given the seed; ``get_state``/``set_state`` restore the exact position, so a
resumed run sees the batches an uninterrupted one would. Bad records raise ``BadRecordError``
(naming the record and field) or, with ``on_bad_record="skip"``, are dropped, logged, counted in
every batch's ``num_skipped`` and summed by ``BatchStream``. Nothing is lost silently:

  - skips after the last sample of a finite stream travel in a row with no sample, and the last
    partial batch of a finite stream is dropped by ``BatchStream`` only after counting its skips
    and its samples (logged, and in ``BatchStream.report()``);
  - more bad records in a row than one pass over the data holds means that nothing usable is
    left: an error (``NoUsableRecordsError``), not an endless search for a good record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.packing import PackableSample, PackingSpec, RowBuilder, check_packable
from mllm_jax.data.sample import BadRecordError, Sample
from mllm_jax.data.templates import tokenize_sample
from mllm_jax.data.tokenizer_protocol import TextTokenizer


class NoUsableRecordsError(ValueError):
    """Every record of a whole pass over the data was bad and skipped."""


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Stands in for a bad record so that packing can count it (also across worker processes)."""

    id: str
    field: str
    problem: str


class SampleProcessor:
    """record -> PackableSample (or SkippedRecord). Picklable for multiprocess workers."""

    def __init__(
        self,
        to_sample: Callable[[Any], Sample],
        tokenizer: TextTokenizer,
        *,
        template: str,
        spec: PackingSpec,
        preprocessing: ImagePreprocessing,
        on_bad_record: str = "raise",
        system_prompt: str | None = None,
    ):
        if on_bad_record not in ("raise", "skip"):
            raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
        self.to_sample = to_sample
        self.tokenizer = tokenizer
        self.template = template
        self.spec = spec
        self.preprocessing = preprocessing
        self.on_bad_record = on_bad_record
        self.system_prompt = system_prompt

    def __call__(self, record: Any) -> PackableSample | SkippedRecord:
        try:
            return self._process(record)
        except BadRecordError as err:
            if self.on_bad_record == "raise":
                raise
            logging.warning("skipping bad record: %s", err)
            return SkippedRecord(err.record_id, err.field, err.problem)

    def _process(self, record: Any) -> PackableSample:
        sample = self.to_sample(record)
        tokenized = tokenize_sample(
            sample,
            self.tokenizer,
            template=self.template,
            tokens_per_image=self.spec.tokens_per_image,
            max_length=self.spec.seq_len,
            system_prompt=self.system_prompt,
        )
        size = self.spec.image_size
        images = np.zeros((0, size, size, 3), np.float32)
        if sample.images:
            images = np.stack(
                [
                    self.preprocessing(encoded, sample.id, f"images[{i}]")
                    for i, encoded in enumerate(sample.images)
                ]
            )
        packable = PackableSample(
            id=sample.id, tokens=tokenized.tokens, supervised=tokenized.supervised, images=images
        )
        check_packable(packable, self.spec)
        return packable


def random_horizontal_flip(element: Any, rng: np.random.Generator) -> Any:
    """Flips all images of a sample left-right with probability 1/2 (seeded per element)."""
    if isinstance(element, PackableSample) and len(element.images) and rng.random() < 0.5:
        return dataclasses.replace(element, images=element.images[:, :, ::-1, :].copy())
    return element


class PackIterDataset(grain.IterDataset):
    """Packs a stream of PackableSamples (and SkippedRecords) into contract rows.

    ``max_consecutive_skips``: raise NoUsableRecordsError when more SkippedRecords than this
    come in a row (one pass over the data: none is usable); None: no limit.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        spec: PackingSpec,
        max_consecutive_skips: int | None = None,
    ):
        super().__init__(parent)
        self._spec = spec
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._spec, self._max_consecutive_skips)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._spec.seq_len}, slots={self._spec.max_images})"


class _PackIterator(grain.DatasetIterator):
    """Next-fit packing whose state is the parent's state before the next row's first sample.

    A sample that did not fit the previous row is held as ``pending``; restoring re-reads it
    from the parent, so no array ever has to be stored in the (JSON) state. When the parent
    ends with skipped records and no sample, they come out in a row with no sample.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        spec: PackingSpec,
        max_consecutive_skips: int | None = None,
    ):
        super().__init__(parent)
        self._spec = spec
        self._max_consecutive_skips = max_consecutive_skips
        self._consecutive_skips = 0
        self._pending: PackableSample | None = None
        self._row_start_state = parent.get_state()

    def _count_skip(self, element: SkippedRecord) -> None:
        self._consecutive_skips += 1
        limit = self._max_consecutive_skips
        if limit is not None and self._consecutive_skips > limit:
            raise NoUsableRecordsError(
                f"{self._consecutive_skips} bad records in a row were skipped, more than the "
                f"{limit} one pass over this process's data holds: none is usable (the last: "
                f"record {element.id!r}, field {element.field!r}: {element.problem}); fix the "
                "data, or set on_bad_record='raise' to stop at the first bad record"
            )

    def __next__(self) -> dict[str, np.ndarray]:
        builder = RowBuilder(self._spec)
        if self._pending is not None:
            builder.add(self._pending)
            self._pending = None
        skipped = 0
        while True:
            state_before = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                if not builder.samples and not skipped:
                    raise
                self._row_start_state = self._parent.get_state()
                break
            if isinstance(element, SkippedRecord):
                skipped += 1
                self._count_skip(element)
                continue
            self._consecutive_skips = 0
            if builder.fits(element):
                builder.add(element)
                continue
            self._pending = element
            self._row_start_state = state_before
            break
        row = builder.build()
        row["num_skipped"] = np.int32(skipped)
        return row

    def get_state(self) -> dict:
        return {"parent": self._row_start_state}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._row_start_state = state["parent"]
        self._pending = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """Per-process batch size, shuffling, epochs, workers and augmentation of a pipeline."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    augment: bool = False
    worker_count: int = 0
    worker_buffer_size: int = 2  # batches each worker process keeps ready
    prefetch_batches: int = 2  # without workers: batches a background thread keeps ready (0: off)
    # Threads that read + preprocess samples ahead of packing, and how many samples they keep
    # ready. Grain's defaults (16, 500) suit many-core TPU hosts; on a 2-core host they cost
    # twice the CPU of one thread (per-element bookkeeping over a 500-deep buffer).
    read_threads: int = 1
    read_buffer_size: int = 16


def make_packed_dataset(
    records: Sequence[Any],
    processor: SampleProcessor,
    options: PipelineOptions,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Builds the Grain pipeline over random-access ``records`` (e.g. ``tfds.data_source``)."""
    dataset = grain.MapDataset.source(records)[process_index::process_count]
    records_per_pass = len(dataset)
    if options.shuffle:
        dataset = dataset.shuffle(seed=options.seed)
    if options.num_epochs != 1:
        dataset = dataset.repeat(options.num_epochs)
    return _process_pack_batch(dataset, processor, options, records_per_pass)


class TaggedRecord:
    """record -> (source index, record): lets one processor serve several sources. Picklable."""

    def __init__(self, source_index: int):
        self.source_index = source_index

    def __call__(self, record: Any) -> tuple[int, Any]:
        return self.source_index, record


class ToSampleBySource:
    """(source index, record) -> that source's ``to_sample(record)``. Picklable."""

    def __init__(self, to_samples: Sequence[Callable[[Any], Sample]]):
        self.to_samples = tuple(to_samples)

    def __call__(self, tagged: tuple[int, Any]) -> Sample:
        source_index, record = tagged
        return self.to_samples[source_index](record)


def make_mixed_packed_dataset(
    sources: Sequence[Sequence[Any]],
    weights: Sequence[float],
    processor: SampleProcessor,
    options: PipelineOptions,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Like ``make_packed_dataset`` over a weighted mixture of record sources, repeated forever.

    Each source is sharded per process, shuffled with its own seed (``options.seed + k``) and
    repeated, then ``grain.MapDataset.mix`` draws from them in the ``weights`` proportions, so
    the mixture holds at every point of the stream, not just over an epoch. Elements reach
    ``processor`` as ``(source index, record)``: build it with ``ToSampleBySource``.
    """
    if len(sources) != len(weights) or not sources:
        raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {list(weights)}")
    if options.num_epochs is not None:
        raise ValueError("a mixture repeats its sources forever: set num_epochs=None")
    parts = []
    records_per_pass = 0
    for k, records in enumerate(sources):
        part = grain.MapDataset.source(records)[process_index::process_count]
        records_per_pass += len(part)
        if options.shuffle:
            part = part.shuffle(seed=options.seed + k)
        parts.append(part.repeat(None).map(TaggedRecord(k)))
    mixture = grain.MapDataset.mix(parts, weights)
    return _process_pack_batch(mixture, processor, options, records_per_pass)


class _FlagPartialBatch:
    """Marks a batch with fewer rows than ``batch_size`` (the end of a finite stream)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["partial"] = np.bool_(len(batch["num_skipped"]) < self.batch_size)
        return batch


def _process_pack_batch(
    dataset: grain.MapDataset,
    processor: SampleProcessor,
    options: PipelineOptions,
    records_per_pass: int,
) -> grain.IterDataset:
    dataset = dataset.map(processor)
    if options.augment:
        dataset = dataset.random_map(random_horizontal_flip, seed=options.seed + 1)
    read_options = grain.ReadOptions(
        num_threads=options.read_threads, prefetch_buffer_size=options.read_buffer_size
    )
    packed = PackIterDataset(
        dataset.to_iter_dataset(read_options), processor.spec, max(records_per_pass, 1)
    )
    # BatchStream drops a partial batch after counting what it holds (see the module docstring).
    packed = packed.batch(options.batch_size, drop_remainder=False)
    packed = packed.map(_FlagPartialBatch(options.batch_size))
    if options.worker_count:
        packed = packed.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=options.worker_count,
                per_worker_buffer_size=options.worker_buffer_size,
            )
        )
    elif options.prefetch_batches:
        packed = grain.experimental.ThreadPrefetchIterDataset(
            packed, prefetch_buffer_size=options.prefetch_batches
        )
    return packed


class BatchStream:
    """Iterator over contract batches that tallies skipped records and reports them at the end.

    A partial batch (the end of a finite stream) or one without a sample is not yielded: its
    skipped records are counted, and its samples counted and logged as dropped.
    """

    def __init__(self, dataset: grain.IterDataset):
        self._iterator = iter(dataset)
        self.num_skipped = 0
        self.num_batches = 0
        self.num_dropped_samples = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            try:
                batch = next(self._iterator)
            except StopIteration:
                logging.info("pipeline finished: %s", self.report())
                raise
            self.num_skipped += int(np.sum(batch.pop("num_skipped")))
            partial = bool(batch.pop("partial", False))
            samples = int(np.asarray(batch["segment_ids"]).max(axis=1).sum())
            if partial or not samples:
                if samples:
                    self.num_dropped_samples += samples
                    logging.warning(
                        "dropping the last, partial batch of a finite stream: %d rows, %d samples",
                        len(batch["segment_ids"]),
                        samples,
                    )
                continue
            self.num_batches += 1
            return batch

    def report(self) -> str:
        report = f"{self.num_batches} batches, {self.num_skipped} bad records skipped"
        if self.num_dropped_samples:
            report += f", {self.num_dropped_samples} samples dropped in a last partial batch"
        return report

    def get_state(self) -> dict:
        return {
            "iterator": self._iterator.get_state(),
            "num_skipped": self.num_skipped,
            "num_batches": self.num_batches,
            "num_dropped_samples": self.num_dropped_samples,
        }

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["iterator"])
        self.num_skipped = state["num_skipped"]
        self.num_batches = state["num_batches"]
        self.num_dropped_samples = state.get("num_dropped_samples", 0)
