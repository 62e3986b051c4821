"""TFDS builder for LLaVA-style conversation JSON plus an image folder: the format users bring.

The JSON file is a list of entries::

    {"id": "000001", "image": "coco/train2017/000001.jpg",   # or "images": [...], or neither
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Image paths are relative to the image folder (default: the JSON file's folder). Each entry becomes
one record holding the image file bytes in order and the turns' roles and texts. Every record is
checked at build time (known roles, image files that exist and are images, one ``<image>``
placeholder per image); a bad entry raises ``BadRecordError`` naming the entry and field, or, with
``on_bad_record="skip"``, is skipped and counted by field (``metadata["skipped"]``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from mllm_jax.data.builders.builder_base import OfflineBuilder, OptionsConfig, unnamed
from mllm_jax.data.builders.skipped_records import SkippedRecords
from mllm_jax.data.sample import BadRecordError, Sample, Turn, validate_sample

ROLE_OF_SPEAKER = {"human": "user", "gpt": "assistant", "system": "system"}
ON_BAD_RECORD = ("raise", "skip")


@dataclasses.dataclass(eq=False)
class LlavaJsonConfig(OptionsConfig):
    """Where the data is (not part of the config name) and what to do with a bad entry."""

    llava_json: str | None = unnamed(None)
    image_folder: str | None = unnamed(None)
    on_bad_record: str = unnamed("raise")

    def __post_init__(self):
        super().__post_init__()
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(
                f"on_bad_record must be one of {ON_BAD_RECORD}: {self.on_bad_record!r}"
            )

    @property
    def images_root(self) -> pathlib.Path:
        if self.image_folder is not None:
            return pathlib.Path(self.image_folder)
        return pathlib.Path(self.llava_json).parent


def config_base_name(llava_json: str) -> str:
    """A config name for a JSON file: its file name without extension, safe as a directory name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", pathlib.Path(llava_json).stem) or "llava"


def _read_image(record_id: str, field: str, root: pathlib.Path, relative: Any) -> bytes:
    """The bytes of the image file ``root / relative``, checked to be a readable image."""
    if not isinstance(relative, str) or not relative:
        raise BadRecordError(record_id, field, f"expected an image path, got {relative!r}")
    path = root / relative
    if not path.is_file():
        raise BadRecordError(record_id, field, f"image file {str(path)!r} not found")
    data = path.read_bytes()
    try:
        PIL.Image.open(io.BytesIO(data))  # reads the header only
    except (PIL.UnidentifiedImageError, OSError) as e:
        raise BadRecordError(
            record_id, field, f"{str(path)!r} is not a readable image: {e}"
        ) from None
    return data


def _image_fields(record_id: str, entry: dict) -> list[tuple[str, Any]]:
    """(field name, relative path) of each image of the entry, in order."""
    if "image" in entry and "images" in entry:
        raise BadRecordError(record_id, "image", "entry has both 'image' and 'images'")
    if "image" in entry:
        return [("image", entry["image"])]
    images = entry.get("images", [])
    if not isinstance(images, list):
        raise BadRecordError(record_id, "images", f"expected a list of paths, got {images!r}")
    return [(f"images[{k}]", path) for k, path in enumerate(images)]


def convert_entry(entry: Any, index: int, images_root: pathlib.Path) -> dict:
    """The record of one JSON entry (the ``index``-th); BadRecordError if it cannot be used."""
    if not isinstance(entry, dict):
        raise BadRecordError(f"#{index}", "entry", f"expected a JSON object, got {type(entry)}")
    if "id" not in entry:
        raise BadRecordError(f"#{index}", "id", "entry has no id")
    record_id = str(entry["id"])
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRecordError(record_id, "conversations", "expected a non-empty list of turns")
    roles, texts = [], []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_OF_SPEAKER:
            speaker = turn.get("from") if isinstance(turn, dict) else turn
            raise BadRecordError(
                record_id,
                f"conversations[{i}].from",
                f"expected one of {sorted(ROLE_OF_SPEAKER)}, got {speaker!r}",
            )
        if not isinstance(turn.get("value"), str):
            raise BadRecordError(record_id, f"conversations[{i}].value", "expected a string")
        roles.append(turn["from"])
        texts.append(turn["value"])
    images = [
        _read_image(record_id, field, images_root, relative)
        for field, relative in _image_fields(record_id, entry)
    ]
    record = {"id": record_id, "images": images, "roles": roles, "texts": texts}
    validate_sample(to_sample(record))
    return record


class LlavaJson(OfflineBuilder):
    """Conversations with any number of images, from a LLaVA-style JSON file and image folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "LLaVA conversation JSON with image file bytes."}
    CONFIG_CLASS = LlavaJsonConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "images": tfds.features.Sequence(
                        tfds.features.Tensor(shape=(), dtype=np.object_)
                    ),
                    "roles": tfds.features.Sequence(tfds.features.Text()),
                    "texts": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # the data is local
        if self.builder_config.llava_json is None:
            raise ValueError("the llava_json builder needs the path of the JSON file (llava_json)")
        return {"train": self._generate_examples(pathlib.Path(self.builder_config.llava_json))}

    def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[int, dict]]:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of conversations, got {type(entries)}")
        config = self.builder_config
        skipped = SkippedRecords(self.name, "train")
        kept = 0
        for index in range(config.cap(len(entries))):
            try:
                record = convert_entry(entries[index], index, config.images_root)
            except BadRecordError as e:
                if config.on_bad_record == "raise":
                    raise
                skipped.skip(e.record_id, re.sub(r"\[\d+\]", "[]", e.field), e.problem)
                continue
            kept += 1
            yield index, record
        skipped.report(self.info.metadata, kept)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def to_sample(record: dict) -> Sample:
    """human → user, gpt → assistant, system → system turns; images in order."""
    return Sample(
        id=_text(record["id"]),
        turns=tuple(
            Turn(role=ROLE_OF_SPEAKER[_text(role)], text=_text(text))
            for role, text in zip(record["roles"], record["texts"], strict=True)
        ),
        images=tuple(bytes(image) for image in record["images"]),
    )
