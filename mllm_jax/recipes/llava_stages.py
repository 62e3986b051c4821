"""The LLaVA + VCE + Dual-LoRA recipe's training stages as ``trainer.TrainTask``s.

Every stage trains in ``<workdir>/<stage name>/`` and reads the stages before it from their
sibling directories, or from a base run's (``llava_stage_dirs``):

  stage0_vision  CLIPModel (ViT + text tower)           all params          captions
  stage0_lm      DecoderLM                              all params          VQA + document text
  stage1         MultimodalLM, no adapters              projector (VCE)     captions
  stage2         MultimodalLM + Dual-LoRA               adapters, projector VQA + multi-image docs

Stage 2 alternatives: ``model.adapter.kind`` picks the adapter ("none" for no adapter), and
``stage2.train_lm`` (with ``model.adapter.kind="none"``) fine-tunes the whole LM at
``stage2.lm_learning_rate`` instead. Each stage's initialization, data order and dropout follow
``stage_seed(config, stage)``, which ``config.seed`` changes for every stage.

With ``model.init_from = "hf:DIR"`` (``llava_hf_base.py``) stage 0 is not run: stages 1 and 2
take the frozen tower and LM from DIR (read onto the mesh), stage 2 adds stage 1's trainable
params alone, and the tokenizer, chat template and image processor are DIR's.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from mllm_jax import sharding
from mllm_jax.checkpoint_conversion.hf_llava import abstract_llava_params
from mllm_jax.checkpoint_conversion.targets import param_targets
from mllm_jax.data import builders
from mllm_jax.data.hf_tokenizer import HFTokenizer
from mllm_jax.data.packing import PackingSpec
from mllm_jax.data.pipeline import PipelineOptions
from mllm_jax.data.sharded_stream import num_data_shards
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import ADAPTER_PARAM_REGEX
from mllm_jax.models.multimodal_lm import MultimodalLM
from mllm_jax.recipes import llava_data, llava_hf_base, llava_models
from mllm_jax.recipes.llava_data import load_source
from mllm_jax.recipes.llava_stage_config import config_json, stage_seed
from mllm_jax.recipes.llava_stage_dirs import check_predecessors, results_dir, stage_dir
from mllm_jax.recipes.text_samples import text_only
from mllm_jax.recipes.vision_pretraining import stage0_vision_task
from mllm_jax.train import checkpoint as checkpoint_lib
from mllm_jax.train import evaluate_vqa
from mllm_jax.train.losses import loss_chunk_size_from
from mllm_jax.train.multimodal_task import make_stream, multimodal_loss_fn, text_loss_fn
from mllm_jax.train.param_groups import ParamGroup
from mllm_jax.train.pretrained import nest_under
from mllm_jax.train.trainer import TrainResult, TrainTask, train

PROJECTOR_PATTERN = r"^projector/"
LM_PATTERN = r"^lm/"


def tokenizer_path(config: Any) -> pathlib.Path:
    """The sentencepiece file the recipe trains (or ``data.tokenizer``), or the imported
    checkpoint's directory (``model.init_from``)."""
    directory = llava_hf_base.hf_dir(config)
    if directory is not None:
        return directory
    return pathlib.Path(
        config.data.tokenizer or pathlib.Path(config.data.data_dir) / "tokenizer.model"
    )


def load_tokenizer(config: Any) -> Tokenizer | HFTokenizer:
    """The recipe's tokenizer (the imported checkpoint's with ``model.init_from``), checked to
    fit the model's vocabulary."""
    if llava_hf_base.hf_dir(config) is not None:
        tokenizer = llava_hf_base.load_tokenizer(config)
    else:
        tokenizer = Tokenizer.load(tokenizer_path(config))
    vocab_size = llava_models.multimodal_config(config, with_adapter=False).vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer at {tokenizer_path(config)} has {tokenizer.vocab_size} ids but "
            f"the model's vocabulary has {vocab_size}"
        )
    return tokenizer


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


def packing_spec(config: Any, section: Any, tokenizer: Tokenizer, max_images: int) -> PackingSpec:
    tokens_per_image = llava_models.multimodal_config(config, with_adapter=False).tokens_per_image
    return PackingSpec(
        seq_len=section.seq_len,
        max_images=max_images,
        image_size=llava_models.image_size(config),
        tokens_per_image=tokens_per_image,
        image_id=tokenizer.image_id,
        pad_id=tokenizer.pad_id,
    )


def pipeline_options(config: Any, section: Any, stage: str, *, augment: bool) -> PipelineOptions:
    return PipelineOptions(
        batch_size=section.batch_size,  # global: make_stream gives each process its share
        seed=stage_seed(config, stage),
        augment=augment,
        worker_count=config.data.worker_count,
        prefetch_batches=config.data.prefetch_batches,
        read_threads=config.data.read_threads,
        read_buffer_size=config.data.read_buffer_size,
    )


