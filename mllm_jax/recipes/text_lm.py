"""The text decoder LM of configs/base.py and configs/moe_lm.py, trained by ``trainer.train``.

  python -m mllm_jax.train --config configs/base.py:size=tiny --workdir runs/text
  python -m mllm_jax.train --config configs/moe_lm.py --workdir runs/moe

The model is a ``DecoderLM`` (dense, or sparse MoE when the config has ``model.moe``) on the
packed stdlib-docstring corpus; every parameter trains in one group at ``optimizer.learning_rate``.
The run gets what every trainer run gets (Orbax checkpoints of params, optimizer and data
position, exact resume, SIGTERM save, TensorBoard/JSONL metrics, plots, profiling) and writes
``config.json`` and ``results.json`` (``final_results``) to the workdir.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mllm_jax import sharding
from mllm_jax.data import text_corpus
from mllm_jax.data.sharded_stream import ShardedStream, num_data_shards
from mllm_jax.models.decoder_lm import DecoderLM, transformer_config_from
from mllm_jax.train import step as step_lib
from mllm_jax.train.log_window import window_step_seconds
from mllm_jax.train.losses import loss_chunk_size_from
from mllm_jax.train.metric_writers import read_run_history
from mllm_jax.train.multimodal_task import text_loss_fn
from mllm_jax.train.optimizer import check_optimizer_config
from mllm_jax.train.param_groups import ParamGroup
from mllm_jax.train.trainer import TrainResult, TrainTask, check_training_config, train

TASK_NAME = "text_lm"


def build_model(model_config: Any) -> DecoderLM:
    """The DecoderLM described by a config's ``model`` section."""
    return DecoderLM(
        vocab_size=model_config.vocab_size,
        embed_dim=model_config.embed_dim,
        transformer=transformer_config_from(model_config),
        tie_embeddings=model_config.tie_embeddings,
    )


def train_flops_per_token(model_config: Any, seq_len: int) -> float:
    """Analytic training FLOPs per token: 6 x (matmul params) + 12 x L x N x H x D for attention.

    Dense models only: an MoE layer's active parameters depend on its routing.
    """
    m = model_config
    attention_params = m.embed_dim * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    mlp_params = m.embed_dim * m.mlp_dim * (3 if m.mlp_activation == "swiglu" else 2)
    matmul_params = m.num_layers * (attention_params + mlp_params) + m.vocab_size * m.embed_dim
    attention_scores = 12 * m.num_layers * seq_len * m.num_heads * m.head_dim
    return 6.0 * matmul_params + attention_scores


def _global_batch(local_batch: dict, batch_sharding) -> dict:
    return {
        key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def text_lm_task(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    rules: sharding.LogicalRules,
    train_set: grain.MapDataset | None,
    eval_set: grain.MapDataset | None,
) -> TrainTask:
    """The TrainTask of the text LM: init, loss (+ MoE aux loss), data stream, eval loss.

    ``train_set`` / ``eval_set``: Grain MapDatasets of packed windows (``text_corpus``); only
    ``train`` reads them (``trainer.prepare_step``, for benchmarks and AOT compiles, takes
    None). Training reads ``data.num_data_shards`` shards (``data/sharded_stream.py``), so
    the global batches are the same for any process count dividing it; the evaluation averages
    the cross-entropy (without the MoE auxiliary loss) over the first ``training.eval_batches``
    global batches of ``eval_set`` (the same examples for any process count).
    """
    model = build_model(config.model)
    data = config.data
    process = dict(shard_index=jax.process_index(), num_shards=jax.process_count())
    example = jnp.zeros((data.batch_size // jax.process_count(), data.seq_len), jnp.int32)
    batch_sharding = step_lib.batch_sharding(mesh, rules)
    loss_chunk_size = loss_chunk_size_from(config.model)
    eval_sums = jax.jit(step_lib.make_eval_step(model, loss_chunk_size))

    def init_params(rng):
        return model.init(rng, example, segment_ids=example, positions=example)["params"]

    def make_shard(shard_index: int, num_shards: int):
        return text_corpus.batched_stream(
            train_set, data.batch_size, seed=data.seed, shard_index=shard_index,
            num_shards=num_shards,
        )  # fmt: skip

    def make_train_stream():
        return ShardedStream(make_shard, num_data_shards(data))

    def evaluate(params) -> dict:
        batches = text_corpus.batched_stream(
            eval_set, data.batch_size, seed=0, shuffle=False, **process
        )
        totals = np.zeros(2)
        with sharding.mesh_context(mesh, rules):
            for _ in range(config.training.eval_batches):
                out = eval_sums(params, _global_batch(next(batches), batch_sharding))
                totals += np.array(jax.device_get([out["loss_sum"], out["num_targets"]]))
        return {"loss": totals[0] / max(totals[1], 1.0)}

    return TrainTask(
        name=TASK_NAME,
        init_params=init_params,
        loss_fn=text_loss_fn(model, loss_chunk_size=loss_chunk_size),
        param_groups=[
            ParamGroup(name="all", patterns=(".",), learning_rate=config.optimizer.learning_rate)
        ],
        make_train_stream=make_train_stream,
        evaluate=evaluate,
        config=config.to_dict(),
    )


def train_text_lm(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, **train_kwargs
) -> TrainResult:
    """Trains (or resumes) the text LM in ``workdir``; ``train_kwargs`` go to ``trainer.train``."""
    mesh = sharding.create_mesh_from_config(config.mesh)
    rules = sharding.logical_rules_from_config(config.mesh.logical_axis_rules)
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    check_training_config(config.training)
    check_optimizer_config(config.optimizer)
    step_lib.check_batch_size(
        config.data.batch_size, mesh, rules, field="data.batch_size",
        accumulation_steps=int(config.training.get("accumulation_steps", 1)),
    )  # fmt: skip
    tokenizer = text_corpus.ByteTokenizer()
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    train_set, eval_set = text_corpus.make_text_datasets(
        config.data.seq_len, config.data.eval_percent
    )
    logging.info("corpus windows: %d train, %d eval", len(train_set), len(eval_set))
    return train(
        text_lm_task(config, mesh, rules, train_set, eval_set),
        optimizer_config=config.optimizer,
        training_config=config.training,
        mesh=mesh,
        rules=rules,
        workdir=workdir,
        seed=config.seed,
        **train_kwargs,
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The ``python -m mllm_jax.train`` job: trains, writes config.json and results.json.

    Returns the results (``final_results``); a preempted run returns ``{}`` and writes none.
    """
    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    result = train_text_lm(config, workdir_path)
    if result.preempted:
        return {}
    history = read_run_history(workdir_path, result.history)
    results = final_results(history, num_params=result.total_params)
    if not primary:
        return results
    (workdir_path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"train loss {history[0]['loss']:.3f} -> {results['train_loss']:.3f}; "
        f"eval loss -> {results['eval_loss']:.3f} after {results['num_steps']} steps",
        flush=True,
    )
    return results


def final_results(history: list[dict], *, num_params: int) -> dict:
    """The run's summary: last logged train and eval loss, steps, params, mean step seconds.

    ``step_seconds`` averages over the timed log windows but the first (see
    ``log_window.window_step_seconds``) and is absent if no such window was timed.
    """
    last = history[-1]
    results = {
        "train_loss": last["loss"],
        "eval_loss": last["eval_loss"],
        "num_steps": last["step"],
        "num_params": num_params,
    }
    step_seconds = window_step_seconds(history)
    if step_seconds is not None:
        results["step_seconds"] = step_seconds
    return results
