"""Image-caption pipeline on synthetic shape images: contract, labels, resume, augmentation."""

import io

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data.builders.registry import SampleSource
from mllm_jax.data.image_text import (
    ImageTextOptions,
    LabelPreservingAugmentation,
    background_and_box,
    load_image_text_table,
    make_image_text_dataset,
)
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.sample import BadRecordError, Sample, Turn

SIZE = 16
COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}
BACKGROUND = (240, 230, 220)


class WordTokenizer:
    """Word-level ids from 1 (0 is padding)."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(word, len(self.vocab) + 1) for word in text.split()]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _shape_image(index: int) -> tuple[np.ndarray, str]:
    """A square (even index) or a one-pixel-wide bar, in red or blue, away from the edges."""
    color = "red" if index % 3 else "blue"
    shape = "square" if index % 2 == 0 else "bar"
    pixels = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
    top, left = 2 + index % 5, 3 + index % 4
    height, width = (4, 4) if shape == "square" else (6, 1)
    pixels[top : top + height, left : left + width] = COLORS[color]
    return pixels, f"a {color} {shape}"


def _record(index: int) -> dict:
    pixels, caption = _shape_image(index)
    return {"id": f"img{index}", "image": _png(pixels), "caption": caption}


def to_sample(record: dict) -> Sample:
    return Sample(
        id=record["id"],
        turns=(Turn(role="user", text="<image>"), Turn(role="assistant", text=record["caption"])),
        images=(record["image"],) if record["image"] is not None else (),
    )


@pytest.fixture(scope="module")
def table():
    source = SampleSource(records=[_record(i) for i in range(20)], to_sample=to_sample)
    return load_image_text_table(source, WordTokenizer(), ImagePreprocessing(size=SIZE))


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_table_labels_are_indices_of_sorted_distinct_captions(table):
    assert table.classes == ("a blue bar", "a blue square", "a red bar", "a red square")
    for i in range(len(table)):
        assert table.classes[table.labels[i]] == _shape_image(i)[1]
        np.testing.assert_array_equal(table.tokens[i], table.class_tokens[table.labels[i]])


def test_given_classes_fix_the_labels_and_candidate_captions():
    tokenizer = WordTokenizer()
    source = SampleSource(records=[_record(i) for i in range(4)], to_sample=to_sample)
    classes = ("a red square", "a green circle", "a red bar", "a blue square", "a blue bar")
    table = load_image_text_table(source, tokenizer, ImagePreprocessing(size=SIZE),
                                  classes=classes)  # fmt: skip
    assert table.classes == classes
    assert [classes[k] for k in table.labels] == [_shape_image(i)[1] for i in range(4)]
    captions = table.caption_batch()
    assert captions["tokens"].shape == (5, 8)
    # "a green circle" has no image here, and is still a candidate with its own tokens.
    np.testing.assert_array_equal(captions["tokens"][1, :3], tokenizer.encode("a green circle"))
    np.testing.assert_array_equal(captions["text_mask"].sum(axis=1), 3)


def test_batches_follow_the_contract(table):
    dataset = make_image_text_dataset(table, ImageTextOptions(batch_size=6, seed=1))
    batch = next(iter(dataset))
    assert set(batch) == {"images", "tokens", "text_mask", "labels"}
    assert batch["images"].shape == (6, SIZE, SIZE, 3) and batch["images"].dtype == np.float32
    assert batch["tokens"].shape == (6, 8) and batch["tokens"].dtype == np.int32
    assert batch["text_mask"].dtype == bool and batch["labels"].dtype == np.int32
    np.testing.assert_array_equal(batch["tokens"][~batch["text_mask"]], 0)
    assert np.all(batch["tokens"][batch["text_mask"]] > 0)
    # Images keep their preprocessing: (x / 255 - 0.5) / 0.5 of the background colour.
    expected_background = (np.asarray(BACKGROUND) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(batch["images"][:, 0, 0], np.tile(expected_background, (6, 1)),
                               rtol=1e-6)  # fmt: skip


def test_shuffle_is_seeded_and_every_record_appears_once_per_epoch(table):
    options = ImageTextOptions(batch_size=5, seed=3, num_epochs=2, prefetch_batches=0)
    batches = _take(iter(make_image_text_dataset(table, options)), 8)
    again = _take(iter(make_image_text_dataset(table, options)), 8)
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])

    def table_rows(epoch_batches):
        images = np.concatenate([b["images"] for b in epoch_batches])
        return [int(np.flatnonzero((table.images == x).all(axis=(1, 2, 3)))[0]) for x in images]

    first, second = table_rows(batches[:4]), table_rows(batches[4:])
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != list(range(20)) and second != first  # shuffled, and reshuffled per epoch
    other = next(iter(make_image_text_dataset(table, ImageTextOptions(batch_size=5, seed=4))))
    assert not np.array_equal(other["images"], batches[0]["images"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_iterator_state_gives_the_same_batches(table, prefetch):
    options = ImageTextOptions(batch_size=6, seed=2, flip=True, translate=True,
                               prefetch_batches=prefetch)  # fmt: skip
    iterator = iter(make_image_text_dataset(table, options))
    _take(iterator, 5)  # past the first epoch (20 records, 6 per batch)
    state = iterator.get_state()
    expected = _take(iterator, 4)
    restored = iter(make_image_text_dataset(table, options))
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 4), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _foreground(image, background):
    return np.any(image != background, axis=-1)


def test_augmentation_moves_and_mirrors_the_object_but_keeps_it_whole(table):
    augment = LabelPreservingAugmentation(flip=True, translate=True)
    element = table[0]
    mask = _foreground(element["images"], element["background"])
    moved_positions = set()
    for seed in range(30):
        out = augment(element, np.random.default_rng(seed))
        out_mask = _foreground(out["images"], element["background"])
        assert out_mask.sum() == mask.sum()
        # The object's pixels are the original colour, whatever the position.
        np.testing.assert_array_equal(np.unique(out["images"][out_mask], axis=0),
                                      np.unique(element["images"][mask], axis=0))  # fmt: skip
        assert out["labels"] == element["labels"]
        moved_positions.add(tuple(np.argwhere(out_mask)[0]))
    assert len(moved_positions) > 5
    # A vertical bar mirrored (no translation) lands on the mirrored column.
    bar = table[1]
    flip_only = LabelPreservingAugmentation(flip=True)
    columns = {
        tuple(np.flatnonzero(_foreground(flip_only(bar, np.random.default_rng(s))["images"],
                                         bar["background"]).any(axis=0)))
        for s in range(10)
    }  # fmt: skip
    (left,) = np.flatnonzero(_foreground(bar["images"], bar["background"]).any(axis=0))
    assert columns == {(left,), (SIZE - 1 - left,)}


def test_an_object_touching_an_edge_is_not_moved_along_that_axis():
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    image[0:5, 6:9] = 1.0  # touches the top edge
    background, box = background_and_box(image)
    np.testing.assert_array_equal(background, 0.0)
    np.testing.assert_array_equal(box, [0, 4, 6, 8])
    element = {"images": image, "background": background, "box": box, "labels": 0}
    augment = LabelPreservingAugmentation(translate=True)
    rows, cols = set(), set()
    for seed in range(20):
        mask = augment(element, np.random.default_rng(seed))["images"].any(axis=-1)
        rows.add(tuple(np.flatnonzero(mask.any(axis=1))))
        cols.add(np.flatnonzero(mask.any(axis=0))[0])
    assert rows == {(0, 1, 2, 3, 4)} and len(cols) > 3


def _source(records):
    return SampleSource(records=records, to_sample=to_sample)


def test_bad_records_raise_naming_the_record():
    preprocessing = ImagePreprocessing(size=SIZE)
    good = [_record(0), _record(1)]
    broken = {"id": "broken", "image": b"not a png", "caption": "a red square"}
    with pytest.raises(BadRecordError, match="broken.*cannot decode"):
        load_image_text_table(_source(good + [broken]), WordTokenizer(), preprocessing)
    no_image = {"id": "blind", "image": None, "caption": "a red square"}
    with pytest.raises(BadRecordError, match="blind.*expected 1 image"):
        load_image_text_table(_source(good + [no_image]), WordTokenizer(), preprocessing)
    long = {**_record(2), "id": "wordy", "caption": "a very very very long red square"}
    with pytest.raises(BadRecordError, match="wordy.*max_text_len=4"):
        load_image_text_table(_source(good + [long]), WordTokenizer(), preprocessing,
                              max_text_len=4)  # fmt: skip
    with pytest.raises(BadRecordError, match="img1.*not one of the 1 classes"):
        load_image_text_table(_source(good), WordTokenizer(), preprocessing,
                              classes=["a blue square"])  # fmt: skip
