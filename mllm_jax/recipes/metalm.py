"""The METALM recipe (SPEC §4): causal vs prefix-LM vs semi-causal on the same data and budget.

  text  (configs/metalm_text.py)  language modelling on the stdlib docstrings; each mode trains
        with its own span layout (causal: none used, prefix: one prefix per segment, semi-causal:
        random spans), then every mode is scored on the same held-out targets: the windows of
        the held-out documents with one prefix span per segment drawn from a fixed seed, Eq. 1's
        targets (the tokens after each prefix, and all tokens of segments too short for one).
  vl    (configs/metalm_vl.py)    vision-language pretraining on easy-VQA image captions (the
        span is the image plus a random-length text prefix), zero-shot easy-VQA with the prompt
        "question: {q} answer:", then fine-tuning on easy-VQA questions (the span is the prompt)
        and the same evaluation. Answers are ranked by likelihood among the 13 easy-VQA answers.

Every mode trains with ``trainer.train`` in ``<workdir>/<setting>_<mode>[_finetune]/``;
``results.json`` in the workdir holds the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from mllm_jax import sharding
from mllm_jax.data import builders, text_corpus
from mllm_jax.data.builders import easy_vqa
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.packing import PackableSample, PackingSpec, RowBuilder
from mllm_jax.data.pipeline import PipelineOptions
from mllm_jax.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from mllm_jax.data.span_sampling import (
    SpanBatchStream,
    SpanSamplingConfig,
    row_rng,
    sample_span_ids,
)
from mllm_jax.data.templates import tokenize_sample
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.layers.vit import ViTConfig
from mllm_jax.models.decoder_lm import transformer_config_from
from mllm_jax.models.semi_causal_lm import SemiCausalConfig, SemiCausalLM
from mllm_jax.train import semi_causal_task as task_lib
from mllm_jax.train.losses import loss_chunk_size_from
from mllm_jax.train.multimodal_task import make_stream
from mllm_jax.train.param_groups import ParamGroup
from mllm_jax.train.trainer import TrainResult, TrainTask, train

VQA_PROMPT = IMAGE_PLACEHOLDER + "question: {question} answer:"
# The training span layout of each mode (a causal model ignores its spans).
TEXT_LAYOUTS = {"causal": "random", "prefix": "prefix", "semi_causal": "random"}
EVAL_SEED = 1234


def model_config(config: Any, mode: str) -> SemiCausalConfig:
    """The SemiCausalConfig of ``mode`` from the config's model / encoder / spans sections."""
    encoder_section = ml_collections.ConfigDict(config.model.to_dict())
    encoder_section.update(config.encoder.to_dict())
    vision = None
    if "vision" in config:
        v = config.vision
        vision = ViTConfig(
            image_size=config.data.image_size, patch_size=v.patch_size, width=v.width,
            num_layers=v.num_layers, num_heads=v.num_heads, mlp_dim=v.mlp_dim,
        )  # fmt: skip
    return SemiCausalConfig(
        vocab_size=config.model.vocab_size,
        embed_dim=config.model.embed_dim,
        decoder=transformer_config_from(config.model),
        mode=mode,
        tie_embeddings=config.model.tie_embeddings,
        encoder=transformer_config_from(encoder_section),
        encoder_embed_dim=config.encoder.embed_dim,
        connector_layers=config.connector.num_layers,
        connector_hidden_dim=config.connector.hidden_dim,
        max_spans=config.spans.max_spans,
        max_span_length=config.spans.max_span_length,
        vision=vision,
    )


def _span_config(config: Any, layout: str) -> SpanSamplingConfig:
    s = config.spans
    return SpanSamplingConfig(
        layout=layout, min_length=s.min_length, max_length=s.max_length, fraction=s.fraction
    )


def _with_spans(stream, config: Any, layout: str, seed: int, *, images: bool = False):
    return SpanBatchStream(
        stream, _span_config(config, layout), seed=seed, max_spans=config.spans.max_spans,
        max_span_length=config.spans.max_span_length, images_in_spans=images,
    )  # fmt: skip


