"""The canonical in-memory sample every dataset is converted to before templating.

A dataset record (easy-VQA question, LLaVA conversation, interleaved document) becomes a
``Sample``: encoded images in placeholder order plus a list of ``Turn``s. Templates
(``data/templates.py``) turn a Sample into token ids and a loss mask; nothing downstream knows
which dataset a sample came from.

Roles:
  ``system``     system prompt; never supervised.
  ``user``       a human turn; never supervised unless ``supervised=True`` is given.
  ``assistant``  a model turn; supervised unless ``supervised=False`` is given (in-context
                 demonstrations that should not be trained on, for example).
  ``text``       raw document text (interleaved documents), emitted without role markers;
                 supervised unless ``supervised=False``.

Every ``<image>`` placeholder in the turns' text refers to the next image of ``images``; the
counts must match, and no assistant turn may hold one: a model answers in text
(``validate_sample``).
"""

from __future__ import annotations

import dataclasses

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant", "text")
_DEFAULT_SUPERVISED = {"system": False, "user": False, "assistant": True, "text": True}


class BadRecordError(ValueError):
    """A record that cannot be used, with the record id and the offending field in the message."""

    def __init__(self, record_id: str, field: str, problem: str):
        self.record_id, self.field, self.problem = record_id, field, problem
        super().__init__(f"record {record_id!r}, field {field!r}: {problem}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Turn:
    role: str
    text: str
    supervised: bool | None = None  # None: the role's default (see module docstring)

    @property
    def is_supervised(self) -> bool:
        return _DEFAULT_SUPERVISED[self.role] if self.supervised is None else self.supervised


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    id: str
    turns: tuple[Turn, ...]
    images: tuple[bytes, ...] = ()  # encoded image files (PNG/JPEG), in placeholder order


def validate_sample(sample: Sample) -> None:
    """Raises BadRecordError if roles are unknown, a turn is empty, an assistant turn holds an
    ``<image>`` or image counts mismatch."""
    if not sample.turns:
        raise BadRecordError(sample.id, "turns", "the sample has no turns")
    for i, turn in enumerate(sample.turns):
        if turn.role not in ROLES:
            raise BadRecordError(sample.id, f"turns[{i}].role", f"unknown role {turn.role!r}")
        if not turn.text.strip():
            raise BadRecordError(sample.id, f"turns[{i}].text", f"empty {turn.role} turn")
        if turn.role == "assistant" and IMAGE_PLACEHOLDER in turn.text:
            raise BadRecordError(
                sample.id,
                f"turns[{i}].text",
                f"an assistant turn holds {IMAGE_PLACEHOLDER}: a model answers in text, so "
                "move the image into the user turn before it",
            )
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in sample.turns)
    if placeholders != len(sample.images):
        raise BadRecordError(
            sample.id,
            "images",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(sample.images)} images",
        )
