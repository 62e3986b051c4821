"""easy-VQA images with captions ("a blue rectangle") for projector alignment, built from labels.

easy-VQA ships no captions, only questions. An image's caption is read off its own answered
questions: every (question, answer) pair is turned into facts by ``easy_vqa_questions.facts``
("what is the blue shape?" -> "rectangle" says the image is blue and a rectangle; "is there not a
circle?" -> "no" says it is a circle). Only stated facts name a shape or colour; facts that rule one
out ("is there a triangle?" -> "no") are used to check consistency, never to guess by elimination.
An image whose shape or colour is not stated is skipped and counted (about 11%: 458 of 4000
train, 120 of 1000 test images); two facts that disagree are an error naming the image.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mllm_jax.data.builders import easy_vqa_questions as questions_lib
from mllm_jax.data.builders.builder_base import OfflineBuilder
from mllm_jax.data.builders.easy_vqa import SPLITS, image_bytes
from mllm_jax.data.builders.skipped_records import SkippedRecords
from mllm_jax.data.sample import IMAGE_PLACEHOLDER, BadRecordError, Sample, Turn


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageLabels:
    """The shape and colour of one easy-VQA image."""

    shape: str
    color: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitLabels:
    """Labels of a split's captionable images, and the ids (with reasons) of the others."""

    labels: dict[int, ImageLabels]
    uncaptioned: dict[int, str]


def label_image(record_id: str, qa_pairs: list[tuple[str, str]]) -> ImageLabels | str:
    """The image's labels from its (question, answer) pairs, or why they are not determined.

    Returns a reason string ("shape not stated", ...) when the shape or colour is not stated.
    Raises BadRecordError naming ``record_id`` and the attribute when two facts disagree.
    """
    stated: dict[str, set[str]] = {"shape": set(), "color": set()}
    ruled_out: dict[str, set[str]] = {"shape": set(), "color": set()}
    for question, answer in qa_pairs:
        try:
            pair_facts = questions_lib.facts(question, answer)
        except ValueError as e:
            raise BadRecordError(record_id, "question", str(e)) from None
        for fact in pair_facts:
            (stated if fact.present else ruled_out)[fact.attribute].add(fact.value)
    for attribute in ("shape", "color"):
        if len(stated[attribute]) > 1 or stated[attribute] & ruled_out[attribute]:
            raise BadRecordError(
                record_id,
                attribute,
                f"contradictory labels: stated {sorted(stated[attribute])}, "
                f"ruled out {sorted(ruled_out[attribute])}",
            )
    missing = [attribute for attribute in ("shape", "color") if not stated[attribute]]
    if missing:
        return " and ".join(missing) + " not stated"
    return ImageLabels(shape=stated["shape"].pop(), color=stated["color"].pop())


@functools.cache
def label_split(split: str) -> SplitLabels:
    """Labels of every image of an easy-VQA split that its questions determine."""
    data = questions_lib.load_split(split)
    qa_pairs: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    for index, image_id in enumerate(data.image_ids):
        qa_pairs[image_id].append((data.questions[index], data.answers[index]))
    labels, uncaptioned = {}, {}
    for image_id in sorted(data.image_paths):
        result = label_image(f"easy_vqa/{split}/image_{image_id}", qa_pairs.get(image_id, []))
        if isinstance(result, ImageLabels):
            labels[image_id] = result
        else:
            uncaptioned[image_id] = result
    return SplitLabels(labels=labels, uncaptioned=uncaptioned)


class EasyVqaCaptions(OfflineBuilder):
    """One (image, caption) record per easy-VQA image whose shape and colour are stated."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Captions from stated shape and colour facts."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "caption": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # the data comes with the installed package
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        data = questions_lib.load_split(split)
        split_labels = label_split(split)
        skipped = SkippedRecords(self.name, split)
        kept = 0
        for image_id in sorted(data.image_paths)[: self.builder_config.cap(len(data.image_paths))]:
            record_id = f"easy_vqa_captions/{split}/{image_id}"
            if image_id in split_labels.uncaptioned:
                skipped.skip(record_id, split_labels.uncaptioned[image_id])
                continue
            kept += 1
            yield (
                image_id,
                {
                    "id": record_id,
                    "image": image_bytes(data, image_id, record_id),
                    "image_id": image_id,
                    "caption": split_labels.labels[image_id].caption,
                },
            )
        skipped.report(self.info.metadata, kept)


def to_sample(record: dict) -> Sample:
    """The image as the user turn, its caption as the assistant turn."""
    return Sample(
        id=record["id"].decode(),
        turns=(
            Turn(role="user", text=IMAGE_PLACEHOLDER),
            Turn(role="assistant", text=record["caption"].decode()),
        ),
        images=(bytes(record["image"]),),
    )