def _fixed_batches(rows: dict, batch_size: int, config: Any, layout: str) -> list[dict]:
    """Held-out rows cut into batches, with span ids drawn from ``EVAL_SEED``."""
    sampler = _with_spans(iter(()), config, layout, EVAL_SEED)
    count = len(rows["tokens"]) // batch_size * batch_size
    batches = []
    for index, start in enumerate(range(0, count, batch_size)):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        batch["span_ids"] = sampler.span_ids_of(batch, index)
        batches.append(batch)
    return batches


def _task(config, section, model, example: dict, loss_fn, stream_fn, evaluate, name, pretrained):
    def init_params(rng):
        return model.init(rng, example["tokens"], **_model_kwargs(example))["params"]

    return TrainTask(
        name=name,
        init_params=init_params,
        loss_fn=loss_fn,
        param_groups=[ParamGroup(name="all", patterns=(".",), learning_rate=section.learning_rate)],
        make_train_stream=stream_fn,
        pretrained=pretrained,
        evaluate=evaluate,
        config=config.to_dict(),
    )


def _model_kwargs(batch: dict) -> dict:
    keys = ("segment_ids", "positions", "span_ids") + task_lib.IMAGE_KEYS
    return {k: batch[k] for k in keys if k in batch}


def step_task(config: Any, mode: str, stage: str, example: dict) -> TrainTask:
    """``mode``'s model, loss and parameter group at ``stage`` ("train" in the text setting,
    "pretrain" or "finetune" in the vision-language one) without data, evaluation or earlier
    weights: what ``trainer.prepare_step(abstract=True)`` compiles (``mllm_jax.aot``).

    ``example``: a batch of the stage's fields (span_ids included), read for its shapes only.
    """
    model = SemiCausalLM(model_config(config, mode))
    loss_chunk_size = loss_chunk_size_from(config.model)
    loss_fn = task_lib.semi_causal_loss_fn(model, loss_chunk_size=loss_chunk_size)
    name = f"text_{mode}" if config.setting == "text" else f"vl_{mode}_{stage}"

    def no_stream():
        raise RuntimeError(f"{name} was built without data (step_task)")

    return _task(config, config[stage], model, example, loss_fn, no_stream, None, name, None)


