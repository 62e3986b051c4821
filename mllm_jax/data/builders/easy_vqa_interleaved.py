"""Interleaved documents made from easy-VQA alone: multi-image questions and few-shot prompts.

``EasyVqaMultiImage`` documents show 2-3 images and ask a question that needs more than one of
them, answered from the images' labels (``easy_vqa_captions.label_split``; only captionable images
are used)::

    <image><image>\\nQuestion: Do the two images show the same shape?\\nAnswer:| yes
    <image><image><image>\\nQuestion: Which image shows a red shape?\\nAnswer:| second
    <image><image><image>\\nQuestion: How many of the images show a circle?\\nAnswer:| two

``EasyVqaFewShot`` documents are ``num_shots`` solved easy-VQA questions of one question type
(each on its own image) followed by a query of the same type::

    <image>\\nQuestion: what shape is present?\\nAnswer:| circle\\n  (x num_shots)
    <image>\\nQuestion: what is the red shape?\\nAnswer:| triangle

Only the text after ``|`` is supervised: the query's answer, and the demonstrations' answers when
``supervise_demonstrations`` is set. Documents are a deterministic function of (seed, split).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from mllm_jax.data.builders import easy_vqa_questions as questions_lib
from mllm_jax.data.builders.builder_base import OptionsConfig
from mllm_jax.data.builders.easy_vqa import image_bytes
from mllm_jax.data.builders.easy_vqa_captions import ImageLabels, label_split
from mllm_jax.data.builders.interleaved import Document, InterleavedBuilder

ORDINALS = ("first", "second", "third")
NUMBER_WORDS = ("zero", "one", "two", "three")
ATTRIBUTES = {"shape": questions_lib.SHAPES, "color": questions_lib.COLORS}


@dataclasses.dataclass(eq=False)
class InterleavedConfig(OptionsConfig):
    """How many documents each split gets, and the seed they are drawn with."""

    seed: int = 0
    train_size: int = 20_000
    test_size: int = 2_000

    def size(self, split: str) -> int:
        return self.cap({"train": self.train_size, "test": self.test_size}[split])


@dataclasses.dataclass(eq=False)
class FewShotConfig(InterleavedConfig):
    """``num_shots`` demonstrations before the query; whether their answers are trained on."""

    num_shots: int = 3
    supervise_demonstrations: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_shots < 0:
            raise ValueError(f"num_shots must be >= 0, got {self.num_shots}")


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The generator a split's documents are drawn with."""
    return np.random.default_rng([seed, ("train", "test").index(split)])


def question_segment(question: str) -> str:
    return f"\nQuestion: {question}\nAnswer:"


class ImagePool:
    """A split's captionable images, indexed by which shape/colour they have and lack."""

    def __init__(self, labels: dict[int, ImageLabels]):
        self.labels = labels
        self.ids = np.array(sorted(labels))
        self._having = {
            (attribute, value, has): np.array(
                [i for i in self.ids if (getattr(labels[i], attribute) == value) == has]
            )
            for attribute, values in ATTRIBUTES.items()
            for value in values
            for has in (True, False)
        }

    def values(self, attribute: str) -> list[str]:
        """The values of ``attribute`` that some image has."""
        return [v for v in ATTRIBUTES[attribute] if len(self._having[(attribute, v, True)])]

    def draw(
        self,
        rng: np.random.Generator,
        exclude: list[int],
        attribute: str | None = None,
        value: str | None = None,
        has: bool = True,
    ) -> int:
        """A random image not in ``exclude``, with (``has``) or without ``attribute == value``."""
        candidates = self.ids if attribute is None else self._having[(attribute, value, has)]
        if len(candidates) <= len(exclude) and set(candidates) <= set(exclude):
            raise ValueError(f"no image left with {attribute}={value} (has={has})")
        while True:
            image_id = int(rng.choice(candidates))
            if image_id not in exclude:
                return image_id


MultiImageQuestion = tuple[list[int], str, str]  # image ids, question, answer


def _phrase(attribute: str, value: str) -> str:
    return value if attribute == "shape" else f"{value} shape"