def train_stream(config: Any, stage: str, tokenizer: Tokenizer):
    """The packed training batches of ``stage0_lm``, ``stage1`` or ``stage2``, each stage's
    mixture in its proportions: text alone for stage0_lm, left-right flipped images for the
    others (not in stage 2 when its VQA answers name positions)."""
    section = config[stage]
    if stage == "stage0_lm":
        pairs = llava_data.mixture(section, config)
        sources = [text_only(load_source(config, name, "train")) for name, _ in pairs]
        max_images, augment = 1, False
    elif stage == "stage1":
        pairs = [("easy_vqa_captions", 1.0)]
        sources = [load_source(config, "easy_vqa_captions", "train")]
        max_images, augment = section.max_images, True
    elif stage == "stage2":
        pairs = llava_data.mixture(section, config)
        sources = [load_source(config, name, "train") for name, _ in pairs]
        max_images, augment = section.max_images, llava_data.flips_allowed(config)
    else:
        raise ValueError(f"{stage!r} has no packed training stream")
    return make_stream(
        sources, [weight for _, weight in pairs], tokenizer,
        template=llava_hf_base.chat_template(config), system_prompt=config.data.system_prompt,
        spec=packing_spec(config, section, tokenizer, max_images=max_images),
        options=pipeline_options(config, section, stage, augment=augment),
        text_only=stage == "stage0_lm", preprocessing=llava_models.image_processor(config),
        num_shards=num_data_shards(config.data),
    )  # fmt: skip


def stage0_lm_task(config: Any, tokenizer: Tokenizer) -> TrainTask:
    """Next-token pretraining of the decoder on the training text (images removed)."""
    section = config.stage0_lm
    model = llava_models.text_decoder(config)
    example = jnp.zeros((1, section.seq_len), jnp.int32)

    return TrainTask(
        name="stage0_lm",
        init_params=lambda rng: model.init(rng, example, segment_ids=example, positions=example)[
            "params"
        ],
        loss_fn=text_loss_fn(model, loss_chunk_size=loss_chunk_size_from(config.model)),
        param_groups=[ParamGroup(name="lm", patterns=(".",), learning_rate=section.learning_rate)],
        make_train_stream=lambda: train_stream(config, "stage0_lm", tokenizer),
        config=config_json(config),
    )


def _multimodal_init(model: MultimodalLM, spec: PackingSpec):
    return _multimodal_init_at(model, spec.seq_len, spec.max_images, spec.image_size)


