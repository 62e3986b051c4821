"""Zero-shot classification: nearest caption per image, accuracy overall and per attribute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers import ViTConfig
from mllm_jax.models.clip import CLIPConfig, CLIPModel
from mllm_jax.sharding import strip_boxes
from mllm_jax.train.zero_shot import (
    easy_vqa_caption_attributes,
    evaluate_zero_shot,
    zero_shot_accuracy,
    zero_shot_predictions,
)

CAPTIONS = ["a blue circle", "a blue triangle", "a red circle", "a red triangle"]


def test_caption_attributes_are_read_off_the_caption():
    attributes = easy_vqa_caption_attributes(CAPTIONS)
    assert attributes == {
        "color": ["blue", "blue", "red", "red"],
        "shape": ["circle", "triangle", "circle", "triangle"],
    }
    with pytest.raises(ValueError, match="'the red circle'"):
        easy_vqa_caption_attributes(["the red circle"])


def test_accuracy_counts_attributes_right_even_when_the_caption_is_wrong():
    attributes = easy_vqa_caption_attributes(CAPTIONS)
    labels = np.array([0, 1, 2, 3])
    predictions = np.array([0, 0, 3, 1])  # right; shape wrong; shape wrong; colour wrong
    metrics = zero_shot_accuracy(predictions, labels, attributes)
    assert metrics == {"accuracy": 0.25, "color_accuracy": 0.75, "shape_accuracy": 0.5}
    with pytest.raises(ValueError, match="differ"):
        zero_shot_accuracy(predictions[:3], labels)


def test_predictions_are_the_nearest_caption_across_padded_chunks():
    vision = ViTConfig(image_size=8, patch_size=4, width=8, num_layers=1, num_heads=2, mlp_dim=16)
    model = CLIPModel(CLIPConfig(vision=vision, vocab_size=10, embed_dim=4, text_width=8,
                                 text_heads=2, text_mlp_dim=16))  # fmt: skip
    rng = np.random.default_rng(0)
    images = rng.normal(size=(7, 8, 8, 3)).astype(np.float32)
    tokens = np.array([[1, 2, 0], [1, 3, 0], [4, 5, 6], [7, 0, 0]], np.int32)
    mask = tokens > 0
    params = jax.jit(model.init)(jax.random.key(3), images[:1], tokens[:1], mask[:1])["params"]
    params = strip_boxes(params)
    embed_images = jax.jit(lambda p, x: model.apply({"params": p}, x, method="embed_images"))
    embed_texts = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method="embed_texts"))
    image_emb, text_emb = embed_images(params, images), embed_texts(params, tokens, mask)
    expected = np.argmax(np.asarray(image_emb @ jnp.asarray(text_emb).T), axis=-1)
    assert len(set(expected.tolist())) > 1  # a test where every image picks one caption is weak
    predictions = zero_shot_predictions(model, params, images, tokens, mask, batch_size=3)
    np.testing.assert_array_equal(predictions, expected)
    metrics = evaluate_zero_shot(model, params, images, expected, tokens, mask, batch_size=4)
    assert metrics == {"accuracy": 1.0}
