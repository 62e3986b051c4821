"""An independent reference for easy-VQA labels, written without the builders' question grammar.

``oracle_answer`` answers any easy-VQA question about an image of a given shape and colour by
looking at words only; ``consistent_labels`` finds, by brute force over all 24 (shape, colour)
pairs, the pairs that answer every question of an image exactly as the package does.
"""

import collections
import functools
import itertools

import easy_vqa

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


@functools.cache
def oracle_answer(question: str, shape: str, color: str) -> str | None:
    """The answer for a ``color`` ``shape`` image; None if the question presupposes otherwise."""
    words = question.rstrip("?").split()
    named = [w for w in words if w in SHAPES + COLORS]
    if words[0] == "what":
        if any(w not in (shape, color) for w in named):
            return None
        return color if "color" in words else shape
    assert len(named) == 1, question
    holds = named[0] in (shape, color)
    negated = "not" in words or "no" in words
    return "yes" if holds != negated else "no"


@functools.cache
def package_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """(questions, answers, image ids, image id → png path) straight from the easy_vqa package."""
    if split == "train":
        return (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    return (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())


@functools.cache
def consistent_labels(split: str) -> dict[int, set[tuple[str, str]]]:
    """Image id → the (shape, colour) pairs under which every answer of the image is right."""
    questions, answers, image_ids, image_paths = package_split(split)
    pairs = collections.defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        pairs[image_id].append((question, answer))
    return {
        image_id: {
            (shape, color)
            for shape, color in itertools.product(SHAPES, COLORS)
            if all(oracle_answer(q, shape, color) == a for q, a in pairs[image_id])
        }
        for image_id in image_paths
    }
