"""The prepared datasets by name: build one into a data_dir, read a split back as Samples.

  prepare("easy_vqa", data_dir, max_examples=100)        -> {"train": 100, "test": 100}
  source = load_samples("easy_vqa", data_dir, "train", max_examples=100)
  source.records[i]            the i-th record as TFDS returns it (random access, picklable;
                               a damaged shard file is named, see ``readable_records``)
  source.to_sample(record)     the record as a Sample;  source[i] == to_sample(records[i])

A Grain pipeline reads ``grain.MapDataset.source(source.records).map(source.to_sample)``.
Options are the fields of the dataset's config (``option_names("few_shot")`` lists them); reading
needs the same options that built the data, as they decide its directory (see ``builder_base``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mllm_jax.data.builders import (
    easy_vqa,
    easy_vqa_captions,
    easy_vqa_grid,
    interleaved,
    llava_json,
)
from mllm_jax.data.builders.builder_base import OfflineBuilder
from mllm_jax.data.builders.easy_vqa_interleaved import EasyVqaFewShot, EasyVqaMultiImage
from mllm_jax.data.builders.readable_records import ReadableRecords, check_shards
from mllm_jax.data.sample import Sample

FILE_FORMAT = "array_record"


def _default_base_name(options: dict[str, Any]) -> str:
    del options
    return "default"


def _llava_base_name(options: dict[str, Any]) -> str:
    if options.get("llava_json"):
        return llava_json.config_base_name(options["llava_json"])
    return "default"


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A dataset's builder class, its record → Sample conversion, and its configs' base name."""

    builder_class: type[OfflineBuilder]
    to_sample: Callable[[dict], Sample]
    base_name: Callable[[dict[str, Any]], str] = _default_base_name


DATASETS: dict[str, DatasetEntry] = {
    "easy_vqa": DatasetEntry(easy_vqa.EasyVqa, easy_vqa.to_sample),
    "easy_vqa_captions": DatasetEntry(
        easy_vqa_captions.EasyVqaCaptions, easy_vqa_captions.to_sample
    ),
    "easy_vqa_grid": DatasetEntry(easy_vqa_grid.EasyVqaGrid, easy_vqa.to_sample),
    "multi_image": DatasetEntry(EasyVqaMultiImage, interleaved.to_sample),
    "few_shot": DatasetEntry(EasyVqaFewShot, interleaved.to_sample),
    "llava_json": DatasetEntry(llava_json.LlavaJson, llava_json.to_sample, _llava_base_name),
}


@dataclasses.dataclass(frozen=True)
class SampleSource:
    """Random access to one prepared split: its records and the function making them Samples."""

    records: Sequence[dict]
    to_sample: Callable[[dict], Sample]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.to_sample(self.records[index])


def _entry(dataset_name: str) -> DatasetEntry:
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_name!r}; known: {sorted(DATASETS)}")
    return DATASETS[dataset_name]


def option_names(dataset_name: str) -> tuple[str, ...]:
    """The keyword options ``dataset_name`` accepts."""
    return _entry(dataset_name).builder_class.CONFIG_CLASS.option_names()


def make_builder(dataset_name: str, data_dir: str, **options: Any) -> OfflineBuilder:
    """The TFDS builder of ``dataset_name`` configured by ``options``, rooted at ``data_dir``."""
    entry = _entry(dataset_name)
    config = entry.builder_class.CONFIG_CLASS.from_options(entry.base_name(options), **options)
    return entry.builder_class(data_dir=data_dir, config=config, file_format=FILE_FORMAT)


def prepare(dataset_name: str, data_dir: str, **options: Any) -> dict[str, int]:
    """Builds ``dataset_name`` into ``data_dir`` (reusing an existing build); split → records."""
    builder = make_builder(dataset_name, data_dir, **options)
    builder.download_and_prepare()
    return {split: info.num_examples for split, info in builder.info.splits.items()}


def skipped_counts(builder: OfflineBuilder) -> dict[str, dict[str, int]]:
    """Of a prepared builder: split → {reason: records skipped}; {} for builders that never skip."""
    metadata = builder.info.metadata
    return dict(metadata.get("skipped", {})) if metadata is not None else {}


def duplicate_id_counts(builder: OfflineBuilder) -> dict[str, int]:
    """Of a prepared builder: split -> records reusing an id already taken; {} for builders
    that do not count them."""
    metadata = builder.info.metadata
    return dict(metadata.get("duplicate_ids", {})) if metadata is not None else {}


def load_samples(dataset_name: str, data_dir: str, split: str, **options: Any) -> SampleSource:
    """The prepared ``split`` of ``dataset_name`` as a random-access SampleSource.

    Raises:
      FileNotFoundError: the dataset is not prepared with these options.
      UnreadableShardError: a shard file is missing, truncated or (when read) damaged.
    """
    builder = make_builder(dataset_name, data_dir, **options)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{dataset_name} with options {options} is not prepared in {data_dir} "
            f"(looked in {builder.data_dir}); run mllm-prepare-data --dataset {dataset_name}"
        )
    check_shards(builder, split)
    return SampleSource(
        records=ReadableRecords(builder, split), to_sample=_entry(dataset_name).to_sample
    )


def train_texts(dataset_names: Sequence[str], data_dir: str) -> Iterator[str]:
    """One text per train sample of each prepared dataset: its turns joined by spaces, led by a
    space (the tokenizer's training corpus).

    The leading space makes words start with the word-boundary mark, as they do when the
    templates encode a turn after a separator (so " yes" is one piece, not "y" "es").
    """
    for name in dataset_names:
        source = load_samples(name, data_dir, "train")
        for index in range(len(source)):
            yield " " + " ".join(turn.text for turn in source[index].turns)
