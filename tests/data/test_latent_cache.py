"""Latent cache: encode once, read back exactly through Grain, bad records named."""

import numpy as np
import pytest

from mllm_jax.data.latent_cache import (
    LatentOptions,
    make_latent_dataset,
    open_latent_cache,
    write_latent_cache,
)
from mllm_jax.data.paired_datasets import ImageTextPairs, load_digits_pairs
from mllm_jax.data.sample import BadRecordError


def _pairs(count=10, name="toy/train"):
    rng = np.random.default_rng(0)
    return ImageTextPairs(
        name=name,
        images=rng.integers(0, 256, (count, 4, 4, 3)).astype(np.uint8),
        labels=(np.arange(count) % 3).astype(np.int32),
        classes=("a cat", "a dog", "a fox"),
        prompts=("cat", "dog", "fox"),
        ids=tuple(f"toy/{i}" for i in range(count)),
    )


def image_encoder(images):
    return images.reshape(len(images), -1)[:, :5].astype(np.float32) / 255.0


def text_encoder(texts):
    return np.array([[len(t), t.count("a"), ord(t[-1])] for t in texts], np.float32)


def test_cache_round_trips_every_pair(tmp_path):
    pairs = _pairs()
    write_latent_cache(pairs, image_encoder, text_encoder, tmp_path, batch_size=4,
                       records_per_shard=4)  # fmt: skip
    cache = open_latent_cache(tmp_path)
    assert len(cache) == 10 and len(cache.meta["shards"]) == 3
    arrays = cache.arrays()
    np.testing.assert_array_equal(arrays["image"], image_encoder(pairs.images))
    np.testing.assert_array_equal(arrays["text"], text_encoder(pairs.captions))
    np.testing.assert_array_equal(arrays["label"], pairs.labels)
    np.testing.assert_array_equal(cache.prompt_latents, text_encoder(list(pairs.prompts)))


def test_grain_batches_cover_the_selected_records(tmp_path):
    write_latent_cache(_pairs(), image_encoder, text_encoder, tmp_path / "a")
    write_latent_cache(_pairs(6, "toy2/train"), image_encoder, text_encoder, tmp_path / "b")
    a, b = open_latent_cache(tmp_path / "a"), open_latent_cache(tmp_path / "b")
    options = LatentOptions(batch_size=4, seed=1, num_epochs=1, drop_remainder=False)
    batches = list(make_latent_dataset([(a, [0, 2, 4]), (b, None)], options))
    images = np.concatenate([batch["image"] for batch in batches])
    assert images.shape == (9, 5) and batches[0]["text"].shape == (4, 3)
    expected = np.concatenate([a.arrays([0, 2, 4])["image"], b.arrays()["image"]])
    np.testing.assert_array_equal(np.sort(images, axis=0), np.sort(expected, axis=0))
    again = list(make_latent_dataset([(a, [0, 2, 4]), (b, None)], options))
    np.testing.assert_array_equal(again[0]["image"], batches[0]["image"])  # seeded order


def test_a_short_record_names_its_shard_and_row(tmp_path):
    write_latent_cache(_pairs(), image_encoder, text_encoder, tmp_path, records_per_shard=4)
    cache = open_latent_cache(tmp_path)
    with pytest.raises(BadRecordError, match=r"latents-00001-of-00003\.array_record#1"):
        cache.decoder((5, b"\x00" * 12))


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        open_latent_cache(tmp_path)


def test_digits_pairs_have_held_out_splits_and_word_captions():
    train, test = load_digits_pairs("train"), load_digits_pairs("test")
    assert len(train) + len(test) == 1797 and len(test) == 539
    assert not set(train.ids) & set(test.ids)
    assert train.classes[7] == "a handwritten digit seven"
    assert train.prompts[7] == "the number seven"
    assert train.images.shape[1:] == (8, 8, 3) and train.images.dtype == np.uint8
