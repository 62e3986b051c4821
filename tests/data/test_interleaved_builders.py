"""Interleaved easy-VQA documents: multi-image answers are right, few-shot prompts as configured."""

import collections
import pathlib
import re

import pytest
from easy_vqa_oracle import COLORS, SHAPES, consistent_labels, package_split

from mllm_jax.data import builders
from mllm_jax.data.builders import interleaved
from mllm_jax.data.sample import IMAGE_PLACEHOLDER, validate_sample

ORDINALS = ["first", "second", "third"]
NUMBERS = ["zero", "one", "two", "three"]
SIZES = {"train_size": 120, "test_size": 40}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def records(dataset: str, data_dir: str, split: str, **options) -> list[dict]:
    builders.prepare(dataset, data_dir, **options)
    source = builders.load_samples(dataset, data_dir, split, **options)
    return [source.records[i] for i in range(len(source))]


def reference_answer(question: str, labels: list[tuple[str, str]]) -> str:
    """The answer to a multi-image question given each image's (shape, colour)."""
    if match := re.fullmatch(r"Do the two images show the same (shape|color)\?", question):
        index = 0 if match[1] == "shape" else 1
        assert len(labels) == 2
        return "yes" if labels[0][index] == labels[1][index] else "no"
    match = re.fullmatch(
        r"(Which image|How many of the images) shows? an? (\w+)( shape)?\?", question
    )
    assert match, question
    word = match[2]
    assert (word in SHAPES) == (match[3] is None) and word in SHAPES + COLORS
    having = [word in pair for pair in labels]
    if match[1] == "Which image":
        assert having.count(True) == 1, (question, labels)
        return ORDINALS[having.index(True)]
    return NUMBERS[sum(having)]


def segments(record: dict) -> list[tuple[str, str, bytes, bool]]:
    return list(
        zip(
            [k.decode() for k in record["segment_kinds"]],
            [t.decode() for t in record["segment_texts"]],
            [bytes(i) for i in record["segment_images"]],
            [bool(s) for s in record["segment_supervised"]],
            strict=True,
        )
    )


def check_images(record: dict, split: str) -> list[int]:
    """Asserts the image segments hold the package's files of ``image_ids``; returns the ids."""
    image_paths = package_split(split)[3]
    image_ids = [int(i) for i in record["image_ids"]]
    files = [pathlib.Path(image_paths[i]).read_bytes() for i in image_ids]
    assert [image for kind, _, image, _ in segments(record) if kind == "image"] == files
    assert len(set(image_ids)) == len(image_ids)
    return image_ids


@pytest.mark.parametrize("split", ["train", "test"])
def test_multi_image_answers_follow_from_the_images_labels(data_dir, split):
    labels = consistent_labels(split)
    kinds = collections.Counter()
    for record in records("multi_image", data_dir, split, **SIZES):
        image_ids = check_images(record, split)
        assert 2 <= len(image_ids) <= 3
        *images, (q_kind, question, _, q_sup), (a_kind, answer, _, a_sup) = segments(record)
        assert [kind for kind, *_ in images] == ["image"] * len(image_ids)
        assert (q_kind, q_sup, a_kind, a_sup) == ("text", False, "text", True)
        question = re.fullmatch(r"\nQuestion: (.*)\nAnswer:", question)[1]
        for image_id in image_ids:
            assert len(labels[image_id]) == 1, f"image {image_id} has no determined label"
        image_labels = [next(iter(labels[i])) for i in image_ids]
        assert answer == " " + reference_answer(question, image_labels), record["id"]
        about_color = any(word in question for word in (*COLORS, "color"))
        kinds[question.split()[0], "color" if about_color else "shape"] += 1
        sample = interleaved.to_sample(record)
        validate_sample(sample)
        assert [t.text for t in sample.turns][: len(image_ids)] == [IMAGE_PLACEHOLDER] * len(
            image_ids
        )
        assert [t.is_supervised for t in sample.turns] == [False] * (len(image_ids) + 1) + [True]
    assert len(kinds) == 6, kinds  # same/which/how-many questions about shapes and colours


