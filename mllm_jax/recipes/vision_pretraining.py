"""Stage 0 (vision): CLIP-style contrastive pretraining of the recipe's ViT on the captions.

No pretrained tower can be downloaded here, so the ViT learns from scratch what LLaVA's CLIP
tower brings: a dual encoder (``models/clip.py``) trained with multi-positive InfoNCE (only 24
distinct captions, so every same-caption pair in a batch is a positive). Its ``vision`` params
are what stage 1 loads into the MultimodalLM. Evaluation: 24-way zero-shot classification of the
test captions' images, overall and for shape and colour alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.data.builders import easy_vqa_questions as questions_lib
from mllm_jax.data.builders.easy_vqa_captions import ImageLabels
from mllm_jax.data.image_text import (
    ImageTextOptions,
    load_image_text_table,
    make_image_text_dataset,
)
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.models.clip import CLIPConfig, CLIPModel
from mllm_jax.recipes import llava_models
from mllm_jax.recipes.llava_data import load_source
from mllm_jax.recipes.llava_stage_config import config_json, per_process, stage_seed
from mllm_jax.train.contrastive_loss import multi_positive_info_nce
from mllm_jax.train.param_groups import ParamGroup
from mllm_jax.train.trainer import TrainTask
from mllm_jax.train.zero_shot import easy_vqa_caption_attributes, evaluate_zero_shot

MAX_CAPTION_TOKENS = 8


def clip_config(config: Any) -> CLIPConfig:
    section = config.stage0_vision
    return CLIPConfig(
        vision=llava_models.vit_config(config),
        vocab_size=config.model.vocab_size,
        embed_dim=section.embed_dim,
        image_pooling=section.image_pooling,
        text_width=section.text_width,
        text_layers=section.text_layers,
        text_heads=section.text_heads,
        text_mlp_dim=2 * section.text_width,
    )


def contrastive_loss_fn(model: CLIPModel):
    """``(params, batch, rng) -> (loss_sum, count)`` of multi-positive InfoNCE."""

    def loss_fn(params, batch, rng):
        del rng  # no dropout in the towers
        image_emb, text_emb, scale = model.apply(
            {"params": params}, batch["images"], batch["tokens"], batch["text_mask"]
        )
        return multi_positive_info_nce(image_emb, text_emb, scale, batch["labels"])

    return loss_fn


def caption_classes() -> tuple[str, ...]:
    """Every easy-VQA caption ("a red circle", ...): 8 colours x 3 shapes, sorted."""
    return tuple(
        sorted(
            ImageLabels(shape=shape, color=color).caption
            for shape in questions_lib.SHAPES
            for color in questions_lib.COLORS
        )
    )


def caption_batch(classes: tuple[str, ...], tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """The candidate captions as tokens [K, L] and text_mask [K, L] for zero-shot scoring."""
    tokens = np.zeros((len(classes), MAX_CAPTION_TOKENS), np.int32)
    for k, caption in enumerate(classes):
        ids = tokenizer.encode(caption)[:MAX_CAPTION_TOKENS]
        tokens[k, : len(ids)] = ids
    return {"tokens": tokens, "text_mask": tokens != 0}


class _Stream:
    """The image-caption batches as a resumable DataStream."""

    def __init__(self, dataset):
        self._iterator = iter(dataset)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


def stage0_vision_task(config: Any, tokenizer: Tokenizer) -> TrainTask:
    section = config.stage0_vision
    model = CLIPModel(clip_config(config))
    preprocessing = ImagePreprocessing(size=config.data.image_size)
    classes = caption_classes()
    train_table = load_image_text_table(
        load_source(config, "easy_vqa_captions", "train"), tokenizer, preprocessing,
        max_text_len=MAX_CAPTION_TOKENS, classes=classes,
    )  # fmt: skip
    test_table = load_image_text_table(
        load_source(config, "easy_vqa_captions", "test"), tokenizer, preprocessing,
        max_text_len=MAX_CAPTION_TOKENS, classes=classes,
    )  # fmt: skip
    size = config.data.image_size
    example_images = jnp.zeros((1, size, size, 3), jnp.float32)
    example_tokens = jnp.zeros((1, MAX_CAPTION_TOKENS), jnp.int32)

    def make_train_stream():
        options = ImageTextOptions(
            batch_size=per_process(section.batch_size),
            seed=stage_seed(config, "stage0_vision"),
            flip=section.augment,
            translate=section.augment,
            prefetch_batches=config.data.prefetch_batches,
        )
        return _Stream(
            make_image_text_dataset(
                train_table,
                options,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )  # fmt: skip
        )

    captions = caption_batch(classes, tokenizer)
    attributes = easy_vqa_caption_attributes(classes)

    def evaluate(params):
        return evaluate_zero_shot(
            model, params, test_table.images, test_table.labels, captions["tokens"],
            captions["text_mask"], attributes,
        )  # fmt: skip

    return TrainTask(
        name="stage0_vision",
        init_params=lambda rng: model.init(rng, example_images, example_tokens, example_tokens > 0)[
            "params"
        ],
        loss_fn=contrastive_loss_fn(model),
        param_groups=[
            ParamGroup(name="clip", patterns=(".",), learning_rate=section.learning_rate)
        ],
        make_train_stream=make_train_stream,
        evaluate=evaluate,
        config=config_json(config),
    )
