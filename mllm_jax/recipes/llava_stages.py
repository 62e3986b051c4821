"""The LLaVA + VCE + Dual-LoRA recipe's training stages as ``trainer.TrainTask``s.

Every stage trains in ``<workdir>/<stage name>/`` and reads the stages before it from their
sibling directories (``checkpoint.load_trained_params``):

  stage0_vision  CLIPModel (ViT + text tower)           all params          captions
  stage0_lm      DecoderLM                              all params          VQA + document text
  stage1         MultimodalLM, no adapters              projector (VCE)     captions
  stage2         MultimodalLM + Dual-LoRA               adapters, projector VQA + multi-image docs
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mllm_jax import sharding
from mllm_jax.data import builders
from mllm_jax.data.packing import PackingSpec
from mllm_jax.data.pipeline import PipelineOptions
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.layers.lora_params import ADAPTER_PARAM_REGEX
from mllm_jax.models.multimodal_lm import MultimodalLM
from mllm_jax.recipes import llava_models
from mllm_jax.recipes.text_samples import text_only
from mllm_jax.train import checkpoint as checkpoint_lib
from mllm_jax.train import evaluate_vqa
from mllm_jax.train.multimodal_task import make_stream, multimodal_loss_fn, text_loss_fn
from mllm_jax.train.param_groups import ParamGroup
from mllm_jax.train.pretrained import nest_under
from mllm_jax.train.trainer import TrainResult, TrainTask, train

PROJECTOR_PATTERN = r"^projector/"
STAGE_SEEDS = {"stage0_vision": 0, "stage0_lm": 1, "stage1": 2, "stage2": 3}


def stage_dir(workdir: str | pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(workdir) / name


def tokenizer_path(config: Any) -> pathlib.Path:
    return pathlib.Path(
        config.data.tokenizer or pathlib.Path(config.data.data_dir) / "tokenizer.model"
    )


def load_tokenizer(config: Any) -> Tokenizer:
    tokenizer = Tokenizer.load(tokenizer_path(config))
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the tokenizer at {tokenizer_path(config)} has {tokenizer.vocab_size} ids but "
            f"model.vocab_size is {config.model.vocab_size}"
        )
    return tokenizer


def data_options(config: Any, dataset: str) -> dict:
    """The build options of ``dataset`` (they decide its directory: prepare and load agree)."""
    options = {}
    if config.data.max_examples is not None:
        options["max_examples"] = int(config.data.max_examples)
    if dataset == "multi_image":
        options["train_size"] = int(config.data.multi_image_train_size)
    return options


def load_source(config: Any, dataset: str, split: str) -> builders.SampleSource:
    return builders.load_samples(
        dataset, config.data.data_dir, split, **data_options(config, dataset)
    )


def mesh_and_rules(config: Any):
    return (
        sharding.create_mesh_from_config(config.mesh),
        sharding.logical_rules_from_config(config.mesh.logical_axis_rules),
    )


def stage_optimizer(config: Any, section: Any) -> ml_collections.ConfigDict:
    optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
    optimizer.warmup_steps = section.warmup_steps
    return optimizer


def stage_training(config: Any, section: Any) -> ml_collections.ConfigDict:
    training = ml_collections.ConfigDict(config.training.to_dict())
    training.num_steps = section.num_steps
    return training


def per_process(batch_size: int) -> int:
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size {batch_size} is not divisible by {jax.process_count()} hosts")
    return batch_size // jax.process_count()


def packing_spec(config: Any, section: Any, tokenizer: Tokenizer, max_images: int) -> PackingSpec:
    height, width = llava_models.vit_config(config).grid_shape()
    return PackingSpec(
        seq_len=section.seq_len,
        max_images=max_images,
        image_size=config.data.image_size,
        tokens_per_image=height * width,
        image_id=tokenizer.image_id,
        pad_id=tokenizer.pad_id,
    )


def pipeline_options(config: Any, section: Any, stage: str, *, augment: bool) -> PipelineOptions:
    return PipelineOptions(
        batch_size=per_process(section.batch_size),
        seed=config.seed * 100 + STAGE_SEEDS[stage],
        augment=augment,
        worker_count=config.data.worker_count,
        prefetch_batches=config.data.prefetch_batches,
        read_threads=config.data.read_threads,
        read_buffer_size=config.data.read_buffer_size,
    )


def config_json(config: Any) -> dict:
    return config.to_dict()


def stage0_lm_task(config: Any, tokenizer: Tokenizer) -> TrainTask:
    """Next-token pretraining of the decoder on the training text (images removed)."""
    section = config.stage0_lm
    model = llava_models.text_decoder(config)
    example = jnp.zeros((1, section.seq_len), jnp.int32)
    mixture = dict(section.mixture)

    def make_train_stream():
        sources = [text_only(load_source(config, name, "train")) for name in mixture]
        return make_stream(
            sources, list(mixture.values()), tokenizer,
            template=config.data.template, system_prompt=config.data.system_prompt,
            spec=packing_spec(config, section, tokenizer, max_images=1),
            options=pipeline_options(config, section, "stage0_lm", augment=False),
            text_only=True,
        )  # fmt: skip

    return TrainTask(
        name="stage0_lm",
        init_params=lambda rng: model.init(rng, example, segment_ids=example, positions=example)[
            "params"
        ],
        loss_fn=text_loss_fn(model),
        param_groups=[ParamGroup(name="lm", patterns=(".",), learning_rate=section.learning_rate)],
        make_train_stream=make_train_stream,
        config=config_json(config),
    )


def _multimodal_init(model: MultimodalLM, spec: PackingSpec):
    tokens = jnp.zeros((1, spec.seq_len), jnp.int32)
    images = jnp.zeros((1, spec.max_images, spec.image_size, spec.image_size, 3), jnp.float32)
    minus_one = jnp.full((1, spec.seq_len), -1, jnp.int32)

    def init(rng):
        return model.init(
            rng, tokens, segment_ids=tokens, positions=tokens, images=images,
            image_slot=minus_one, image_patch=minus_one,
        )["params"]  # fmt: skip

    return init


def caption_examples(source: builders.SampleSource, limit: int | None) -> list:
    """Captioning as a generation task: the image alone as the prompt, its caption the answer."""
    count = len(source) if limit is None else min(limit, len(source))
    examples = []
    for i in range(count):
        sample = source[i]
        examples.append(
            evaluate_vqa.VQAExample(
                id=sample.id, images=sample.images, question=sample.turns[0].text,
                answer=sample.turns[-1].text, question_type="caption",
            )
        )  # fmt: skip
    return examples


def _vqa_metrics(result: evaluate_vqa.VQAResult, prefix: str = "") -> dict[str, float]:
    metrics = {f"{prefix}accuracy": result.accuracy}
    metrics |= {f"{prefix}accuracy/{k}": v for k, v in result.per_type.items()}
    return metrics


def stage1_task(config: Any, tokenizer: Tokenizer, workdir: pathlib.Path) -> TrainTask:
    """Projector alignment on captions: ViT and LM frozen (from stage 0), VCE + projector train."""
    section = config.stage1
    mm_config = llava_models.multimodal_config(config, with_adapter=False)
    model = MultimodalLM(mm_config)
    spec = packing_spec(config, section, tokenizer, max_images=section.max_images)
    vision = checkpoint_lib.load_trained_params(stage_dir(workdir, "stage0_vision"))["vision"]
    lm = checkpoint_lib.load_trained_params(stage_dir(workdir, "stage0_lm"))
    test_captions = caption_examples(
        load_source(config, "easy_vqa_captions", "test"), config.stage2.eval_examples
    )

    def make_train_stream():
        return make_stream(
            [load_source(config, "easy_vqa_captions", "train")], [1.0], tokenizer,
            template=config.data.template, system_prompt=config.data.system_prompt, spec=spec,
            options=pipeline_options(config, section, "stage1", augment=True),
        )  # fmt: skip

    def evaluate(params):
        result = evaluate_vqa.evaluate_vqa(
            mm_config, params, tokenizer, test_captions, **_eval_kwargs(config)
        )
        return {"caption_accuracy": result.accuracy}

    return TrainTask(
        name="stage1",
        init_params=_multimodal_init(model, spec),
        loss_fn=multimodal_loss_fn(model),
        param_groups=[
            ParamGroup(
                name="projector",
                patterns=(PROJECTOR_PATTERN,),
                learning_rate=section.projector_learning_rate,
            )
        ],
        make_train_stream=make_train_stream,
        pretrained={"vision": vision} | nest_under("lm", lm),
        evaluate=evaluate,
        config=config_json(config),
    )


def _eval_kwargs(config: Any) -> dict:
    return dict(
        batch_size=config.evaluate.batch_size,
        template=config.data.template,
        system_prompt=config.data.system_prompt,
        max_new_tokens=config.evaluate.max_new_tokens,
    )


def easy_vqa_test_examples(config: Any, limit: int | None) -> list:
    source = load_source(config, "easy_vqa", "test")
    return evaluate_vqa.easy_vqa_examples(source.records, builders.easy_vqa.ANSWERS, limit)


def stage2_task(config: Any, tokenizer: Tokenizer, workdir: pathlib.Path) -> TrainTask:
    """Visual instruction tuning: Dual-LoRA + projector on VQA mixed with multi-image documents."""
    section = config.stage2
    mm_config = llava_models.multimodal_config(config, with_adapter=True)
    model = MultimodalLM(mm_config)
    spec = packing_spec(config, section, tokenizer, max_images=section.max_images)
    stage1 = checkpoint_lib.load_trained_params(stage_dir(workdir, "stage1"))
    mixture = dict(section.mixture)
    eval_examples = easy_vqa_test_examples(config, section.eval_examples)

    def make_train_stream():
        return make_stream(
            [load_source(config, name, "train") for name in mixture], list(mixture.values()),
            tokenizer, template=config.data.template, system_prompt=config.data.system_prompt,
            spec=spec, options=pipeline_options(config, section, "stage2", augment=True),
        )  # fmt: skip

    def evaluate(params):
        result = evaluate_vqa.evaluate_vqa(
            mm_config, params, tokenizer, eval_examples, **_eval_kwargs(config)
        )
        return _vqa_metrics(result)

    return TrainTask(
        name="stage2",
        init_params=_multimodal_init(model, spec),
        loss_fn=multimodal_loss_fn(model),
        param_groups=[
            ParamGroup(
                name="adapter",
                patterns=(ADAPTER_PARAM_REGEX,),
                learning_rate=section.adapter_learning_rate,
            ),
            ParamGroup(
                name="projector",
                patterns=(PROJECTOR_PATTERN,),
                learning_rate=section.projector_learning_rate,
            ),
        ],
        make_train_stream=make_train_stream,
        pretrained=stage1,
        evaluate=evaluate,
        adapter=llava_models.adapter_config(config),
        config=config_json(config),
    )


def run_task(config: Any, task: TrainTask, section: Any, workdir: pathlib.Path) -> TrainResult:
    mesh, rules = mesh_and_rules(config)
    logging.info("%s: mesh %s", task.name, dict(mesh.shape))
    return train(
        task,
        optimizer_config=stage_optimizer(config, section),
        training_config=stage_training(config, section),
        mesh=mesh,
        rules=rules,
        workdir=stage_dir(workdir, task.name),
        seed=config.seed * 100 + STAGE_SEEDS[task.name],
    )


def build_task(config: Any, stage: str, tokenizer: Tokenizer, workdir: pathlib.Path) -> TrainTask:
    if stage == "stage0_vision":
        from mllm_jax.recipes.vision_pretraining import stage0_vision_task

        return stage0_vision_task(config, tokenizer)
    if stage == "stage0_lm":
        return stage0_lm_task(config, tokenizer)
    if stage == "stage1":
        return stage1_task(config, tokenizer, workdir)
    if stage == "stage2":
        return stage2_task(config, tokenizer, workdir)
    raise ValueError(f"unknown training stage {stage!r}")


REQUIRES = {"stage1": ("stage0_vision", "stage0_lm"), "stage2": ("stage1",)}


def check_predecessors(stage: str, workdir: pathlib.Path) -> None:
    """Raises FileNotFoundError naming the earlier stages ``stage`` needs and has not got."""
    missing = [
        name
        for name in REQUIRES.get(stage, ())
        if not list((stage_dir(workdir, name) / "checkpoints").glob("[0-9]*/trainable"))
    ]
    if missing:
        raise FileNotFoundError(
            f"{stage} starts from the results of {missing}, which have no checkpoint under "
            f"{pathlib.Path(workdir).absolute()}; run configs/llava_vce.py:stage={missing[0]} "
            "(or stage=all) with this workdir first"
        )


def train_stage(config: Any, stage: str, workdir: pathlib.Path) -> TrainResult:
    """Builds and trains ``stage`` (resuming it if its directory holds checkpoints)."""
    check_predecessors(stage, workdir)
    tokenizer = load_tokenizer(config)
    task = build_task(config, stage, tokenizer, workdir)
    return run_task(config, task, config[stage], workdir)
