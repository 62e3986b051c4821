"""Exact-match VQA scoring, generation-based evaluation and the vision-blind control."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mllm_jax.data import builders
from mllm_jax.data.builders.easy_vqa import ANSWERS
from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer
from mllm_jax.generate import answer_questions, prompt_batch
from mllm_jax.layers import TransformerConfig, ViTConfig
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.sharding import strip_boxes
from mllm_jax.train.evaluate_vqa import (
    VQAExample,
    easy_vqa_examples,
    evaluate_vqa,
    normalize_answer,
    score,
)

SIZE = 16


def _example(answer, kind, question="what shape?", image=b""):
    return VQAExample(id="x", images=(image,), question=question, answer=answer, question_type=kind)


def test_scoring_against_a_hand_worked_example():
    examples = [_example("circle", "shape"), _example("red", "color"), _example("yes", "yes_no"),
                _example("no", "yes_no"), _example("triangle", "shape")]  # fmt: skip
    predictions = ["Circle.", "blue", " yes", "no!", "a triangle"]
    accuracy, per_type = score(examples, predictions)
    assert accuracy == pytest.approx(3 / 5)
    assert per_type == {"color": 0.0, "shape": 0.5, "yes_no": 1.0}
    assert normalize_answer("  Yes?  ") == "yes"
    with pytest.raises(ValueError, match="predictions"):
        score(examples, predictions[:2])


def _png(value):
    buffer = io.BytesIO()
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[:, : SIZE // 2] = value
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    texts = [f" what shape is it? {a}" for a in ANSWERS] * 10
    tokenizer = Tokenizer.load(train_tokenizer(texts, str(root / "tok"), vocab_size=300))
    config = MultimodalConfig(
        vocab_size=tokenizer.vocab_size, embed_dim=16,
        transformer=TransformerConfig(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                      mlp_dim=32),
        vision=ViTConfig(image_size=SIZE, patch_size=8, width=16, num_layers=2, num_heads=2,
                         mlp_dim=32),
    )  # fmt: skip
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = MultimodalLM(config).init(
        jax.random.key(3, impl="rbg"), tokens, segment_ids=tokens, positions=tokens,
        images=jnp.zeros((1, 1, SIZE, SIZE, 3)), image_slot=tokens - 1, image_patch=tokens - 1,
    )["params"]  # fmt: skip
    params = jax.tree_util.tree_map(lambda p: p * 6.0, strip_boxes(params))
    return config, params, tokenizer


def test_evaluation_scores_the_generated_answers(model):
    config, params, tokenizer = model
    images = [_png(v) for v in (0, 255, 128, 40)]
    answers = ["circle", "red", "yes", "no"]
    kinds = ["shape", "color", "yes_no", "yes_no"]
    examples = [_example(a, k, image=i) for a, k, i in zip(answers, kinds, images, strict=True)]
    result = evaluate_vqa(config, params, tokenizer, examples, batch_size=3, max_new_tokens=3)
    direct = answer_questions(config, params, tokenizer, [e.images for e in examples],
                              [e.question for e in examples], max_new_tokens=3)  # fmt: skip
    assert list(result.predictions) == direct
    assert (result.accuracy, result.per_type) == score(examples, direct)
    assert result.count == 4


def test_vision_blind_control_feeds_zero_images(model):
    config, params, tokenizer = model
    images = [[_png(v)] for v in (0, 255)]
    questions = ["what shape is it?"] * 2
    seeing = prompt_batch(config, tokenizer, images, questions)
    blind = prompt_batch(config, tokenizer, images, questions, zero_images=True)
    assert np.abs(seeing["images"]).max() > 0.5 and not blind["images"].any()
    for key in ("tokens", "mask", "image_slot", "image_patch", "image_mask"):
        np.testing.assert_array_equal(seeing[key], blind[key])
    # Zeroed images are the same input whatever the image was: the answers cannot differ.
    answers = answer_questions(config, params, tokenizer, images, questions, max_new_tokens=4,
                               zero_images=True)  # fmt: skip
    assert answers[0] == answers[1]


def test_easy_vqa_records_become_examples_with_types(tmp_path):
    builders.prepare("easy_vqa", str(tmp_path), max_examples=12)
    source = builders.load_samples("easy_vqa", str(tmp_path), "test", max_examples=12)
    examples = easy_vqa_examples(source.records, ANSWERS, limit=10)
    assert len(examples) == 10
    for example in examples:
        assert example.answer in ANSWERS and example.images[0][:4] == b"\x89PNG"
        if example.question_type == "yes_no":
            assert example.answer in ("yes", "no")
        elif example.question_type == "shape":
            assert example.answer in ("circle", "rectangle", "triangle")
