"""llava_json is validated when it is built, with the training pipeline's rules: each bad entry is
reported once with its id, field and file; malformed or empty files, escaping image paths,
duplicate ids and damaged ArrayRecord shards get one clear message."""

import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from mllm_jax.data import builders
from mllm_jax.data.builders import llava_json
from mllm_jax.data.builders.readable_records import UnreadableShardError
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.packing import PackingSpec
from mllm_jax.data.pipeline import SampleProcessor
from mllm_jax.data.sample import BadRecordError
from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]


def _conversation(question="<image>\nWhat colour?", answer="Red.", *more):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns + [{"from": "human", "value": text} for text in more]


def _entry(record_id, image="a.png", **conversation):
    entry = {"id": record_id, "conversations": _conversation(**conversation)}
    if image is not None:
        entry["image"] = image
    return entry


GOOD = [_entry("g0"), _entry("g1", image=None, question="Say hi.", answer="Hi.")]
BAD = {
    "truncated image": (_entry("trunc", image="cut.png"), "image"),
    "ends with a question": (
        {"id": "open", "image": "a.png", "conversations": _conversation("<image> a?", "b", "c?")},
        "turns[2]",
    ),
    "image in the answer": (_entry("pic", image="a.png", question="draw", answer="<image>"),
                            "turns[1].text"),
    "path outside the folder": (_entry("out", image="../outside.png"), "image"),
}  # fmt: skip


@pytest.fixture
def folder(tmp_path) -> pathlib.Path:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(images / "a.png")
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    (images / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    return images


def _write(tmp_path, entries, name="convs.json") -> str:
    path = tmp_path / name
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries, indent=1))
    return str(path)


def _prepare(tmp_path, folder, entries, **options):
    options = {"llava_json": _write(tmp_path, entries), "image_folder": str(folder), **options}
    sizes = builders.prepare("llava_json", str(tmp_path / "tfds"), **options)
    return sizes, builders.make_builder("llava_json", str(tmp_path / "tfds"), **options)


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_entry_stops_the_build_naming_id_field_and_file(tmp_path, folder, case):
    entry, field = BAD[case]
    with pytest.raises(BadRecordError) as raised:
        _prepare(tmp_path, folder, [*GOOD, entry])
    assert (raised.value.record_id, raised.value.field) == (entry["id"], field)
    assert "entry #2 of" in str(raised.value) and "convs.json" in str(raised.value)


def test_skip_mode_reports_each_bad_entry_once_and_keeps_the_rest(tmp_path, folder, caplog):
    bad = [entry for entry, _ in BAD.values()]
    with caplog.at_level(logging.WARNING):
        sizes, builder = _prepare(tmp_path, folder, [*bad, *GOOD], on_bad_record="skip")
    assert sizes == {"train": 2}
    assert builders.skipped_counts(builder) == {
        "train": {"image": 2, "turns[]": 1, "turns[].text": 1}
    }
    for entry in bad:
        assert caplog.text.count(f"skipping record {entry['id']!r}") == 1
    assert "convs.json" in caplog.text


def test_paths_outside_the_image_folder_build_only_when_allowed(tmp_path, folder):
    entries = [BAD["path outside the folder"][0], {**GOOD[0], "image": str(folder / "a.png")}]
    sizes, _ = _prepare(tmp_path, folder, entries, allow_outside_image_folder=True)
    assert sizes == {"train": 2}
    with pytest.raises(BadRecordError, match="'/etc/passwd' leads outside the image folder"):
        llava_json.convert_entry({**GOOD[0], "image": "/etc/passwd"}, 0, folder)


def test_duplicate_ids_are_kept_counted_and_logged(tmp_path, folder, caplog):
    with caplog.at_level(logging.WARNING):
        sizes, builder = _prepare(tmp_path, folder, [GOOD[0], GOOD[0], GOOD[1], GOOD[0]])
    assert sizes == {"train": 4}
    assert builders.duplicate_id_counts(builder) == {"train": 2}
    assert "entry #1 reuses the id 'g0'" in caplog.text
    assert "2 entries reuse an id already taken" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        ('[\n {"id": "a",\n  "conversations": [}\n]', r"convs.json:3:\d+: not valid JSON"),
        ("[]", "convs.json: the JSON list is empty"),
        ('{"id": "a"}', "convs.json: expected a JSON list of conversations, got a dict"),
    ],
    ids=["malformed", "empty", "not a list"],
)
def test_unusable_files_are_named(tmp_path, folder, content, message):
    with pytest.raises(ValueError, match=message):
        _prepare(tmp_path, folder, content)


