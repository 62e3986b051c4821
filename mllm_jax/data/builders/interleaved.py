"""Interleaved image-text documents (MMC4/OBELICS style): the record format and its Samples.

A document is a sequence of segments, each a text or an image, with a per-segment flag saying
whether its text is trained on. Records hold parallel sequences (one entry per segment):

  segment_kinds       "text" | "image"
  segment_texts       the text ("" for an image)
  segment_images      the encoded image file ("" for a text)
  segment_supervised  whether the text is a training target (False for images)
  image_ids           the source dataset's ids of the document's images, in order (provenance)

``InterleavedBuilder`` writes such records from documents a subclass generates
(``easy_vqa_interleaved.py``); ``to_sample`` turns one read back into a Sample.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mllm_jax.data.builders.builder_base import OfflineBuilder
from mllm_jax.data.sample import IMAGE_PLACEHOLDER, Sample, Turn

TEXT, IMAGE = "text", "image"


@dataclasses.dataclass
class Document:
    """A document under construction: append segments, then take its ``record``."""

    id: str
    kinds: list[str] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)
    images: list[bytes] = dataclasses.field(default_factory=list)
    supervised: list[bool] = dataclasses.field(default_factory=list)
    image_ids: list[int] = dataclasses.field(default_factory=list)

    def add_image(self, image: bytes, image_id: int) -> None:
        self._add(IMAGE, "", image, False)
        self.image_ids.append(image_id)

    def add_text(self, text: str, *, supervised: bool) -> None:
        self._add(TEXT, text, b"", supervised)

    def _add(self, kind: str, text: str, image: bytes, supervised: bool) -> None:
        self.kinds.append(kind)
        self.texts.append(text)
        self.images.append(image)
        self.supervised.append(supervised)

    @property
    def record(self) -> dict:
        return {
            "id": self.id,
            "segment_kinds": self.kinds,
            "segment_texts": self.texts,
            "segment_images": self.images,
            "segment_supervised": self.supervised,
            "image_ids": self.image_ids,
        }


def interleaved_features() -> tfds.features.FeaturesDict:
    """The TFDS features of an interleaved-document record."""
    encoded = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "segment_kinds": tfds.features.Sequence(tfds.features.Text()),
            "segment_texts": tfds.features.Sequence(tfds.features.Text()),
            "segment_images": tfds.features.Sequence(encoded),
            "segment_supervised": tfds.features.Sequence(tfds.features.Scalar(dtype=np.bool_)),
            "image_ids": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
        }
    )


class InterleavedBuilder(OfflineBuilder):
    """A builder of interleaved documents; subclasses say which splits and generate documents."""

    SPLITS: tuple[str, ...] = ("train", "test")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__class__.__doc__,
            features=interleaved_features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # documents are generated from installed data
        return {split: self._generate_examples(split) for split in self.SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        for index, document in enumerate(self.documents(split)):
            yield index, document.record

    @abc.abstractmethod
    def documents(self, split: str) -> Iterator[Document]:
        """The documents of ``split``, deterministically, as many as the config asks for."""


def to_sample(record: dict) -> Sample:
    """One ``text`` turn per run of text segments with equal supervision, one per image.

    Each image becomes an unsupervised ``<image>`` turn, so images keep their order and the
    Sample's images line up with its placeholders.
    """
    turns: list[Turn] = []
    images: list[bytes] = []
    last_kind = None
    for kind, text, image, supervised in zip(
        record["segment_kinds"],
        record["segment_texts"],
        record["segment_images"],
        record["segment_supervised"],
        strict=True,
    ):
        kind, supervised = kind.decode(), bool(supervised)
        if kind == IMAGE:
            turns.append(Turn(role="text", text=IMAGE_PLACEHOLDER, supervised=False))
            images.append(bytes(image))
        elif kind == TEXT:
            if last_kind == TEXT and turns[-1].supervised == supervised:
                merged = turns[-1].text + text.decode()
                turns[-1] = Turn(role="text", text=merged, supervised=supervised)
            else:
                turns.append(Turn(role="text", text=text.decode(), supervised=supervised))
        else:
            raise ValueError(f"record {record['id']!r}: unknown segment kind {kind!r}")
        last_kind = kind
    return Sample(id=record["id"].decode(), turns=tuple(turns), images=tuple(images))
