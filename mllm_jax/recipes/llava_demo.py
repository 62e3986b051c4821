"""The main job end to end: prepare data, train stages 0-2, evaluate, write ``results.json``.

``run(config, workdir)`` runs ``config.stage`` ("all" or one stage name, see
``configs/llava_vce.py``). With "all", a training stage whose final checkpoint already exists is
not trained again, an interrupted stage resumes from its latest checkpoint, and the stages a
config reuses from a base run (``llava_stage_dirs``) are read from there, never trained here.
With ``model.init_from`` (``llava_hf_base``) both stage-0 stages are skipped and no tokenizer is
trained: the imported checkpoint provides the tower, the LM and the tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mllm_jax.data import builders
from mllm_jax.data.tokenizer import train_tokenizer
from mllm_jax.generate import PROMPT_FILE
from mllm_jax.models.saved_model import save_model
from mllm_jax.recipes import llava_data, llava_hf_base, llava_models, llava_stage_dirs, llava_stages
from mllm_jax.recipes.llava_stage_config import check_stage_section
from mllm_jax.train import evaluate_vqa
from mllm_jax.train.param_groups import group_of, tree_bytes
from mllm_jax.train.summary_table import format_key_values, format_table

TRAINING_STAGES = ("stage0_vision", "stage0_lm", "stage1", "stage2")
IMPORTED_STAGES = ("stage0_vision", "stage0_lm")  # what model.init_from provides instead
WALL_START_ENV = "MLLM_JAX_WALL_START"  # epoch seconds the caller (make demo) started at


def prepare(config: Any) -> dict:
    """Builds the datasets the config reads (``llava_data.prepared_datasets``) and trains the
    tokenizer into ``config.data.data_dir``, each only if absent (no tokenizer is trained for an
    imported checkpoint: it brings its own)."""
    tfds.disable_progress_bar()
    sizes = {}
    for name in llava_data.prepared_datasets(config):
        sizes[name] = builders.prepare(
            name, config.data.data_dir, **llava_data.data_options(config, name)
        )
        logging.info("%s: %s", name, sizes[name])
    path = llava_stages.tokenizer_path(config)
    if llava_hf_base.hf_dir(config) is None and not path.exists():
        texts = llava_data.tokenizer_texts(config)
        train_tokenizer(texts, str(path.with_suffix("")), config.data.tokenizer_vocab_size)
    tokenizer = llava_stages.load_tokenizer(config)
    logging.info("tokenizer %s: %d ids", path, tokenizer.vocab_size)
    return sizes


def _stage_finished(config: Any, workdir: pathlib.Path, stage: str) -> bool:
    directory = llava_stage_dirs.stage_dir(workdir, stage)
    return llava_stage_dirs.final_checkpoint(config, directory, stage).exists()


def _directory_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evaluate(config: Any, workdir: pathlib.Path, started: float) -> dict:
    """Scores the stage-2 model on the test splits and writes ``workdir/results.json``.

    ``vqa_test_accuracy`` is the accuracy on ``data.vqa_dataset`` (named by ``vqa_dataset``);
    for the default easy-VQA it is also written as ``easy_vqa_test_accuracy``.
    """
    tokenizer = llava_stages.load_tokenizer(config)
    mm_config = llava_models.multimodal_config(config, with_adapter=True)
    stage2_dir = llava_stage_dirs.stage_dir(workdir, "stage2")
    params = llava_stages.trained_params(config, stage2_dir)
    kwargs = llava_stages._eval_kwargs(config)
    limit = config.evaluate.test_examples

    eval_started = time.perf_counter()
    vqa_dataset = llava_data.vqa_dataset(config)
    test = llava_data.vqa_test_examples(config, limit)
    result = evaluate_vqa.evaluate_vqa(mm_config, params, tokenizer, test, **kwargs)
    blind_indices = spread_indices(len(test), config.evaluate.vision_blind_examples)
    blind_test = [test[i] for i in blind_indices]
    blind = evaluate_vqa.evaluate_vqa(
        mm_config, params, tokenizer, blind_test, zero_images=True, **kwargs
    )
    # The model with its images on exactly the control's questions, for a like-for-like gap.
    sighted_predictions = [result.predictions[i] for i in blind_indices]
    sighted_accuracy, _ = evaluate_vqa.score(blind_test, sighted_predictions)
    per_image = mm_config.tokens_per_image
    multi = evaluate_vqa.document_examples(
        llava_stages.load_source(config, "multi_image", "test"), tokenizer,
        tokens_per_image=per_image, limit=limit,
    )  # fmt: skip
    multi_result = evaluate_vqa.evaluate_vqa(mm_config, params, tokenizer, multi, **kwargs)
    eval_seconds = time.perf_counter() - eval_started

    model_dir = workdir / "model"
    save_model(
        model_dir, mm_config, params, llava_stages.tokenizer_path(config),
        image_processor_config=llava_models.image_processor_config(config),
    )  # fmt: skip
    template = llava_hf_base.chat_template(config)
    (model_dir / PROMPT_FILE).write_text(
        json.dumps(
            {
                "template": template,
                "system_prompt": config.data.system_prompt,
                "trained_length": config.stage2.seq_len,
            }
        )
    )
    latest = max(int(p.name) for p in (stage2_dir / "checkpoints").iterdir() if p.name.isdigit())
    trainable_dir = stage2_dir / "checkpoints" / str(latest) / "trainable"
    stage2_history = evaluate_vqa_history(stage2_dir)
    results = {
        **({"easy_vqa_test_accuracy": result.accuracy} if vqa_dataset == "easy_vqa" else {}),
        "vqa_dataset": vqa_dataset,
        "vqa_test_accuracy": result.accuracy,
        "per_type": result.per_type,
        "multi_image_accuracy": multi_result.accuracy,
        "multi_image_per_type": multi_result.per_type,
        "vision_blind_accuracy": blind.accuracy,
        "vision_blind_per_type": blind.per_type,
        "vision_blind_questions": blind.count,
        "with_images_accuracy_on_vision_blind_questions": sighted_accuracy,
        "test_questions": result.count,
        "multi_image_questions": multi_result.count,
        "trainable_params": stage2_history["trainable_params"],
        "total_params": stage2_history["total_params"],
        "adapter_checkpoint_bytes": _directory_bytes(trainable_dir),
        "trainable_bytes": tree_bytes(_trainable_subset(config, params)),
        "checkpoint_step_bytes": _directory_bytes(trainable_dir.parent),
        "eval_seconds": eval_seconds,
        "wall_seconds": time.time() - started,
        "paths": {
            "checkpoints": str(stage2_dir / "checkpoints"),
            "base_params": str(stage2_dir / "base_params"),
            "tensorboard": str(workdir),
            "plots": [str(p) for p in sorted(workdir.glob("*/plots/*.png"))],
            "model": str(model_dir),
            "init_from": str(llava_hf_base.hf_dir(config) or ""),
            "reused_stages": {
                stage: str(llava_stage_dirs.results_dir(config, workdir, stage))
                for stage in llava_stage_dirs.reused_stages(config)
            },
        },
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    _print_report(results, test, result, workdir)
    return results


def _trainable_subset(config: Any, params: dict) -> dict:
    from flax import traverse_util

    groups = llava_stages.stage2_param_groups(config)
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: v for k, v in flat.items() if group_of(groups, k) is not None}


def spread_indices(count: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spaced over ``range(count)`` (all of them if ``limit`` is None):
    every part of the split, so every image and question template, stays represented."""
    if limit is None or limit >= count:
        return list(range(count))
    if limit <= 0:
        raise ValueError(f"evaluate.vision_blind_examples must be positive or None, got {limit}")
    return [int(i) for i in np.linspace(0, count - 1, limit).round()]