def _multimodal_init_at(model: MultimodalLM, seq_len: int, max_images: int, image_size: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    images = jnp.zeros((1, max_images, image_size, image_size, 3), jnp.float32)
    minus_one = jnp.full((1, seq_len), -1, jnp.int32)

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


def stage1_pretrained(config: Any, workdir: pathlib.Path) -> dict:
    """Stage 1's frozen tower and LM (and, for an imported MLP projector, its start): stage 0's
    results, or the imported checkpoint's."""
    if llava_hf_base.hf_dir(config) is not None:
        return llava_hf_base.load_base_params(config, *mesh_and_rules(config))
    vision_dir = results_dir(config, workdir, "stage0_vision")
    vision = checkpoint_lib.load_trained_params(vision_dir)["vision"]
    lm = checkpoint_lib.load_trained_params(results_dir(config, workdir, "stage0_lm"))
    return {"vision": vision} | nest_under("lm", lm)


def stage1_task(config: Any, tokenizer: Tokenizer, workdir: pathlib.Path) -> TrainTask:
    """Projector alignment on captions: ViT and LM frozen (from stage 0 or the imported
    checkpoint), VCE + projector train."""
    task = stage_step_task(config, "stage1")
    mm_config = llava_models.multimodal_config(config, with_adapter=False)
    pretrained = stage1_pretrained(config, workdir)
    test_captions = caption_examples(
        load_source(config, "easy_vqa_captions", "test"), config.stage2.eval_examples
    )

    def evaluate(params):
        result = evaluate_vqa.evaluate_vqa(
            mm_config, params, tokenizer, test_captions, **_eval_kwargs(config)
        )
        return {"caption_accuracy": result.accuracy}

    return dataclasses.replace(
        task,
        make_train_stream=lambda: train_stream(config, "stage1", tokenizer),
        pretrained=pretrained,
        evaluate=evaluate if config.stage2.eval_examples else None,
    )


def stage_step_task(config: Any, stage: str) -> TrainTask:
    """Stage 1's or 2's model, loss and trained parameter groups alone: no tokenizer, data,
    evaluation or earlier stages' weights.

    ``stage1_task`` / ``stage2_task`` add those to train it; ``trainer.prepare_step(abstract=
    True)`` compiles its step as it is (``mllm_jax.aot``: a TPU topology's memory and FLOPs).
    """
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage_step_task builds 'stage1' or 'stage2', not {stage!r}")
    section = config[stage]
    with_adapter = stage == "stage2"
    model = MultimodalLM(llava_models.multimodal_config(config, with_adapter=with_adapter))
    if with_adapter:
        param_groups = stage2_param_groups(config)
    else:
        param_groups = [
            ParamGroup(
                name="projector", patterns=(PROJECTOR_PATTERN,),
                learning_rate=section.projector_learning_rate,
            )
        ]  # fmt: skip

    def no_stream():
        raise RuntimeError(f"{stage} was built without data (stage_step_task); use {stage}_task")

    return TrainTask(
        name=stage,
        init_params=_multimodal_init_at(
            model, section.seq_len, section.max_images, llava_models.image_size(config)
        ),
        loss_fn=multimodal_loss_fn(model, loss_chunk_size=loss_chunk_size_from(config.model)),
        param_groups=param_groups,
        make_train_stream=no_stream,
        adapter=llava_models.adapter_config(config) if with_adapter else AdapterConfig(),
        config=config_json(config),
    )


def _eval_kwargs(config: Any) -> dict:
    return dict(
        batch_size=config.evaluate.batch_size,
        template=llava_hf_base.chat_template(config),
        system_prompt=config.data.system_prompt,
        max_new_tokens=config.evaluate.max_new_tokens,
        preprocessing=llava_models.image_processor(config),
    )


def stage2_param_groups(config: Any) -> list[ParamGroup]:
    """What stage 2 trains: the projector, and the adapters (``model.adapter.kind`` other than
    "none") or, with ``stage2.train_lm``, the whole LM; the vision tower stays frozen.

    Raises:
      ValueError: ``stage2.train_lm`` with an adapter (the LM's own weights would train under
        the adapter's).
    """
    section = config.stage2
    projector = ParamGroup(
        name="projector", patterns=(PROJECTOR_PATTERN,),
        learning_rate=section.projector_learning_rate,
    )  # fmt: skip
    adapter_kind = config.model.adapter.kind
    if section.train_lm:
        if adapter_kind != "none":
            raise ValueError(
                f"stage2.train_lm fine-tunes the whole LM; set model.adapter.kind='none' "
                f"(it is {adapter_kind!r})"
            )
        lm = ParamGroup(name="lm", patterns=(LM_PATTERN,), learning_rate=section.lm_learning_rate)
        return [lm, projector]
    if adapter_kind == "none":
        return [projector]
    adapter = ParamGroup(
        name="adapter", patterns=(ADAPTER_PARAM_REGEX,),
        learning_rate=section.adapter_learning_rate,
    )  # fmt: skip
    return [adapter, projector]


def stage2_task(config: Any, tokenizer: Tokenizer, workdir: pathlib.Path) -> TrainTask:
    """Visual instruction tuning (``stage2_param_groups``) on ``data.vqa_dataset`` mixed with
    multi-image documents."""
    task = stage_step_task(config, "stage2")
    section = config.stage2
    mm_config = llava_models.multimodal_config(config, with_adapter=True)
    stage1 = trained_params(config, results_dir(config, workdir, "stage1"))
    eval_examples = llava_data.vqa_test_examples(config, section.eval_examples)

    def evaluate(params):
        result = evaluate_vqa.evaluate_vqa(
            mm_config, params, tokenizer, eval_examples, **_eval_kwargs(config)
        )
        return _vqa_metrics(result)

    return dataclasses.replace(
        task,
        make_train_stream=lambda: train_stream(config, "stage2", tokenizer),
        pretrained=stage1,
        evaluate=evaluate if section.eval_examples else None,
    )


def trained_params(config: Any, directory: pathlib.Path) -> dict:
    """The full params a finished stage 1 or 2 left in ``directory``: its checkpoint with its
    saved base weights, or, with ``model.init_from``, its trainable params over the imported
    checkpoint's, both read straight onto the run's mesh (the stage's copy of the base is not
    read)."""
    if llava_hf_base.hf_dir(config) is None:
        return checkpoint_lib.load_trained_params(directory)
    mesh, rules = mesh_and_rules(config)
    model = MultimodalLM(llava_models.multimodal_config(config, with_adapter=True))
    targets = param_targets(abstract_llava_params(model), mesh, rules)
    trainable = checkpoint_lib.load_trainable_params(
        directory, {path: target.sharding for path, target in targets.items()}
    )
    flat = traverse_util.flatten_dict(llava_hf_base.load_base_params(config, mesh, rules))
    flat |= traverse_util.flatten_dict(trainable)
    return traverse_util.unflatten_dict(flat)


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
        seed=stage_seed(config, task.name),
    )


def build_task(config: Any, stage: str, tokenizer: Tokenizer, workdir: pathlib.Path) -> TrainTask:
    if stage == "stage0_vision":
        return stage0_vision_task(config, tokenizer)
    if stage == "stage0_lm":
        return stage0_lm_task(config, tokenizer)
    if stage == "stage1":
        return stage1_task(config, tokenizer, workdir)
    if stage == "stage2":
        return stage2_task(config, tokenizer, workdir)
    raise ValueError(f"unknown training stage {stage!r}")


def train_stage(config: Any, stage: str, workdir: pathlib.Path) -> TrainResult:
    """Builds and trains ``stage`` (resuming it if its directory holds checkpoints)."""
    check_predecessors(config, stage, workdir)
    tokenizer = load_tokenizer(config)
    task = build_task(config, stage, tokenizer, workdir)
    return run_task(config, task, config[stage], workdir)