def stage_schedule(
    config: Any, section: Any
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The optimizer and training sections of a stage: its warmup and number of steps."""
    optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
    optimizer.warmup_steps = section.warmup_steps
    training = ml_collections.ConfigDict(config.training.to_dict())
    training.num_steps = section.num_steps
    return optimizer, training


def _run(config: Any, task: TrainTask, section: Any, workdir: pathlib.Path, seed: int):
    optimizer, training = stage_schedule(config, section)
    return train(
        task,
        optimizer_config=optimizer,
        training_config=training,
        mesh=sharding.create_mesh_from_config(config.mesh),
        rules=sharding.logical_rules_from_config(config.mesh.logical_axis_rules),
        workdir=workdir / task.name,
        seed=seed,
    )


@functools.cache
def _text_datasets(seq_len: int, eval_percent: int):
    return text_corpus.make_text_datasets(seq_len, eval_percent)


def run_text(config: Any, mode: str, workdir: pathlib.Path) -> dict:
    """Trains ``mode`` on the docstrings; its held-out loss on the shared targets."""
    d = config.data
    train_set, eval_set = _text_datasets(d.seq_len, d.eval_percent)
    model = SemiCausalLM(model_config(config, mode))
    loss_chunk_size = loss_chunk_size_from(config.model)
    eval_rows = {k: np.stack([eval_set[i][k] for i in range(len(eval_set))]) for k in eval_set[0]}
    eval_rows = {k: v[: d.eval_batches * d.batch_size] for k, v in eval_rows.items()}
    eval_batches = _fixed_batches(eval_rows, d.batch_size, config, "prefix")
    heldout = task_lib.make_heldout_loss(model, loss_chunk_size=loss_chunk_size)
    loss_fn = task_lib.semi_causal_loss_fn(model, loss_chunk_size=loss_chunk_size)

    def stream_fn():
        stream = text_corpus.batched_stream(
            train_set, d.batch_size, seed=config.seed,
            shard_index=jax.process_index(), num_shards=jax.process_count(),
        )  # fmt: skip
        return _with_spans(stream, config, TEXT_LAYOUTS[mode], config.seed)

    task = _task(
        config, config.train, model, eval_batches[0], loss_fn,
        stream_fn, lambda params: {"heldout_loss": heldout(params, eval_batches)},
        f"text_{mode}", None,
    )  # fmt: skip
    result = _run(config, task, config.train, workdir, config.seed)
    return {"heldout_loss": result.history[-1]["eval_heldout_loss"], "steps": result.step}


class VQAPrompt:
    """easy_vqa record -> Sample ``<image>question: {q} answer:`` + assistant ``" {a}"``."""

    def __call__(self, record: dict) -> Sample:
        sample = easy_vqa.to_sample(record)
        question = sample.turns[0].text.replace(IMAGE_PLACEHOLDER, "").strip()
        turns = (
            Turn(role="user", text=VQA_PROMPT.format(question=question)),
            Turn(role="assistant", text=" " + sample.turns[-1].text),
        )
        return dataclasses.replace(sample, turns=turns)


def _vl_spec(config: Any, section: Any, tokenizer: Tokenizer, model: SemiCausalLM) -> PackingSpec:
    height, width = model.config.vision.grid_shape()
    return PackingSpec(
        seq_len=section.seq_len, max_images=section.max_images,
        image_size=config.data.image_size, tokens_per_image=height * width,
        image_id=tokenizer.image_id, pad_id=tokenizer.pad_id,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RankingSet:
    """Candidate rows of every (question, answer) pair, question-major, and the images."""

    rows: dict  # [Q·A, N] contract fields, span_ids included; images stored per question
    images: np.ndarray  # [Q, H, W, 3]
    labels: np.ndarray  # [Q] answer index
    types: list[str]


def ranking_set(config: Any, tokenizer: Tokenizer, spec: PackingSpec) -> RankingSet:
    """The first ``evaluate.num_questions`` easy-VQA test questions x the 13 answers.

    Each row is the prompt and one answer; only the answer's tokens are scored (its EOS is
    not, so a zero-shot model is not judged on where it would stop). The span is the prompt.
    """
    source = builders.load_samples("easy_vqa", config.data.data_dir, "test")
    count = min(config.evaluate.num_questions, len(source))
    preprocess = ImagePreprocessing(size=spec.image_size)
    prompt = VQAPrompt()
    rows, images, labels, types = [], [], [], []
    span_config = SpanSamplingConfig(layout="prompt")
    for q in range(count):
        record = source.records[q]
        sample = prompt(record)
        images.append(preprocess(sample.images[0], sample.id, "image"))
        labels.append(int(record["answer"]))
        types.append(("shape", "color", "yes_no")[int(record["question_type"])])
        for answer in easy_vqa.ANSWERS:
            candidate = dataclasses.replace(
                sample, turns=(sample.turns[0], Turn(role="assistant", text=" " + answer))
            )
            tokenized = tokenize_sample(
                candidate, tokenizer, template="plain", tokens_per_image=spec.tokens_per_image
            )
            builder = RowBuilder(dataclasses.replace(spec, max_images=1))
            builder.add(PackableSample(
                id=candidate.id, tokens=tokenized.tokens, supervised=tokenized.supervised,
                images=np.zeros((1, spec.image_size, spec.image_size, 3), np.float32),
            ))  # fmt: skip
            row = {k: v for k, v in builder.build().items() if k not in ("images", "image_mask")}
            row["loss_mask"] = row["loss_mask"] * (row["targets"] != tokenizer.eos_id)
            row["span_ids"] = sample_span_ids(
                row["segment_ids"], span_config, row_rng(0, 0, 0), loss_mask=row["loss_mask"]
            )
            rows.append(row)
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return RankingSet(stacked, np.stack(images), np.asarray(labels), types)


def vqa_accuracy(model: SemiCausalLM, params: Any, data: RankingSet, batch_size: int) -> dict:
    """Accuracy (overall and per question type) of likelihood ranking over the answers."""
    scorer = task_lib.make_sequence_scorer(model)
    num_answers = len(easy_vqa.ANSWERS)
    total = len(data.rows["tokens"])
    scores = []
    for start in range(0, total, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), total - 1)  # pad by repeating
        batch = {k: v[index] for k, v in data.rows.items()}
        batch["images"] = data.images[index // num_answers][:, None]
        scores.append(np.asarray(scorer(params, batch))[: total - start])
    predicted = np.concatenate(scores).reshape(-1, num_answers).argmax(axis=1)
    hits = predicted == data.labels
    types = np.asarray(data.types)
    result = {"accuracy": float(hits.mean())}
    result |= {f"accuracy/{t}": float(hits[types == t].mean()) for t in sorted(set(data.types))}
    return result


def run_vl(config: Any, mode: str, workdir: pathlib.Path) -> dict:
    """Pretrains ``mode`` on captions, scores zero-shot VQA, fine-tunes on VQA, scores again."""
    tokenizer = Tokenizer.load(pathlib.Path(config.data.data_dir) / "tokenizer.model")
    model = SemiCausalLM(model_config(config, mode))
    loss_fn = task_lib.semi_causal_loss_fn(
        model, loss_chunk_size=loss_chunk_size_from(config.model)
    )
    results = {}
    pretrained = None
    eval_set = ranking_set(config, tokenizer, _vl_spec(config, config.finetune, tokenizer, model))
    for stage, dataset, to_sample, layout in (
        ("pretrain", "easy_vqa_captions", None, "image_prefix"),
        ("finetune", "easy_vqa", VQAPrompt(), "prompt"),
    ):
        section = config[stage]
        spec = _vl_spec(config, section, tokenizer, model)
        source = builders.load_samples(dataset, config.data.data_dir, "train")
        if to_sample is not None:
            source = builders.SampleSource(records=source.records, to_sample=to_sample)
        options = PipelineOptions(
            batch_size=section.batch_size, seed=config.seed,  # global (make_stream shards it)
            prefetch_batches=config.data.prefetch_batches,
        )  # fmt: skip

        def stream_fn(source=source, spec=spec, options=options, layout=layout):
            stream = make_stream(
                [source], [1.0], tokenizer, template="plain", system_prompt="", spec=spec,
                options=options,
            )  # fmt: skip
            return _with_spans(stream, config, layout, config.seed, images=mode == "semi_causal")

        example = next(stream_fn())

        def evaluate(params):
            return vqa_accuracy(model, params, eval_set, config.evaluate.batch_size)

        name = f"vl_{mode}_{stage}"
        task = _task(
            config, section, model, example, loss_fn, stream_fn,
            evaluate, name, pretrained,
        )  # fmt: skip
        result: TrainResult = _run(config, task, section, workdir, config.seed)
        pretrained = jax.device_get(result.params)
        final = result.history[-1]
        label = "zero_shot" if stage == "pretrain" else "finetuned"
        results[f"{label}_train_loss"] = final["loss"]
        results |= {
            f"{label}_{k[len('eval_') :]}": v
            for k, v in final.items()
            if k.startswith("eval_accuracy")
        }
    return results


def run(config: Any, workdir: str | pathlib.Path) -> dict:
    """Trains and evaluates every mode of ``config.modes``; writes ``results.json``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_mode = run_text if config.setting == "text" else run_vl
    results = {}
    for mode in config.modes:
        results[mode] = run_mode(config, mode, workdir)
        logging.info("metalm %s %s: %s", config.setting, mode, results[mode])
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results
