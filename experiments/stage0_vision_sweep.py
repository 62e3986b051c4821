"""Stage 0 of the easy-VQA demo: CLIP-style pretraining of the ViT on "a {color} {shape}" captions.

Trains a CLIPModel with the multi-positive InfoNCE loss on the easy_vqa_captions train split and
prints zero-shot accuracy on the test split: 24-way (the whole caption), shape and colour.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
  MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true \
  .venv/bin/python experiments/stage0_vision_sweep.py --num_steps=800

The defaults are the recommended recipe (ViT width 96, 4 blocks, 3 heads, MLP 384, patch 16,
patch-mean pooling; batch 128, AdamW 1e-3, 800 steps, "mass" loss, flips + translations):
zero-shot shape 0.984-0.985 and colour 1.0 on the 880 test images, ~0.14-0.17 s/step on 2 cores.
The batch is split over a data-parallel mesh of all devices (2 host devices keep both cores of
a small CPU busy); params and optimizer state are replicated. The last line printed is a JSON
record of the flags and results, for sweep tables.
"""

from __future__ import annotations

import json
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import sharding
from mllm_jax.data.builders import load_samples
from mllm_jax.data.image_text import (
    ImageTextOptions,
    ImageTextTable,
    load_image_text_table,
    make_image_text_dataset,
)
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.layers.vit import ViTConfig
from mllm_jax.models.clip import CLIPConfig, CLIPModel
from mllm_jax.train.contrastive_loss import MULTI_POSITIVE_FORMS, multi_positive_info_nce
from mllm_jax.train.param_groups import ParamGroup, make_grouped_optimizer
from mllm_jax.train.state import GroupedTrainState
from mllm_jax.train.step import check_finite, make_grouped_train_step
from mllm_jax.train.zero_shot import easy_vqa_caption_attributes, evaluate_zero_shot

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "data", "Directory with the prepared easy_vqa_captions dataset.")
flags.DEFINE_string("tokenizer", "data/tokenizer.model", "Sentencepiece model for the captions.")
flags.DEFINE_integer("image_size", 64, "Images are resized to this size.")
flags.DEFINE_integer("patch_size", 16, "ViT patch size.")
flags.DEFINE_integer("width", 96, "ViT width.")
flags.DEFINE_integer("depth", 4, "ViT blocks.")
flags.DEFINE_integer("heads", 3, "ViT attention heads.")
flags.DEFINE_integer(
    "mlp_dim", 384, "ViT MLP width (at batch 128, 512 took 1.7x the step time of 384 on CPU)."
)
flags.DEFINE_enum("pooling", "mean", ["mean", "cls"], "Image embedding: patch mean or CLS.")
flags.DEFINE_bool("cls_token", False, "Give the ViT a CLS token (needed by --pooling=cls).")
flags.DEFINE_integer("embed_dim", 128, "Width of the shared embedding space.")
flags.DEFINE_integer("text_width", 64, "Caption encoder width.")
flags.DEFINE_integer("text_layers", 1, "Caption encoder blocks (0: bag of embeddings).")
flags.DEFINE_float("logit_scale_init", 1 / 0.07, "Initial logit scale 1/τ.")
flags.DEFINE_enum("loss_form", "mass", list(MULTI_POSITIVE_FORMS), "Multi-positive form.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("num_steps", 800, "Train steps (the cosine schedule spans them).")
flags.DEFINE_integer("warmup_steps", 20, "Linear warmup steps.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate.")
flags.DEFINE_float("weight_decay", 0.05, "Decoupled weight decay on matrices.")
flags.DEFINE_float("end_lr_fraction", 0.05, "Final learning rate as a fraction of the peak.")
flags.DEFINE_bool("flip", True, "Random left-right flips.")
flags.DEFINE_bool("translate", True, "Random object translations on the background colour.")
flags.DEFINE_integer("seed", 0, "Init, data order and augmentation seed.")
flags.DEFINE_integer("eval_every", 0, "Also evaluate every this many steps (0: only at the end).")
flags.DEFINE_integer("log_every", 50, "Log the mean train loss every this many steps.")
flags.DEFINE_list(
    "probe_layers", [], "ViT hidden states (CLIP indices) to linear-probe for shape and colour."
)
flags.DEFINE_string("params_out", None, "Write the trained ViT params (msgpack) to this file.")


def build_model(vocab_size: int) -> CLIPModel:
    vision = ViTConfig(
        image_size=FLAGS.image_size,
        patch_size=FLAGS.patch_size,
        width=FLAGS.width,
        num_layers=FLAGS.depth,
        num_heads=FLAGS.heads,
        mlp_dim=FLAGS.mlp_dim,
        use_cls_token=FLAGS.cls_token,
    )
    return CLIPModel(
        CLIPConfig(
            vision=vision,
            vocab_size=vocab_size,
            embed_dim=FLAGS.embed_dim,
            image_pooling=FLAGS.pooling,
            text_width=FLAGS.text_width,
            text_layers=FLAGS.text_layers,
            text_heads=max(1, FLAGS.text_width // 32),
            text_mlp_dim=2 * FLAGS.text_width,
            logit_scale_init=FLAGS.logit_scale_init,
        )
    )


def linear_probe(
    model: CLIPModel,
    params: Any,
    train: ImageTextTable,
    test: ImageTextTable,
    layers: list[int],
    attributes: dict[str, list[str]],
) -> dict[str, dict[str, float]]:
    """Test accuracy of ridge classifiers on frozen ViT features, per layer and attribute.

    Features: the patch tokens of a hidden state, mean-pooled ("mean") or concatenated in grid
    order ("tokens", closer to what a projector + LM sees). Classifiers are fit in closed form
    on the train split.
    """
    hidden_of = jax.jit(
        lambda p, x: model.apply(
            {"params": p}, x, method=lambda m, x: m.vision(x, tuple(layers), drop_cls=True)
        )
    )

    def features(table):
        chunks = [hidden_of(params, table.images[i : i + 256]) for i in range(0, len(table), 256)]
        return [np.concatenate([np.asarray(c[k]) for c in chunks]) for k in range(len(layers))]

    def ridge_accuracy(x_train, y_train, x_test, y_test, num_classes):
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        gram = x_train.T @ x_train + 1e-3 * len(x_train) * np.eye(x_train.shape[1])
        weights = np.linalg.solve(gram, x_train.T @ np.eye(num_classes)[y_train])
        return float(np.mean(np.argmax(x_test @ weights, axis=1) == y_test))

    results = {}
    for layer, train_hidden, test_hidden in zip(
        layers, features(train), features(test), strict=True
    ):
        for pooling, pool in (
            ("mean", lambda h: h.mean(1)),
            ("tokens", lambda h: h.reshape(len(h), -1)),
        ):
            scores = {}
            for name, values in attributes.items():
                classes = sorted(set(values))
                class_of = np.array([classes.index(v) for v in values])
                scores[name] = ridge_accuracy(
                    pool(train_hidden), class_of[train.labels], pool(test_hidden),
                    class_of[test.labels], len(classes),
                )  # fmt: skip
            results[f"layer{layer}/{pooling}"] = scores
    return results


def optimizer_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            learning_rate=FLAGS.learning_rate,
            warmup_steps=FLAGS.warmup_steps,
            end_learning_rate_fraction=FLAGS.end_lr_fraction,
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            weight_decay=FLAGS.weight_decay,
            grad_clip_norm=1.0,
        )
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    tokenizer = Tokenizer.load(FLAGS.tokenizer)
    preprocessing = ImagePreprocessing(size=FLAGS.image_size)
    train = load_image_text_table(
        load_samples("easy_vqa_captions", FLAGS.data_dir, "train"), tokenizer, preprocessing
    )
    test = load_image_text_table(
        load_samples("easy_vqa_captions", FLAGS.data_dir, "test"),
        tokenizer,
        preprocessing,
        classes=train.classes,
    )
    attributes = easy_vqa_caption_attributes(train.classes)
    captions = train.caption_batch()
    data_seconds = time.perf_counter() - start
    logging.info("%d train / %d test pairs, %d classes", len(train), len(test), len(train.classes))

    mesh = sharding.create_mesh({"data": -1})
    rules = (("act_batch", "data"),)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    model = build_model(tokenizer.vocab_size)
    groups = [ParamGroup(name="all", patterns=(".*",), learning_rate=FLAGS.learning_rate)]
    grouped = make_grouped_optimizer(optimizer_config(), groups, FLAGS.num_steps)

    def loss_fn(params, batch, rng):
        del rng  # no dropout
        image_emb, text_emb, scale = model.apply(
            {"params": params}, batch["images"], batch["tokens"], batch["text_mask"]
        )
        return multi_positive_info_nce(
            image_emb, text_emb, scale, batch["labels"], form=FLAGS.loss_form
        )

    init_rng, step_rng = jax.random.split(jax.random.key(FLAGS.seed))
    params = jax.jit(
        lambda r: model.init(r, train.images[:2], train.tokens[:2], train.text_mask[:2]),
        out_shardings=replicated,
    )(init_rng)["params"]
    params = sharding.strip_boxes(params)
    state = jax.device_put(GroupedTrainState.create(params, grouped), replicated)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params["vision"]))
    logging.info("ViT params: %d", num_params)

    with sharding.mesh_context(mesh, rules):
        train_step = jax.jit(
            make_grouped_train_step(loss_fn, grouped),
            in_shardings=(replicated, batch_sharding, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=(0,),
        )
    options = ImageTextOptions(
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, flip=FLAGS.flip, translate=FLAGS.translate
    )
    batches = iter(make_image_text_dataset(train, options))

    def evaluate(params, table):
        return evaluate_zero_shot(
            model, params, table.images, table.labels, captions["tokens"],
            captions["text_mask"], attributes,
        )  # fmt: skip

    setup_seconds = time.perf_counter() - start - data_seconds
    losses, pending, eval_seconds = [], [], 0.0
    train_start = interval_start = time.perf_counter()
    for step in range(FLAGS.num_steps):
        batch = jax.device_put(next(batches), batch_sharding)
        with sharding.mesh_context(mesh, rules):
            state, metrics = train_step(state, batch, step_rng)
        if step == 0:  # compiles; timed apart from the others
            check_finite(metrics, step)
            losses.append(float(metrics["loss"]))
            first_step_seconds = time.perf_counter() - train_start
            interval_start = time.perf_counter()
            continue
        pending.append(metrics)
        # Metrics are read once per log interval, so the host dispatches ahead of the devices.
        if (step + 1) % FLAGS.log_every == 0 or step + 1 == FLAGS.num_steps:
            for offset, step_metrics in enumerate(pending):
                check_finite(step_metrics, step + 1 - len(pending) + offset)
                losses.append(float(step_metrics["loss"]))
            logging.info(
                "step %d loss %.4f (%.3f s/step)",
                step + 1,
                np.mean(losses[-len(pending) :]),
                (time.perf_counter() - interval_start) / len(pending),
            )
            pending = []
            interval_start = time.perf_counter()
        if FLAGS.eval_every and (step + 1) % FLAGS.eval_every == 0:
            tick = time.perf_counter()
            params = grouped.combine(state.trainable, state.frozen)
            logging.info("step %d test %s", step + 1, evaluate(params, test))
            eval_seconds += time.perf_counter() - tick
            interval_start += time.perf_counter() - tick
    train_seconds = time.perf_counter() - train_start - eval_seconds

    params = grouped.combine(state.trainable, state.frozen)
    result = {
        "flags": {name: FLAGS[name].value for name in FLAGS_USED},
        "vit_params": int(num_params),
        "steps": FLAGS.num_steps,
        # Everything after the first (compiling) step: data, transfer, update.
        "s_per_step": (train_seconds - first_step_seconds) / max(1, FLAGS.num_steps - 1),
        "first_step_seconds": round(first_step_seconds, 1),
        "setup_seconds": round(setup_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "final_loss": float(np.mean(losses[-FLAGS.log_every :])),
        "logit_scale": float(model.apply({"params": params}, method=lambda m: m.logit_scale())),
        "test": evaluate(params, test),
        "train": evaluate(params, train),
    }
    if FLAGS.probe_layers:
        layers = [int(i) for i in FLAGS.probe_layers]
        result["probe"] = linear_probe(model, params, train, test, layers, attributes)
    if FLAGS.params_out:
        with open(FLAGS.params_out, "wb") as file:
            file.write(flax.serialization.to_bytes(jax.device_get(params["vision"])))
    print(json.dumps(result))


FLAGS_USED = (
    "patch_size", "width", "depth", "heads", "mlp_dim", "pooling", "cls_token", "embed_dim",
    "text_width", "text_layers", "logit_scale_init", "loss_form", "batch_size", "num_steps",
    "warmup_steps", "learning_rate", "weight_decay", "end_lr_fraction", "flip", "translate",
    "seed",
)  # fmt: skip

if __name__ == "__main__":
    app.run(main)