def evaluate_vqa_history(stage_dir: pathlib.Path) -> dict:
    """Parameter counts of a finished stage, from its ``summary.json``."""
    return json.loads((stage_dir / "summary.json").read_text())


def _print_report(results: dict, test: list, result, workdir: pathlib.Path) -> None:
    rows = [{"split": f"{results['vqa_dataset']} test", "questions": results["test_questions"],
             "accuracy": results["vqa_test_accuracy"],
             **results["per_type"]},
            {"split": "vision-blind control", "questions": results["vision_blind_questions"],
             "accuracy": results["vision_blind_accuracy"], **results["vision_blind_per_type"]},
            {"split": "multi-image test", "questions": results["multi_image_questions"],
             "accuracy": results["multi_image_accuracy"]}]  # fmt: skip
    print("\n" + format_table(rows), flush=True)
    examples_dir = workdir / "examples"
    examples_dir.mkdir(exist_ok=True)
    shown = []
    rng = np.random.default_rng(0)
    for index in rng.choice(len(test), size=min(6, len(test)), replace=False):
        example, prediction = test[int(index)], result.predictions[int(index)]
        image_path = examples_dir / (example.id.replace("/", "_") + ".png")
        image_path.write_bytes(example.images[0])
        shown.append({"image": str(image_path), "question": example.question,
                      "answer": example.answer, "model": prediction})  # fmt: skip
    print("\n" + format_table(shown), flush=True)
    print(
        "\n"
        + format_key_values(
            {
                "results": str(workdir / "results.json"),
                "adapter checkpoints": results["paths"]["checkpoints"],
                "base weights": results["paths"]["base_params"],
                "TensorBoard": f"tensorboard --logdir {workdir}",
                "plots": str(workdir / "*/plots"),
                "saved model": results["paths"]["model"],
                "wall seconds": results["wall_seconds"],
            },
            title="where things are",
        ),
        flush=True,
    )


