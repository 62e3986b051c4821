"""llava_json builder: conversations with 0-2 images round-trip; bad entries raise or skip."""

import json
import logging
import pathlib

import PIL.Image
import pytest

from mllm_jax.data import builders
from mllm_jax.data.builders import llava_json
from mllm_jax.data.sample import BadRecordError, Sample, Turn, validate_sample

GOOD_ENTRIES = [
    {
        "id": "single",
        "image": "coco/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {
        "id": "pair",
        "images": ["b.jpg", "coco/c.png"],
        "conversations": [
            {"from": "system", "value": "Compare images."},
            {"from": "human", "value": "<image> and <image>: same colour?"},
            {"from": "gpt", "value": "No."},
        ],
    },
    {
        "id": "text_only",
        "conversations": [
            {"from": "human", "value": "Say hi."},
            {"from": "gpt", "value": "Hi."},
        ],
    },
]
MISSING_IMAGE = {
    "id": "lost",
    "images": ["b.jpg", "gone.png"],
    "conversations": [
        {"from": "human", "value": "<image><image> what?"},
        {"from": "gpt", "value": "Two."},
    ],
}
BAD_SPEAKER = {
    "id": "who",
    "conversations": [{"from": "human", "value": "Hi."}, {"from": "bot", "value": "Hello."}],
}


@pytest.fixture
def image_folder(tmp_path) -> pathlib.Path:
    folder = tmp_path / "images"
    (folder / "coco").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "coco" / "a.png")
    PIL.Image.new("RGB", (4, 4), (0, 0, 255)).save(folder / "b.jpg", quality=90)
    PIL.Image.new("RGB", (5, 7), (0, 255, 0)).save(folder / "coco" / "c.png")
    return folder


def write_json(tmp_path: pathlib.Path, entries: list, name: str = "convs.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return str(path)


def test_conversations_with_zero_one_and_two_images_round_trip(tmp_path, image_folder):
    options = {"llava_json": write_json(tmp_path, GOOD_ENTRIES), "image_folder": str(image_folder)}
    assert builders.prepare("llava_json", str(tmp_path / "tfds"), **options) == {"train": 3}
    source = builders.load_samples("llava_json", str(tmp_path / "tfds"), "train", **options)
    files = {
        name: (image_folder / name).read_bytes() for name in ("coco/a.png", "b.jpg", "coco/c.png")
    }
    expected = [
        Sample(
            id="single",
            turns=(
                Turn(role="user", text="<image>\nWhat colour is it?"),
                Turn(role="assistant", text="Red."),
                Turn(role="user", text="Sure?"),
                Turn(role="assistant", text="Yes."),
            ),
            images=(files["coco/a.png"],),
        ),
        Sample(
            id="pair",
            turns=(
                Turn(role="system", text="Compare images."),
                Turn(role="user", text="<image> and <image>: same colour?"),
                Turn(role="assistant", text="No."),
            ),
            images=(files["b.jpg"], files["coco/c.png"]),
        ),
        Sample(
            id="text_only",
            turns=(Turn(role="user", text="Say hi."), Turn(role="assistant", text="Hi.")),
        ),
    ]
    assert [source[i] for i in range(len(source))] == expected
    for sample in expected:
        validate_sample(sample)


def test_image_folder_defaults_to_the_json_folder(tmp_path, image_folder):
    path = write_json(image_folder, GOOD_ENTRIES[:1])
    assert builders.prepare("llava_json", str(tmp_path / "tfds"), llava_json=path) == {"train": 1}


@pytest.mark.parametrize(
    "entry, record_id, field",
    [
        (MISSING_IMAGE, "lost", "images[1]"),
        (BAD_SPEAKER, "who", "conversations[1].from"),
        ({**GOOD_ENTRIES[0], "image": "b.jpg", "id": 7, "conversations": []}, "7", "conversations"),
        ({**GOOD_ENTRIES[1], "images": ["b.jpg"]}, "pair", "images"),  # 2 placeholders, 1 image
        ({"conversations": GOOD_ENTRIES[2]["conversations"]}, "#0", "id"),
    ],
)
def test_bad_entry_raises_bad_record_error_naming_record_and_field(
    image_folder, entry, record_id, field
):
    with pytest.raises(BadRecordError) as raised:
        llava_json.convert_entry(entry, 0, image_folder)
    assert (raised.value.record_id, raised.value.field) == (record_id, field)


def test_file_that_is_not_an_image_is_a_bad_record(image_folder):
    (image_folder / "notes.png").write_text("not an image")
    entry = {**GOOD_ENTRIES[0], "image": "notes.png"}
    with pytest.raises(BadRecordError, match="not a readable image") as raised:
        llava_json.convert_entry(entry, 0, image_folder)
    assert raised.value.field == "image"


def test_build_stops_at_a_missing_image_by_default(tmp_path, image_folder):
    options = {
        "llava_json": write_json(tmp_path, [*GOOD_ENTRIES, MISSING_IMAGE]),
        "image_folder": str(image_folder),
    }
    with pytest.raises(BadRecordError) as raised:
        builders.prepare("llava_json", str(tmp_path / "tfds"), **options)
    assert (raised.value.record_id, raised.value.field) == ("lost", "images[1]")
    assert "gone.png" in str(raised.value)


def test_skip_mode_skips_bad_entries_and_counts_them(tmp_path, image_folder, caplog):
    options = {
        "llava_json": write_json(tmp_path, [MISSING_IMAGE, *GOOD_ENTRIES, BAD_SPEAKER]),
        "image_folder": str(image_folder),
        "on_bad_record": "skip",
    }
    data_dir = str(tmp_path / "tfds")
    with caplog.at_level(logging.INFO):
        assert builders.prepare("llava_json", data_dir, **options) == {"train": 3}
    skipped = builders.skipped_counts(builders.make_builder("llava_json", data_dir, **options))
    assert skipped == {"train": {"images[]": 1, "conversations[].from": 1}}
    assert "kept 3 records, skipped 2" in caplog.text
    assert "'lost'" in caplog.text and "'who'" in caplog.text
    source = builders.load_samples("llava_json", data_dir, "train", **options)
    assert [source[i].id for i in range(len(source))] == ["single", "pair", "text_only"]


def test_max_examples_builds_a_separate_smaller_config(tmp_path, image_folder):
    options = {"llava_json": write_json(tmp_path, GOOD_ENTRIES), "image_folder": str(image_folder)}
    data_dir = str(tmp_path / "tfds")
    assert builders.prepare("llava_json", data_dir, max_examples=2, **options) == {"train": 2}
    assert builders.prepare("llava_json", data_dir, **options) == {"train": 3}
    names = sorted(p.name for p in (tmp_path / "tfds" / "llava_json").iterdir())
    assert names == ["convs", "convs-max_examples=2"]