@pytest.mark.parametrize(
    "options, shots, demos_supervised",
    [({}, 3, False), ({"num_shots": 2, "supervise_demonstrations": True}, 2, True)],
)
def test_few_shot_documents_are_solved_examples_then_a_query(
    data_dir, options, shots, demos_supervised
):
    questions, answers, image_ids, _ = package_split("test")
    solved = set(zip(questions, answers, image_ids, strict=True))
    answer_kind = {**dict.fromkeys(SHAPES, "shape"), **dict.fromkeys(COLORS, "color")}
    built = records("few_shot", data_dir, "test", **SIZES, **options)
    assert len(built) == SIZES["test_size"]
    for record in built:
        ids = check_images(record, "test")
        parts = segments(record)
        assert len(ids) == shots + 1 and len(parts) == 3 * (shots + 1)
        kinds = set()
        for shot, image_id in enumerate(ids):
            image, (_, question, _, q_sup), (_, answer, _, a_sup) = parts[3 * shot : 3 * shot + 3]
            kind = image[0]
            question = re.fullmatch(r"\nQuestion: (.*)\nAnswer:", question)[1]
            answer = answer.strip()
            assert kind == "image" and (question, answer, image_id) in solved
            assert not q_sup
            assert a_sup == (shot == shots or demos_supervised)
            kinds.add(answer_kind.get(answer, "yes_no"))
        assert len(kinds) == 1, record["id"]  # demonstrations share the query's question type
        sample = interleaved.to_sample(record)
        validate_sample(sample)
        assert sample.images == tuple(p[2] for p in parts if p[0] == "image")
        supervised = [t.text for t in sample.turns if t.is_supervised]
        assert supervised[-1] == parts[-1][1]
        assert len(supervised) == (shots + 1 if demos_supervised else 1)


def test_every_document_shows_distinct_images(tmp_path):
    for dataset in ("few_shot", "multi_image"):
        builder = builders.make_builder(dataset, str(tmp_path), test_size=1000)
        for document in builder.documents("test"):
            assert len(set(document.image_ids)) == len(document.image_ids), document.id


def test_documents_are_deterministic_given_the_seed(tmp_path):
    options = {"train_size": 30, "test_size": 5}
    first = records("multi_image", str(tmp_path / "a"), "train", seed=3, **options)
    again = records("multi_image", str(tmp_path / "b"), "train", seed=3, **options)
    other = records("multi_image", str(tmp_path / "a"), "train", seed=4, **options)
    assert [segments(r) for r in first] == [segments(r) for r in again]
    assert [segments(r) for r in first] != [segments(r) for r in other]
    shots = records("few_shot", str(tmp_path / "a"), "test", seed=3, **options)
    shots_again = records("few_shot", str(tmp_path / "b"), "test", seed=3, **options)
    assert [segments(r) for r in shots] == [segments(r) for r in shots_again]


def test_to_sample_merges_text_runs_and_keeps_image_order():
    document = interleaved.Document(id="doc")
    document.add_text("Look:", supervised=False)
    document.add_image(b"one", 1)
    document.add_text(" a ", supervised=True)
    document.add_text("circle", supervised=True)
    document.add_image(b"two", 2)
    document.add_text(" then", supervised=False)
    document.add_text(" more", supervised=True)
    record = {
        key: [v.encode() if isinstance(v, str) else v for v in value]
        for key, value in document.record.items()
        if key != "id"
    }
    sample = interleaved.to_sample({**record, "id": b"doc"})
    assert [(t.role, t.text, t.is_supervised) for t in sample.turns] == [
        ("text", "Look:", False),
        ("text", IMAGE_PLACEHOLDER, False),
        ("text", " a circle", True),
        ("text", IMAGE_PLACEHOLDER, False),
        ("text", " then", False),
        ("text", " more", True),
    ]
    assert sample.images == (b"one", b"two")