def _check_stage_sections(config: Any, stages: tuple[str, ...], reused: Any) -> None:
    """Checks the config section of every stage this run may train, before any compiles."""
    imported = llava_hf_base.hf_dir(config) is not None
    trained = [
        stage
        for stage in stages
        if stage in TRAINING_STAGES
        and stage not in reused
        and not (imported and stage in IMPORTED_STAGES)
    ]
    if not trained:
        return
    mesh, rules = llava_stages.mesh_and_rules(config)
    tokens_per_image = llava_models.multimodal_config(config, with_adapter=False).tokens_per_image
    for stage in trained:
        check_stage_section(
            config, stage, mesh=mesh, rules=rules, tokens_per_image=tokens_per_image
        )


def run(config: Any, workdir: str | pathlib.Path) -> dict | None:
    """Runs ``config.stage`` ("all" or one stage) in ``workdir``; the results if evaluated."""
    started = float(os.environ.get(WALL_START_ENV, time.time()))
    llava_hf_base.check_init_from(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    stages = (
        ("prepare",) + TRAINING_STAGES + ("evaluate",) if config.stage == "all" else (config.stage,)
    )
    reused = llava_stage_dirs.reused_stages(config)
    if config.stage in reused:
        raise ValueError(
            f"{config.stage} is reused from {config.reuse_stages_from!r} "
            "(config.reuse_stages), so it is not trained in this workdir"
        )
    llava_stage_dirs.check_reused_stages(config)
    _check_stage_sections(config, stages, reused)
    for stage in stages:
        stage_started = time.perf_counter()
        if stage == "prepare":
            prepare(config)
        elif stage == "evaluate":
            return evaluate(config, workdir, started)
        elif stage in IMPORTED_STAGES and llava_hf_base.hf_dir(config) is not None:
            logging.info("%s: skipped, model.init_from=%r gives the tower and LM", stage,
                         config.model.init_from)  # fmt: skip
        elif stage in reused:
            logging.info("%s: reused from %s", stage, config.reuse_stages_from)
        elif config.stage == "all" and _stage_finished(config, workdir, stage):
            logging.info("%s: already finished, skipped", stage)
        else:
            result = llava_stages.train_stage(config, stage, workdir)
            summary = {
                "trainable_params": result.trainable_params,
                "total_params": result.total_params,
                "steps": result.step,
                "seconds": time.perf_counter() - stage_started,
            }
            (llava_stage_dirs.stage_dir(workdir, stage) / "summary.json").write_text(
                json.dumps(summary, indent=2)
            )
            if result.preempted:
                logging.warning("%s stopped early at step %d; rerun to resume", stage, result.step)
                return None
        logging.info("%s took %.1f s", stage, time.perf_counter() - stage_started)
    return None
