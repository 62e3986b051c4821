"""Training loop of the decoder LM on the offline text corpus: mesh, sharded state, steps, eval."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from mllm_jax import sharding
from mllm_jax.data import text_corpus
from mllm_jax.models.decoder_lm import DecoderLM, transformer_config_from
from mllm_jax.train import optimizer as optimizer_lib
from mllm_jax.train import step as step_lib
from mllm_jax.train.state import create_sharded_train_state


def build_model(model_config: Any) -> DecoderLM:
    """The DecoderLM described by a config's ``model`` section."""
    return DecoderLM(
        vocab_size=model_config.vocab_size,
        embed_dim=model_config.embed_dim,
        transformer=transformer_config_from(model_config),
        tie_embeddings=model_config.tie_embeddings,
    )


def train_flops_per_token(model_config: Any, seq_len: int) -> float:
    """Analytic training FLOPs per token: 6 x (matmul params) + 12 x L x N x H x D for attention."""
    m = model_config
    attention_params = m.embed_dim * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    mlp_params = m.embed_dim * m.mlp_dim * (3 if m.mlp_activation == "swiglu" else 2)
    matmul_params = m.num_layers * (attention_params + mlp_params) + m.vocab_size * m.embed_dim
    attention_scores = 12 * m.num_layers * seq_len * m.num_heads * m.head_dim
    return 6.0 * matmul_params + attention_scores


@dataclasses.dataclass(frozen=True)
class LMTrainer:
    """A decoder LM ready to train: model, sharded state and the jitted, donating train step."""

    model: DecoderLM
    state: Any
    state_shardings: Any
    train_step: Callable
    schedule: optax.Schedule


def build_lm_trainer(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    *,
    batch_size: int,
    seq_len: int,
    num_steps: int,
    rng: jax.Array,
) -> LMTrainer:
    """Model, optimizer and schedule from ``config``; state initialised already sharded."""
    model = build_model(config.model)
    schedule = optimizer_lib.make_learning_rate_schedule(config.optimizer, num_steps)
    optimizer = optimizer_lib.make_optimizer(config.optimizer, num_steps)
    example = jnp.zeros((batch_size, seq_len), jnp.int32)
    state, state_shardings = create_sharded_train_state(
        lambda r: model.init(r, example, segment_ids=example, positions=example)["params"],
        optimizer,
        mesh,
        rules,
        rng,
    )
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(model, optimizer, schedule), state_shardings, mesh, rules
    )
    return LMTrainer(model, state, state_shardings, train_step, schedule)


def _global_batch(local_batch: dict, batch_sharding) -> dict:
    return {
        key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains for ``config.training.num_steps`` and returns the last logged metrics.

    Logged ``loss`` is the mean train loss over the steps since the previous log line.

    Writes ``config.json``, ``metrics.jsonl`` (one JSON object per logged step) and
    ``results.json`` (``final_results``) to workdir.
    """
    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.create_mesh_from_config(config.mesh)
    rules = sharding.logical_rules_from_config(config.mesh.logical_axis_rules)
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

    tokenizer = text_corpus.ByteTokenizer()
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    data = config.data
    train_ds, eval_ds = text_corpus.make_text_datasets(data.seq_len, data.eval_percent)
    logging.info("corpus windows: %d train, %d eval", len(train_ds), len(eval_ds))

    num_steps = config.training.num_steps
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    trainer = build_lm_trainer(
        config, mesh, rules, batch_size=data.batch_size, seq_len=data.seq_len,
        num_steps=num_steps, rng=init_rng,
    )  # fmt: skip
    model, state, state_shardings = trainer.model, trainer.state, trainer.state_shardings
    train_step = trainer.train_step
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    replicated = sharding.unsharded_fraction(state.params, state_shardings.params)
    logging.info("params: %d (%.1f%% of bytes replicated)", num_params, 100 * replicated)

    batch_sharding = step_lib.batch_sharding(mesh, rules)
    eval_step = jax.jit(
        step_lib.make_eval_step(model), in_shardings=(state_shardings.params, batch_sharding)
    )
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = text_corpus.batched_stream(train_ds, data.batch_size, seed=data.seed, **process)

    def evaluate(params) -> float:
        eval_iter = text_corpus.batched_stream(
            eval_ds, data.batch_size, seed=0, shuffle=False, **process
        )
        totals = np.zeros(2)
        for _ in range(config.training.eval_batches):
            out = eval_step(params, _global_batch(next(eval_iter), batch_sharding))
            totals += np.array([float(out["loss_sum"]), float(out["num_targets"])])
        return totals[0] / max(totals[1], 1.0)

    flops_per_step = (
        train_flops_per_token(config.model, data.seq_len) * data.batch_size * data.seq_len
    )
    metrics_file = (workdir_path / "metrics.jsonl").open("w")
    history = []
    with sharding.mesh_context(mesh, rules):
        window_start, window_losses = time.perf_counter(), []
        for step in range(1, num_steps + 1):
            batch = _global_batch(next(train_iter), batch_sharding)
            state, metrics = train_step(state, batch, step_rng)
            window_losses.append(metrics["loss"])
            is_eval = step % config.training.eval_every == 0 or step == num_steps
            if step % config.training.log_every and not is_eval and step != 1:
                continue
            record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            # "loss" is the mean over the steps since the last log line, not one noisy batch.
            record["loss"] = float(np.mean(jax.device_get(window_losses)))
            elapsed = time.perf_counter() - window_start
            if step > 1:  # the first window includes compilation
                record["steps_per_sec"] = len(window_losses) / elapsed
                record["tokens_per_sec"] = record["steps_per_sec"] * data.batch_size * data.seq_len
                record["gflops_per_sec"] = record["steps_per_sec"] * flops_per_step / 1e9
            if is_eval:
                record["eval_loss"] = evaluate(state.params)
            history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            print(_format(record), flush=True)
            window_start, window_losses = time.perf_counter(), []
    metrics_file.close()
    results = final_results(history, num_params=num_params)
    (workdir_path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    first, last = history[0], history[-1]
    print(
        f"train loss {first['loss']:.3f} -> {last['loss']:.3f}; "
        f"eval loss -> {last['eval_loss']:.3f} after {num_steps} steps",
        flush=True,
    )
    return last


def final_results(history: list[dict], *, num_params: int) -> dict:
    """The run's summary: last logged train and eval loss, steps, params, mean step seconds.

    ``step_seconds`` averages over the timed log windows (all but the first, which includes
    compilation; evaluation runs outside the windows) and is absent if no window was timed.
    """
    last = history[-1]
    results = {
        "train_loss": last["loss"],
        "eval_loss": last["eval_loss"],
        "num_steps": last["step"],
        "num_params": num_params,
    }
    windows = [
        (record["step"] - previous["step"], record["steps_per_sec"])
        for previous, record in itertools.pairwise(history)
        if "steps_per_sec" in record
    ]
    if windows:
        steps = sum(length for length, _ in windows)
        results["step_seconds"] = sum(length / rate for length, rate in windows) / steps
    return results


def _format(record: dict) -> str:
    parts = [f"step {record['step']:5d}", f"loss {record['loss']:.4f}"]
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    parts.append(f"lr {record['learning_rate']:.2e}")
    parts.append(f"grad_norm {record['grad_norm']:.3f}")
    if "tokens_per_sec" in record:
        parts.append(f"{record['tokens_per_sec']:.0f} tok/s")
        parts.append(f"{record['gflops_per_sec']:.1f} GFLOP/s")
    return "  ".join(parts)