def same_question(rng: np.random.Generator, pool: ImagePool, attribute: str) -> MultiImageQuestion:
    """Two images; do they share ``attribute``? Half the answers are yes."""
    first = pool.draw(rng, [])
    same = bool(rng.random() < 0.5)
    value = getattr(pool.labels[first], attribute)
    second = pool.draw(rng, [first], attribute, value, has=same)
    return [first, second], f"Do the two images show the same {attribute}?", "yes" if same else "no"


def which_question(rng: np.random.Generator, pool: ImagePool, attribute: str) -> MultiImageQuestion:
    """2-3 images, exactly one with a given shape/colour; which one is it?"""
    count = int(rng.integers(2, 4))
    value = str(rng.choice(pool.values(attribute)))
    target = int(rng.integers(count))
    ids: list[int] = []
    for position in range(count):
        ids.append(pool.draw(rng, ids, attribute, value, has=position == target))
    return ids, f"Which image shows a {_phrase(attribute, value)}?", ORDINALS[target]


def count_question(rng: np.random.Generator, pool: ImagePool, attribute: str) -> MultiImageQuestion:
    """2-3 images; how many have a given shape/colour? Every count is equally likely."""
    count = int(rng.integers(2, 4))
    value = str(rng.choice(pool.values(attribute)))
    matching = int(rng.integers(count + 1))
    ids: list[int] = []
    for has in rng.permutation([True] * matching + [False] * (count - matching)):
        ids.append(pool.draw(rng, ids, attribute, value, has=bool(has)))
    return (
        ids,
        f"How many of the images show a {_phrase(attribute, value)}?",
        NUMBER_WORDS[matching],
    )


QUESTION_KINDS: tuple[Callable[[np.random.Generator, ImagePool], MultiImageQuestion], ...] = tuple(
    functools.partial(kind, attribute=attribute)
    for kind in (same_question, which_question, count_question)
    for attribute in ATTRIBUTES
)


class EasyVqaMultiImage(InterleavedBuilder):
    """Questions about 2-3 easy-VQA images that need more than one image to answer."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "same/which/how-many questions over 2-3 captionable images."}
    CONFIG_CLASS = InterleavedConfig

    def documents(self, split: str) -> Iterator[Document]:
        config = self.builder_config
        data = questions_lib.load_split(split)
        pool = ImagePool(label_split(split).labels)
        rng = split_rng(config.seed, split)
        for index in range(config.size(split)):
            kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
            image_ids, question, answer = kind(rng, pool)
            document = Document(id=f"multi_image/{split}/{index}")
            for image_id in image_ids:
                document.add_image(image_bytes(data, image_id, document.id), image_id)
            document.add_text(question_segment(question), supervised=False)
            document.add_text(f" {answer}", supervised=True)
            yield document


class EasyVqaFewShot(InterleavedBuilder):
    """Few-shot prompts: solved easy-VQA examples of one question type, then a query."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "num_shots same-type demonstrations on distinct images + a query."}
    CONFIG_CLASS = FewShotConfig

    def documents(self, split: str) -> Iterator[Document]:
        config = self.builder_config
        data = questions_lib.load_split(split)
        types = np.array([questions_lib.question_type(q) for q in data.questions])
        of_type = {t: np.flatnonzero(types == t) for t in questions_lib.QUESTION_TYPES}
        rng = split_rng(config.seed, split)
        for index in range(config.size(split)):
            query = int(rng.integers(len(data.questions)))
            chosen, images = [], {data.image_ids[query]}
            while len(chosen) < config.num_shots:
                candidate = int(rng.choice(of_type[types[query]]))
                if data.image_ids[candidate] not in images:
                    chosen.append(candidate)
                    images.add(data.image_ids[candidate])
            document = Document(id=f"few_shot/{split}/{index}")
            for position, q in enumerate([*chosen, query]):
                is_query = position == config.num_shots
                image_id = data.image_ids[q]
                document.add_image(image_bytes(data, image_id, document.id), image_id)
                document.add_text(question_segment(data.questions[q]), supervised=False)
                document.add_text(
                    f" {data.answers[q]}" + ("" if is_query else "\n"),
                    supervised=is_query or config.supervise_demonstrations,
                )
            yield document
