"""Small real image-text pair sets with held-out splits, for aligning frozen encoders.

  digits    scikit-learn's 1797 8x8 handwritten digits; caption "a handwritten digit seven";
            a seeded 70/30 split (1258 train / 539 test)
  easy_vqa  easy-VQA's 64x64 shape images whose shape and colour its questions state
            (``easy_vqa_captions.label_split``); caption "a blue circle"; the package's own
            train/test split (3542 / 880)

Each class has one caption, so several images share a caption (retrieval counts any of them, see
``train/retrieval.py``), and one zero-shot prompt from a *different* template ("the number
seven", "a picture of a blue circle"), so zero-shot accuracy is not the training caption again.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from mllm_jax.data.builders import easy_vqa_questions as questions_lib
from mllm_jax.data.builders.easy_vqa_captions import ImageLabels, label_split
from mllm_jax.data.sample import BadRecordError
from mllm_jax.optional_packages import import_optional

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0
PAIR_SETS = ("digits", "easy_vqa")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTextPairs:
    """Images with one caption each, by class.

    Attributes:
      name: e.g. "digits/train".
      images: uint8 [N, H, W, 3].
      labels: int32 [N], index into ``classes``.
      classes: the caption of each class [K].
      prompts: the zero-shot prompt of each class [K].
      ids: record id of each image [N] (for error messages).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    ids: tuple[str, ...]

    def __post_init__(self):
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be uint8 [N, H, W, 3], got "
                             f"{self.images.dtype} {self.images.shape}")  # fmt: skip
        if self.labels.shape != (n,) or len(self.ids) != n:
            raise ValueError(f"{self.name}: {n} images, {self.labels.shape} labels, "
                             f"{len(self.ids)} ids")  # fmt: skip
        if len(self.prompts) != len(self.classes):
            raise ValueError(f"{self.name}: {len(self.classes)} classes but "
                             f"{len(self.prompts)} prompts")  # fmt: skip
        if n and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise ValueError(f"{self.name}: labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def captions(self) -> list[str]:
        """The caption of every image [N]."""
        return [self.classes[label] for label in self.labels]


def load_digits_pairs(split: str) -> ImageTextPairs:
    """scikit-learn's digits as dark ink on white, uint8 [N, 8, 8, 3], split 70/30 (seeded)."""
    datasets = import_optional("sklearn.datasets", extra="fusemix", needed_for="the digits pairs")
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    digits = datasets.load_digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(digits.target))
    num_test = round(DIGITS_TEST_FRACTION * len(order))
    chosen = np.sort(order[:num_test] if split == "test" else order[num_test:])
    # The data is ink density 0..16; as a photo of paper, more ink is darker.
    grey = np.round(255 - digits.images[chosen] * (255 / 16)).astype(np.uint8)
    return ImageTextPairs(
        name=f"digits/{split}",
        images=np.repeat(grey[..., None], 3, axis=-1),
        labels=digits.target[chosen].astype(np.int32),
        classes=tuple(f"a handwritten digit {word}" for word in DIGIT_WORDS),
        prompts=tuple(f"the number {word}" for word in DIGIT_WORDS),
        ids=tuple(f"digits/{index}" for index in chosen),
    )


def easy_vqa_classes() -> list[ImageLabels]:
    """All 24 (colour, shape) classes, ordered by caption."""
    labels = [
        ImageLabels(shape=s, color=c) for s in questions_lib.SHAPES for c in questions_lib.COLORS
    ]
    return sorted(labels, key=lambda label: label.caption)


def load_easy_vqa_pairs(split: str) -> ImageTextPairs:
    """easy-VQA images with captions from their stated shape and colour, uint8 [N, 64, 64, 3]."""
    data = questions_lib.load_split(split)
    split_labels = label_split(split)
    classes = easy_vqa_classes()
    class_of = {label: k for k, label in enumerate(classes)}
    image_ids = sorted(split_labels.labels)
    images, ids = [], []
    for image_id in image_ids:
        record_id = f"easy_vqa/{split}/image_{image_id}"
        try:
            with open(data.image_paths[image_id], "rb") as file:
                encoded = file.read()
            with Image.open(io.BytesIO(encoded)) as image:
                images.append(np.asarray(image.convert("RGB"), np.uint8))
        except (OSError, ValueError) as err:
            raise BadRecordError(record_id, "image", f"cannot read image: {err}") from err
        ids.append(record_id)
    return ImageTextPairs(
        name=f"easy_vqa/{split}",
        images=np.stack(images),
        labels=np.array([class_of[split_labels.labels[i]] for i in image_ids], np.int32),
        classes=tuple(label.caption for label in classes),
        prompts=tuple(f"a picture of {label.caption}" for label in classes),
        ids=tuple(ids),
    )


def load_pairs(name: str, split: str) -> ImageTextPairs:
    """``name`` in ``PAIR_SETS``, ``split`` "train" or "test"."""
    if name == "digits":
        return load_digits_pairs(split)
    if name == "easy_vqa":
        return load_easy_vqa_pairs(split)
    raise ValueError(f"unknown pair set {name!r}; expected one of {PAIR_SETS}")
