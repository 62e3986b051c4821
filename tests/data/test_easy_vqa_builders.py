"""easy-VQA builders: records round-trip, question types, captions consistent with all answers."""

import pathlib

import pytest
from easy_vqa_oracle import COLORS, SHAPES, consistent_labels, package_split

from mllm_jax.data import builders
from mllm_jax.data.builders import easy_vqa_captions, easy_vqa_questions
from mllm_jax.data.builders.easy_vqa import ANSWERS
from mllm_jax.data.sample import BadRecordError, Sample, Turn, validate_sample

SMALL = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def test_full_package_has_the_documented_sizes():
    sizes = {split: len(package_split(split)[0]) for split in ("train", "test")}
    images = {split: len(package_split(split)[3]) for split in ("train", "test")}
    assert sizes == {"train": 38_575, "test": 9_673}
    assert images == {"train": 4000, "test": 1000}
    assert sorted(ANSWERS) == sorted(SHAPES + COLORS + ("yes", "no"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_easy_vqa_records_round_trip_question_answer_and_png_bytes(data_dir, split):
    assert builders.prepare("easy_vqa", data_dir, max_examples=SMALL) == {
        "train": SMALL,
        "test": SMALL,
    }
    questions, answers, image_ids, image_paths = package_split(split)
    source = builders.load_samples("easy_vqa", data_dir, split, max_examples=SMALL)
    assert len(source) == SMALL
    for index in range(SMALL):
        record = source.records[index]
        png = pathlib.Path(image_paths[image_ids[index]]).read_bytes()
        assert record["question"].decode() == questions[index]
        assert ANSWERS[record["answer"]] == answers[index]
        assert int(record["image_id"]) == image_ids[index]
        assert record["image"] == png
        sample = source[index]
        validate_sample(sample)
        assert sample == Sample(
            id=f"easy_vqa/{split}/{index}",
            turns=(
                Turn(role="user", text=f"<image>\n{questions[index]}"),
                Turn(role="assistant", text=answers[index]),
            ),
            images=(png,),
        )


def test_every_package_question_gets_the_type_its_answer_has():
    expected_type = {**dict.fromkeys(SHAPES, "shape"), **dict.fromkeys(COLORS, "color")}
    expected_type.update(yes="yes_no", no="yes_no")
    counts = {}
    for split in ("train", "test"):
        questions, answers, _, _ = package_split(split)
        for question, answer in zip(questions, answers, strict=True):
            assert easy_vqa_questions.question_type(question) == expected_type[answer], question
            counts[expected_type[answer]] = counts.get(expected_type[answer], 0) + 1
    assert sum(counts.values()) == 38_575 + 9_673 and set(counts) == {"shape", "color", "yes_no"}


@pytest.mark.parametrize(
    "question", ["what size is the circle?", "is there a purple shape?", "what shape is red?"]
)
def test_unknown_question_template_is_an_error_naming_the_question(question):
    with pytest.raises(easy_vqa_questions.UnknownQuestionError, match=question.replace("?", r"\?")):
        easy_vqa_questions.question_type(question)


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_agree_with_every_answered_question_of_their_image(split):
    labelled = easy_vqa_captions.label_split(split)
    consistent = consistent_labels(split)
    assert len(labelled.labels) + len(labelled.uncaptioned) == len(consistent)
    for image_id, labels in labelled.labels.items():
        # The only (shape, colour) answering all of the image's questions as the package does.
        assert consistent[image_id] == {(labels.shape, labels.color)}, image_id
        assert labels.caption == f"a {labels.color} {labels.shape}"
    questions, answers, image_ids, _ = package_split(split)
    directly_answered = {"shape": set(), "color": set()}
    for answer, image_id in zip(answers, image_ids, strict=True):
        if answer in SHAPES + COLORS:
            directly_answered["shape" if answer in SHAPES else "color"].add(image_id)
    assert directly_answered["shape"] & directly_answered["color"] <= set(labelled.labels)
    determinable = sum(len(pairs) == 1 for pairs in consistent.values())
    print(
        f"{split}: {len(labelled.labels)} of {len(consistent)} images captioned, "
        f"{determinable} determinable by elimination as well"
    )
    assert len(labelled.labels) >= 0.85 * len(consistent)


def test_caption_builder_reports_skipped_images_and_round_trips(data_dir):
    sizes = builders.prepare("easy_vqa_captions", data_dir)
    skipped = builders.skipped_counts(builders.make_builder("easy_vqa_captions", data_dir))
    for split, images in (("train", 4000), ("test", 1000)):
        labelled = easy_vqa_captions.label_split(split)
        assert sizes[split] == len(labelled.labels)
        assert sum(skipped[split].values()) == images - sizes[split] == len(labelled.uncaptioned)
    source = builders.load_samples("easy_vqa_captions", data_dir, "test")
    image_paths = package_split("test")[3]
    for index in range(0, len(source), 97):
        record, sample = source.records[index], source[index]
        image_id = int(record["image_id"])
        labels = easy_vqa_captions.label_split("test").labels[image_id]
        assert record["caption"].decode() == labels.caption
        assert sample.images == (pathlib.Path(image_paths[image_id]).read_bytes(),)
        assert [t.role for t in sample.turns] == ["user", "assistant"]
        assert sample.turns[1].text == labels.caption
        validate_sample(sample)


@pytest.mark.parametrize(
    "pairs, attribute",
    [
        ([("what shape is present?", "circle"), ("is there a triangle?", "yes")], "shape"),
        ([("what color is the shape?", "red"), ("is there not a red shape?", "yes")], "color"),
        (
            [("what color is the circle?", "red"), ("what shape is in the image?", "triangle")],
            "shape",
        ),
    ],
)
def test_contradictory_labels_are_an_error_naming_the_image(pairs, attribute):
    with pytest.raises(BadRecordError) as raised:
        easy_vqa_captions.label_image("easy_vqa/train/image_7", pairs)
    assert raised.value.record_id == "easy_vqa/train/image_7"
    assert raised.value.field == attribute


def test_image_without_a_stated_colour_is_not_captioned():
    pairs = [("what shape is present?", "circle"), ("is there a red shape?", "no")]
    assert easy_vqa_captions.label_image("x", pairs) == "color not stated"
    pairs.append(("is there not a blue shape?", "no"))
    assert easy_vqa_captions.label_image("x", pairs) == easy_vqa_captions.ImageLabels(
        shape="circle", color="blue"
    )