def test_a_file_whose_every_entry_is_bad_is_named_in_skip_mode(tmp_path, folder):
    bad = [BAD["truncated image"][0], BAD["ends with a question"][0]]
    with pytest.raises(ValueError, match=r"convs.json: every one of its 2 entries is bad"):
        _prepare(tmp_path, folder, bad, on_bad_record="skip")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    texts = [" what colour? red. say hi. hi. a b c"] * 20
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("spm") / "tok"), vocab_size=300)


def test_a_training_setup_applies_the_pipelines_length_rule(tmp_path, folder, tokenizer_path):
    setup = dict(template="plain", tokenizer=tokenizer_path, tokens_per_image=16, seq_len=80)
    long = _entry("long", answer="red " * 60)
    sizes, builder = _prepare(tmp_path, folder, [*GOOD, long], on_bad_record="skip", **setup)
    assert sizes == {"train": 2}
    assert builders.skipped_counts(builder) == {"train": {"tokens": 1}}
    # The pipeline refuses the same record for the same field.
    spec = PackingSpec(
        seq_len=80, max_images=1, image_size=8, tokens_per_image=16,
        image_id=Tokenizer.load(tokenizer_path).image_id,
    )  # fmt: skip
    processor = SampleProcessor(
        llava_json.to_sample, Tokenizer.load(tokenizer_path), template="plain", spec=spec,
        preprocessing=ImagePreprocessing(size=8),
    )  # fmt: skip
    record = llava_json.convert_entry(long, 0, folder, check=lambda sample: None)
    with pytest.raises(BadRecordError) as raised:
        processor(record)
    assert raised.value.field == "tokens"
    with pytest.raises(ValueError, match=r"needs all of .*\['seq_len'\] missing"):
        _prepare(tmp_path, folder, GOOD, **{k: v for k, v in setup.items() if k != "seq_len"})


def test_damaged_shards_are_named_before_or_when_read(tmp_path, folder):
    options = {"llava_json": _write(tmp_path, GOOD * 20), "image_folder": str(folder)}
    data_dir = tmp_path / "tfds"
    builders.prepare("llava_json", str(data_dir), **options)
    (shard,) = data_dir.glob("llava_json/*/*/*.array_record-*")
    original = shard.read_bytes()
    records = builders.load_samples("llava_json", str(data_dir), "train", **options).records
    assert [llava_json.to_sample(r).id for r in records] == ["g0", "g1"] * 20  # ends at 40
    assert llava_json.to_sample(records[-1]).id == "g1"
    with pytest.raises(IndexError):
        records[40]

    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(UnreadableShardError, match=f"shard {shard} .*build it again"):
        builders.load_samples("llava_json", str(data_dir), "train", **options)

    damaged = bytearray(original)
    damaged[200:1200] = os.urandom(1000)
    shard.write_bytes(bytes(damaged))
    source = builders.load_samples("llava_json", str(data_dir), "train", **options)
    with pytest.raises(UnreadableShardError, match=f"record 0 of llava_json/train in {shard}"):
        source[0]

    shard.unlink()
    with pytest.raises(UnreadableShardError, match="is missing"):
        builders.load_samples("llava_json", str(data_dir), "train", **options)
    shutil.rmtree(data_dir)


def test_the_prepare_command_checks_with_the_training_setup(tmp_path, folder, tokenizer_path):
    long = _entry("long", answer="red " * 60)
    entries = [*GOOD, long, GOOD[0], BAD["path outside the folder"][0]]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [
        sys.executable, "tools/prepare_data.py", "--dataset", "llava_json",
        "--data_dir", str(tmp_path / "tfds"), "--llava_json", _write(tmp_path, entries),
        "--image_folder", str(folder), "--on_bad_record", "skip", "--allow_outside_image_folder",
        "--template", "plain", "--tokenizer", tokenizer_path, "--tokens_per_image", "16",
        "--seq_len", "80",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sizes"] == {"train": 4}  # the path outside the folder is allowed
    assert report["skipped"] == {"train": {"tokens": 1}}
    assert report["duplicate_ids"] == {"train": 1}
    assert "skipping record 'long' (tokens)" in result.stderr and "convs.json" in result.stderr
