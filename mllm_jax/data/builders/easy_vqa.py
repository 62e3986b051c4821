"""TFDS builder for easy-VQA's (image, question, answer) triples, and their conversion to Samples.

One record per question of the installed ``easy_vqa`` package (38,575 train / 9,673 test), in the
package's order. Images are stored as the package's PNG file bytes; decoding happens in the input
pipeline. The package (the ``demo`` extra) is imported on first use, not with this module.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mllm_jax.data.builders import easy_vqa_questions as questions_lib
from mllm_jax.data.builders.builder_base import OfflineBuilder
from mllm_jax.data.sample import IMAGE_PLACEHOLDER, BadRecordError, Sample, Turn

SPLITS = ("train", "test")


@functools.cache
def answers() -> tuple[str, ...]:
    """The answer classes in the easy_vqa package's order: class label i is ``answers()[i]``."""
    return tuple(questions_lib.easy_vqa_package().get_answers())


def __getattr__(name: str):
    # ``ANSWERS`` = answers(), read on first use so that importing the module needs no easy_vqa.
    if name == "ANSWERS":
        return answers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def read_image(path: str) -> bytes:
    """The bytes of an image file (cached: easy-VQA has 22 MB of images, each used many times)."""
    return pathlib.Path(path).read_bytes()


def image_bytes(split: questions_lib.EasyVqaSplit, image_id: int, record_id: str) -> bytes:
    """The PNG bytes of ``image_id``; BadRecordError if the package lacks the image."""
    if image_id not in split.image_paths:
        raise BadRecordError(record_id, "image_id", f"no image file for image id {image_id}")
    return read_image(split.image_paths[image_id])


class EasyVqa(OfflineBuilder):
    """easy-VQA: 64x64 images of one coloured shape with questions about them."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Questions, answers and PNG bytes of the easy_vqa package."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "question": tfds.features.Text(),
                    "answer": tfds.features.ClassLabel(names=answers()),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "question_type": tfds.features.ClassLabel(names=questions_lib.QUESTION_TYPES),
                }
            ),
            disable_shuffling=True,
            homepage="https://github.com/vzhou842/easy-VQA",
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # the data comes with the installed package
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        data = questions_lib.load_split(split)
        for index in range(self.builder_config.cap(len(data.questions))):
            record_id = f"easy_vqa/{split}/{index}"
            question, answer = data.questions[index], data.answers[index]
            try:
                question_type = questions_lib.question_type(question)
            except questions_lib.UnknownQuestionError as e:
                raise BadRecordError(record_id, "question", str(e)) from None
            yield (
                index,
                {
                    "id": record_id,
                    "image": image_bytes(data, data.image_ids[index], record_id),
                    "question": question,
                    "answer": answer,
                    "image_id": data.image_ids[index],
                    "question_type": question_type,
                },
            )


def to_sample(record: dict) -> Sample:
    """The question as a user turn after the image, the answer as the assistant turn."""
    return Sample(
        id=record["id"].decode(),
        turns=(
            Turn(role="user", text=f"{IMAGE_PLACEHOLDER}\n{record['question'].decode()}"),
            Turn(role="assistant", text=answers()[int(record["answer"])]),
        ),
        images=(bytes(record["image"]),),
    )
