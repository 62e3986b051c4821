"""easy-VQA grids: fine-detail VQA whose answers depend on where in the image a shape is.

Each image is a 2x2 grid of four distinct captionable easy-VQA images of one split (labels from
``easy_vqa_captions.label_split``), each box-filtered down to a quadrant of an ``image_size`` x
``image_size`` image (64 by default: the recipe's input size, so a shape covers a quarter of the
pixels it has in easy-VQA). The question asks about one quadrant::

    what shape is in the top left?                    -> triangle
    what color is the shape in the bottom right?      -> teal
    is there a red shape in the top right?            -> no    (a red shape is elsewhere)
    is there a circle in the bottom left?             -> yes

Question types and positions are drawn uniformly, yes and no equally often. The colour or shape
a "no" question names is, where the grid allows, one that another quadrant shows, so the answer
needs the right quadrant and not just the whole image. Answers are easy-VQA answer classes and
records carry easy-VQA's fields (plus the four image ids and the position asked about), so
``easy_vqa.to_sample`` and ``evaluate_vqa.easy_vqa_examples`` read them as they read easy-VQA.
Grids are a deterministic function of (seed, split); test grids use test images only.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mllm_jax.data.builders import easy_vqa_questions as questions_lib
from mllm_jax.data.builders.builder_base import OfflineBuilder
from mllm_jax.data.builders.easy_vqa import SPLITS, answers, image_bytes
from mllm_jax.data.builders.easy_vqa_captions import ImageLabels, label_split
from mllm_jax.data.builders.easy_vqa_interleaved import ATTRIBUTES, InterleavedConfig

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
"""Quadrants in row-major order: ``image_ids[k]`` of a record is shown at ``POSITIONS[k]``."""

# Keeps the grids' draws independent of the multi-image documents' drawn with the same seed.
_STREAM = 1


@dataclasses.dataclass(eq=False)
class GridConfig(InterleavedConfig):
    """Grids per split, their seed, and the side of the composed image (even, in pixels)."""

    image_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.image_size < 2 or self.image_size % 2:
            raise ValueError(f"image_size must be an even number >= 2, got {self.image_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridQuestion:
    """A question about the quadrant ``POSITIONS[position]`` and its answer."""

    position: int
    question: str
    answer: str
    question_type: str


def _phrase(attribute: str, value: str) -> str:
    return value if attribute == "shape" else f"{value} shape"


def draw_question(rng: np.random.Generator, labels: Sequence[ImageLabels]) -> GridQuestion:
    """A random question about one of the four quadrants whose labels are ``labels``."""
    position = int(rng.integers(len(POSITIONS)))
    question_type = questions_lib.QUESTION_TYPES[
        int(rng.integers(len(questions_lib.QUESTION_TYPES)))
    ]
    target, where = labels[position], POSITIONS[position]
    if question_type == "shape":
        question, answer = f"what shape is in the {where}?", target.shape
    elif question_type == "color":
        question, answer = f"what color is the shape in the {where}?", target.color
    else:
        attribute = tuple(ATTRIBUTES)[int(rng.integers(2))]
        own = getattr(target, attribute)
        if rng.random() < 0.5:
            value, answer = own, questions_lib.YES
        else:
            others = {getattr(label, attribute) for k, label in enumerate(labels) if k != position}
            elsewhere = [v for v in ATTRIBUTES[attribute] if v in others and v != own]
            candidates = elsewhere or [v for v in ATTRIBUTES[attribute] if v != own]
            value, answer = str(rng.choice(candidates)), questions_lib.NO
        question = f"is there a {_phrase(attribute, value)} in the {where}?"
    return GridQuestion(
        position=position, question=question, answer=answer, question_type=question_type
    )


@functools.cache
def quadrant_pixels(split: str, image_id: int, size: int) -> np.ndarray:
    """easy-VQA image ``image_id`` of ``split`` as RGB uint8 [size, size, 3], box-filtered:
    each pixel is the mean of the source pixels it covers."""
    encoded = image_bytes(questions_lib.load_split(split), image_id, f"easy_vqa/{split}/{image_id}")
    with Image.open(io.BytesIO(encoded)) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX))


def compose_grid(quadrants: Sequence[np.ndarray]) -> np.ndarray:
    """Four [q, q, 3] images in ``POSITIONS`` order as one [2q, 2q, 3] image."""
    top = np.concatenate(quadrants[:2], axis=1)
    bottom = np.concatenate(quadrants[2:], axis=1)
    return np.concatenate([top, bottom], axis=0)


def encode_png(pixels: np.ndarray) -> bytes:
    """[H, W, 3] uint8 pixels as PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class EasyVqaGrid(OfflineBuilder):
    """Questions about one quadrant of a 2x2 grid of easy-VQA images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "shape/color/yes-no questions about one quadrant of a 2x2 grid."}
    CONFIG_CLASS = GridConfig

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
                    "question_type": tfds.features.ClassLabel(names=questions_lib.QUESTION_TYPES),
                    "image_ids": tfds.features.Tensor(shape=(len(POSITIONS),), dtype=np.int64),
                    "position": tfds.features.ClassLabel(names=POSITIONS),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # grids are composed from the installed package's images
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        labels = label_split(split).labels
        ids = np.array(sorted(labels))
        rng = np.random.default_rng([config.seed, SPLITS.index(split), _STREAM])
        quadrant = config.image_size // 2
        for index in range(config.size(split)):
            image_ids = [int(i) for i in rng.choice(ids, size=len(POSITIONS), replace=False)]
            drawn = draw_question(rng, [labels[i] for i in image_ids])
            pixels = compose_grid([quadrant_pixels(split, i, quadrant) for i in image_ids])
            yield (
                index,
                {
                    "id": f"easy_vqa_grid/{split}/{index}",
                    "image": encode_png(pixels),
                    "question": drawn.question,
                    "answer": drawn.answer,
                    "question_type": drawn.question_type,
                    "image_ids": np.array(image_ids, np.int64),
                    "position": POSITIONS[drawn.position],
                },
            )
