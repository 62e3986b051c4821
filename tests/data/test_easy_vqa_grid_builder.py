"""easy-VQA grids: answers follow from the asked quadrant's labels, balance, pixels, determinism."""

import collections
import io
import re

import numpy as np
import pytest
from easy_vqa_oracle import COLORS, SHAPES, consistent_labels, package_split
from PIL import Image

from mllm_jax.data import builders
from mllm_jax.data.builders.easy_vqa import ANSWERS
from mllm_jax.data.sample import validate_sample
from mllm_jax.train.evaluate_vqa import easy_vqa_examples

SIZES = {"train_size": 150, "test_size": 600}
WHERE = r"in the (top|bottom) (left|right)\?"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def records(data_dir: str, split: str, **options) -> list[dict]:
    builders.prepare("easy_vqa_grid", data_dir, **options)
    source = builders.load_samples("easy_vqa_grid", data_dir, split, **options)
    return [source.records[i] for i in range(len(source))]


def read_question(question: str) -> tuple[str, int, str | None]:
    """(question type, quadrant index in row-major order, the word a yes/no question names)."""
    for pattern, question_type in (
        (rf"what shape is {WHERE}", "shape"),
        (rf"what color is the shape {WHERE}", "color"),
        (rf"is there a (\w+)(?: shape)? {WHERE}", "yes_no"),
    ):
        if match := re.fullmatch(pattern, question):
            *word, row, column = match.groups()
            return question_type, 2 * (row == "bottom") + (column == "right"), (word or [None])[0]
    raise AssertionError(f"unexpected question {question!r}")


def grid_labels(record: dict, split: str) -> list[tuple[str, str]]:
    """The (shape, colour) of each quadrant's source image, by brute force over the package."""
    labels = consistent_labels(split)
    image_ids = [int(i) for i in record["image_ids"]]
    assert len(set(image_ids)) == 4 and set(image_ids) <= set(package_split(split)[3])
    for image_id in image_ids:
        assert len(labels[image_id]) == 1, f"image {image_id} has no determined label"
    return [next(iter(labels[i])) for i in image_ids]


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_follow_from_the_labels_of_the_quadrant_asked_about(data_dir, split):
    built = records(data_dir, split, **SIZES)
    assert len(built) == SIZES[f"{split}_size"]
    elsewhere_possible = elsewhere_named = 0
    for record in built:
        question = record["question"].decode()
        question_type, position, word = read_question(question)
        quadrants = grid_labels(record, split)
        shape, color = quadrants[position]
        assert int(record["position"]) == position
        if question_type == "shape":
            expected = shape
        elif question_type == "color":
            expected = color
        else:
            assert word in SHAPES + COLORS and (word in SHAPES) == ("shape" not in question)
            expected = "yes" if word in (shape, color) else "no"
            own = shape if word in SHAPES else color
            others = {v for k, pair in enumerate(quadrants) if k != position for v in pair} - {own}
            if expected == "no" and others & set(SHAPES if word in SHAPES else COLORS):
                elsewhere_possible += 1
                elsewhere_named += word in others
        assert ANSWERS[record["answer"]] == expected, (record["id"], question, quadrants)
        assert ("shape", "color", "yes_no")[record["question_type"]] == question_type
    # A "no" question names what another quadrant shows whenever the grid allows it.
    assert elsewhere_named == elsewhere_possible > 0

    examples = easy_vqa_examples(built, ANSWERS)
    assert [(e.question, e.answer) for e in examples] == [
        (r["question"].decode(), ANSWERS[r["answer"]]) for r in built
    ]
    source = builders.load_samples("easy_vqa_grid", data_dir, split, **SIZES)
    sample = source[0]
    validate_sample(sample)
    assert sample.turns[0].text == "<image>\n" + built[0]["question"].decode()
    assert sample.images == (built[0]["image"],)


def test_yes_no_answers_are_balanced_and_types_and_positions_all_occur(data_dir):
    built = records(data_dir, "test", **SIZES)
    kinds = collections.Counter(read_question(r["question"].decode())[:2] for r in built)
    assert len(kinds) == 12 and min(kinds.values()) >= 0.5 * len(built) / 12, kinds
    yes_no = [ANSWERS[r["answer"]] for r in built if r["question"].startswith(b"is there")]
    assert len(yes_no) > 150 and 0.42 <= yes_no.count("yes") / len(yes_no) <= 0.58
    named = collections.Counter(
        "shape" if read_question(r["question"].decode())[2] in SHAPES else "color"
        for r in built
        if r["question"].startswith(b"is there")
    )
    assert 0.4 <= named["shape"] / len(yes_no) <= 0.6


def _source_pixels(split: str, image_id: int) -> np.ndarray:
    path = package_split(split)[3][image_id]
    return np.asarray(Image.open(path).convert("RGB"), np.float64)


@pytest.mark.parametrize("image_size", [64, 128])
def test_each_quadrant_holds_its_source_image_downscaled(data_dir, image_size):
    options = {"train_size": 2, "test_size": 12, "image_size": image_size}
    for record in records(data_dir, "test", **options):
        grid = np.asarray(Image.open(io.BytesIO(record["image"])), np.float64)
        assert grid.shape == (image_size, image_size, 3)
        half = image_size // 2
        for k, image_id in enumerate(record["image_ids"]):
            row, column = divmod(k, 2)
            quadrant = grid[row * half : (row + 1) * half, column * half : (column + 1) * half]
            source = _source_pixels("test", int(image_id))
            factor = source.shape[0] // half
            # The mean of each factor x factor block of the 64x64 source (box filter).
            expected = source.reshape(half, factor, half, factor, 3).mean(axis=(1, 3))
            assert np.abs(quadrant - expected).max() <= 1.0, (record["id"], k)


def test_grids_are_deterministic_given_the_seed_and_split(tmp_path):
    options = {"train_size": 20, "test_size": 20}
    first = records(str(tmp_path / "a"), "train", seed=3, **options)
    again = records(str(tmp_path / "b"), "train", seed=3, **options)
    other = records(str(tmp_path / "a"), "train", seed=4, **options)
    test = records(str(tmp_path / "a"), "test", seed=3, **options)
    test_again = records(str(tmp_path / "b"), "test", seed=3, **options)

    def content(built):
        return [(r["image"], r["question"], int(r["answer"]), tuple(r["image_ids"])) for r in built]

    assert content(first) == content(again)
    assert content(first) != content(other)
    assert content(test) == content(test_again) != content(first)


def test_an_odd_image_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size must be an even number"):
        builders.make_builder("easy_vqa_grid", str(tmp_path), image_size=63)
