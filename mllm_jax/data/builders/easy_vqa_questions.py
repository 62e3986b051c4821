"""easy-VQA's data and question grammar: each question's type, what its answer says of the image.

easy-VQA images hold one coloured shape. Its 48,248 questions come from 24 templates (listed in
``_TEMPLATES``, each matched in full) that either ask for the shape, ask for the colour, or ask a
yes/no question about one shape or colour word, sometimes negated ("is there not a circle?").
A question's answer, read through its template, becomes ``Fact``s about the image: the shape or
colour it has, or one it lacks. A question outside the templates is an error, never a guess.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from types import ModuleType

from mllm_jax.optional_packages import import_optional

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
QUESTION_TYPES = ("shape", "color", "yes_no")
YES, NO = "yes", "no"


class UnknownQuestionError(ValueError):
    """A question that matches none of easy-VQA's templates, or uses an unknown word."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fact:
    """The image's ``attribute`` ("shape" or "color") is ``value`` (present) or is not."""

    attribute: str
    value: str
    present: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParsedQuestion:
    """A question read through its template.

    ``question_type``: "shape" and "color" questions are answered by a shape or colour name,
    "yes_no" questions by yes/no. ``word`` is the shape or colour the question names (None when it
    names none, as in "what color is the shape?"); a shape/colour question presupposes it, a yes/no
    question asks about it. ``negated`` marks yes/no questions whose "yes" means the word is absent.
    """

    question_type: str
    word: str | None
    negated: bool = False


_W = r"(?P<word>\w+)"
_TEMPLATES: tuple[tuple[str, str, bool], ...] = (
    # (pattern, question type, negated)
    (r"what shape does the image contain\?", "shape", False),
    (r"what shape is in the image\?", "shape", False),
    (r"what shape is present\?", "shape", False),
    (rf"what is the {_W} shape\?", "shape", False),
    (rf"what color is the {_W}\?", "color", False),
    (rf"what is the color of the {_W}\?", "color", False),
    (rf"does the image contain an? {_W}(?: shape)?\?", "yes_no", False),
    (rf"is an? {_W}(?: shape)? present\?", "yes_no", False),
    (rf"is there an? {_W}(?: shape)?(?: in the image)?\?", "yes_no", False),
    (rf"does the image not contain an? {_W}(?: shape)?\?", "yes_no", True),
    (rf"is no {_W}(?: shape)? present\?", "yes_no", True),
    (rf"is there not an? {_W}(?: shape)?(?: in the image)?\?", "yes_no", True),
)
_COMPILED = tuple((re.compile(p), t, n) for p, t, n in _TEMPLATES)


def attribute_of(word: str) -> str:
    """ "shape" for a shape name, "color" for a colour name; UnknownQuestionError otherwise."""
    if word in SHAPES:
        return "shape"
    if word in COLORS:
        return "color"
    raise UnknownQuestionError(f"{word!r} is neither an easy-VQA shape nor colour")


@functools.cache
def parse_question(question: str) -> ParsedQuestion:
    """The template reading of ``question``; UnknownQuestionError naming it if none matches."""
    for pattern, question_type, negated in _COMPILED:
        match = pattern.fullmatch(question)
        if match is None:
            continue
        word = match.groupdict().get("word")
        if word == "shape" and question_type == "color":  # "what color is the shape?"
            word = None
        if word is not None:
            try:
                attribute = attribute_of(word)
            except UnknownQuestionError as e:
                raise UnknownQuestionError(f"easy-VQA question {question!r}: {e}") from None
            # A shape question may name only a colour, a colour question only a shape.
            if question_type != "yes_no" and attribute == question_type:
                raise UnknownQuestionError(f"easy-VQA question {question!r} names its own answer")
        return ParsedQuestion(question_type=question_type, word=word, negated=negated)
    raise UnknownQuestionError(f"easy-VQA question {question!r} matches no known template")


def question_type(question: str) -> str:
    """One of QUESTION_TYPES for ``question`` (see ``parse_question``)."""
    return parse_question(question).question_type


def facts(question: str, answer: str) -> tuple[Fact, ...]:
    """What the (question, answer) pair states about the image.

    Raises UnknownQuestionError for an unknown template and ValueError for an answer that does not
    fit the question (a colour answering a shape question, for example).
    """
    parsed = parse_question(question)
    if parsed.question_type == "yes_no":
        if answer not in (YES, NO):
            raise ValueError(f"yes/no question {question!r} answered {answer!r}")
        present = (answer == YES) != parsed.negated
        return (Fact(attribute=attribute_of(parsed.word), value=parsed.word, present=present),)
    if answer not in (SHAPES if parsed.question_type == "shape" else COLORS):
        raise ValueError(f"{parsed.question_type} question {question!r} answered {answer!r}")
    stated = [Fact(attribute=parsed.question_type, value=answer, present=True)]
    if parsed.word is not None:  # "what color is the circle?" presupposes a circle
        stated.append(Fact(attribute=attribute_of(parsed.word), value=parsed.word, present=True))
    return tuple(stated)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EasyVqaSplit:
    """One split of the easy_vqa package: parallel question lists and image id → PNG path."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]
    image_ids: tuple[int, ...]
    image_paths: dict[int, str]


def easy_vqa_package() -> ModuleType:
    """The installed ``easy_vqa`` package (the ``demo`` extra); ModuleNotFoundError without it."""
    return import_optional("easy_vqa", extra="demo", needed_for="the easy-VQA datasets")


@functools.cache
def load_split(split: str) -> EasyVqaSplit:
    """The "train" or "test" split of the installed easy_vqa package."""
    easy_vqa = easy_vqa_package()
    readers = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    if split not in readers:
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    get_questions, get_image_paths = readers[split]
    questions, answers, image_ids = get_questions()
    return EasyVqaSplit(
        questions=tuple(questions),
        answers=tuple(answers),
        image_ids=tuple(int(i) for i in image_ids),
        image_paths=dict(get_image_paths()),
    )
