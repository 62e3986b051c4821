"""TFDS builder for LLaVA-style conversation JSON plus an image folder: the format users bring.

The JSON file is a list of entries::

    {"id": "000001", "image": "coco/train2017/000001.jpg",   # or "images": [...], or neither
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Image paths are relative to the image folder (default: the JSON file's folder) and must stay
inside it (``allow_outside_image_folder`` lets ``..`` or absolute paths out). Each entry becomes
one record holding the image file bytes in order and the turns' roles and texts.

Every record is checked at build time with the training pipeline's rules, so a record that
training would reject is reported once, when the data is made: known roles, image files that
exist and decode in full as the pipeline decodes them (``images.decode_rgb``: a truncated file, an
image over PIL's size limit or an unsupported mode is bad), one ``<image>`` placeholder per image
and none in an answer, and something to train on (``templates.check_trainable``: no sample ending
in an unanswered question, none without a supervised turn). Given a training setup (``template``,
``tokenizer``, ``tokens_per_image`` and ``seq_len``, all four) every record is also templated as
training will template it (``templates.tokenize_sample``): a sample longer than ``seq_len`` or
with no supervised token is bad too. A bad entry raises ``BadRecordError`` naming the entry, the
field and the JSON file, or, with ``on_bad_record="skip"``, is skipped, logged once and counted by
field (``metadata["skipped"]``). A file with no usable entry is an error naming it. Entries that
share an id are kept, counted and logged (``metadata["duplicate_ids"]``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from mllm_jax.data.builders.builder_base import OfflineBuilder, OptionsConfig, unnamed
from mllm_jax.data.builders.skipped_records import SkippedRecords
from mllm_jax.data.hf_tokenizer import HFTokenizer
from mllm_jax.data.images import decode_rgb
from mllm_jax.data.sample import BadRecordError, Sample, Turn
from mllm_jax.data.templates import TEMPLATES, check_trainable, tokenize_sample
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.data.tokenizer_protocol import TextTokenizer
from mllm_jax.json_files import read_json

ROLE_OF_SPEAKER = {"human": "user", "gpt": "assistant", "system": "system"}
ON_BAD_RECORD = ("raise", "skip")
TRAINING_SETUP = ("template", "tokenizer", "tokens_per_image", "seq_len")
_LOGGED_DUPLICATES = 5


@dataclasses.dataclass(eq=False)
class LlavaJsonConfig(OptionsConfig):
    """Where the data is and what to do with a bad entry (not part of the config name), and the
    training setup records are checked against (``TRAINING_SETUP``; part of the name except
    the tokenizer's path, as in skip mode they decide which records are kept)."""

    llava_json: str | None = unnamed(None)
    image_folder: str | None = unnamed(None)
    on_bad_record: str = unnamed("raise")
    allow_outside_image_folder: bool = unnamed(False)
    template: str | None = None
    tokenizer: str | None = unnamed(None)
    tokens_per_image: int | None = None
    seq_len: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(
                f"on_bad_record must be one of {ON_BAD_RECORD}: {self.on_bad_record!r}"
            )
        given = [name for name in TRAINING_SETUP if getattr(self, name) is not None]
        if given and len(given) != len(TRAINING_SETUP):
            missing = [name for name in TRAINING_SETUP if name not in given]
            raise ValueError(
                f"checking records against a training setup needs all of {list(TRAINING_SETUP)}; "
                f"{given} given, {missing} missing"
            )
        if self.template is not None and self.template not in TEMPLATES:
            raise ValueError(f"template {self.template!r} is not one of {TEMPLATES}")
        for name in ("tokens_per_image", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def images_root(self) -> pathlib.Path:
        if self.image_folder is not None:
            return pathlib.Path(self.image_folder)
        return pathlib.Path(self.llava_json).parent


def config_base_name(llava_json: str) -> str:
    """A config name for a JSON file: its file name without extension, safe as a directory name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", pathlib.Path(llava_json).stem) or "llava"


def _image_path(
    record_id: str, field: str, root: pathlib.Path, relative: Any, allow_outside: bool
) -> pathlib.Path:
    """``root / relative``, refused (BadRecordError) if it leaves ``root`` unless allowed."""
    if not isinstance(relative, str) or not relative:
        raise BadRecordError(record_id, field, f"expected an image path, got {relative!r}")
    path = root / relative
    inside = os.path.normpath(root.absolute())
    if not allow_outside and os.path.commonpath([inside, os.path.normpath(path.absolute())]) != (
        inside
    ):
        raise BadRecordError(
            record_id,
            field,
            f"image path {relative!r} leads outside the image folder {str(root)!r}; fix the "
            "path, or allow it with allow_outside_image_folder (--allow_outside_image_folder)",
        )
    return path


def _read_image(
    record_id: str, field: str, root: pathlib.Path, relative: Any, allow_outside: bool = False
) -> bytes:
    """The bytes of the image file ``root / relative``, checked to decode as training decodes."""
    path = _image_path(record_id, field, root, relative, allow_outside)
    if not path.is_file():
        raise BadRecordError(record_id, field, f"image file {str(path)!r} not found")
    data = path.read_bytes()
    try:
        decode_rgb(data, record_id, field)
    except BadRecordError as e:
        raise BadRecordError(
            record_id, field, f"{str(path)!r} is not a readable image: {e.problem}"
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


def convert_entry(
    entry: Any,
    index: int,
    images_root: pathlib.Path,
    *,
    allow_outside: bool = False,
    check: Callable[[Sample], Any] = check_trainable,
) -> dict:
    """The record of one JSON entry (the ``index``-th); BadRecordError if it cannot be used.

    ``check`` applies the training rules to the entry's Sample (see the module docstring);
    ``allow_outside`` accepts image paths that leave ``images_root``.
    """
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
        _read_image(record_id, field, images_root, relative, allow_outside)
        for field, relative in _image_fields(record_id, entry)
    ]
    record = {"id": record_id, "images": images, "roles": roles, "texts": texts}
    check(to_sample(record))
    return record


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A sentencepiece file (the project's ``Tokenizer``) or a Hugging Face tokenizer directory."""
    return HFTokenizer.load(path) if pathlib.Path(path).is_dir() else Tokenizer.load(path)


def _tokenizes(sample: Sample, *, tokenizer: TextTokenizer, config: LlavaJsonConfig) -> None:
    tokenize_sample(
        sample,
        tokenizer,
        template=config.template,
        tokens_per_image=config.tokens_per_image,
        max_length=config.seq_len,
    )


def read_entries(path: pathlib.Path) -> list:
    """The JSON list of entries in ``path``; ValueError naming the file (and line) otherwise."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise ValueError(
            f"{path}: expected a JSON list of conversations, got a {type(entries).__name__}"
        )
    return entries


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
        path = pathlib.Path(self.builder_config.llava_json)
        # Read here, not in the generator, so that a malformed file fails before TFDS writes.
        entries = read_entries(path)
        if not entries:
            raise ValueError(f"{path}: the JSON list is empty; there is nothing to build")
        return {"train": self._generate_examples(path, entries)}

    def _generate_examples(self, path: pathlib.Path, entries: list) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        check: Callable[[Sample], Any] = check_trainable
        if config.template is not None:
            check = functools.partial(
                _tokenizes, tokenizer=load_tokenizer(config.tokenizer), config=config
            )
        skipped = SkippedRecords(self.name, "train", log_every_record=True)
        ids: collections.Counter[str] = collections.Counter()
        kept = duplicates = 0
        count = config.cap(len(entries))
        for index in range(count):
            try:
                record = convert_entry(
                    entries[index],
                    index,
                    config.images_root,
                    allow_outside=config.allow_outside_image_folder,
                    check=check,
                )
            except BadRecordError as e:
                where = f"{e.problem} (entry #{index} of {path})"
                if config.on_bad_record == "raise":
                    raise BadRecordError(e.record_id, e.field, where) from None
                skipped.skip(e.record_id, re.sub(r"\[\d+\]", "[]", e.field), where)
                continue
            ids[record["id"]] += 1
            if ids[record["id"]] > 1:
                duplicates += 1
                if duplicates <= _LOGGED_DUPLICATES:
                    logging.warning("%s: entry #%d reuses the id %r", path, index, record["id"])
            kept += 1
            yield index, record
        skipped.report(self.info.metadata, kept)
        self.info.metadata["duplicate_ids"] = {"train": duplicates}
        if duplicates:
            logging.warning(
                "%s: %d entries reuse an id already taken (%d ids used more than once); they are "
                "kept, but a record id no longer names one record",
                path,
                duplicates,
                sum(n > 1 for n in ids.values()),
            )
        if not kept:
            raise ValueError(
                f"{path}: every one of its {count} entries is bad "
                f"({dict(skipped.counts)}, each logged above); fix them before building"
            )


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
