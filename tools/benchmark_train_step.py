"""Times the jitted, sharded train step of the decoder LM and reports FLOP/s against a ceiling.

  python tools/benchmark_train_step.py --config configs/base.py:size=small --steps 20

Prints compile time, median/mean step time, tokens/s and achieved GFLOP/s (analytic training
FLOPs, see ``train_flops_per_token``) as a fraction of ``--peak_gflops`` (default 140: the measured
float32 matmul ceiling of the project's 2-core CPU machines; pass your accelerator's peak). Inputs
are random tokens, so the data pipeline is not part of the measurement.
"""

import json
import pathlib
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# configs/ import each other (configs/moe_lm.py: `from configs import base`): from anywhere.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/base.py:size=small", "Experiment config.")
flags.DEFINE_integer("steps", 20, "Timed steps (after one warm-up step).")
flags.DEFINE_float("peak_gflops", 140.0, "Peak FLOP/s of the machine, in GFLOP/s.")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def main(argv):
    del argv
    import jax

    config = FLAGS.config
    if config.mesh.get("num_cpu_devices"):
        jax.config.update("jax_num_cpu_devices", config.mesh.num_cpu_devices)
    import numpy as np

    from mllm_jax import sharding
    from mllm_jax.recipes import text_lm
    from mllm_jax.train.partition import combine_params
    from mllm_jax.train.trainer import prepare_step

    mesh = sharding.create_mesh_from_config(config.mesh)
    rules = sharding.logical_rules_from_config(config.mesh.logical_axis_rules)
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    config.training.num_steps = max(config.training.num_steps, FLAGS.steps + 2)
    prepared = prepare_step(
        text_lm.text_lm_task(config, mesh, rules, train_set=None, eval_set=None),
        optimizer_config=config.optimizer, training_config=config.training, mesh=mesh,
        rules=rules,
    )  # fmt: skip
    state = prepared.state
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, (batch_size, seq_len), dtype=np.int32)
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
    }
    batch = jax.device_put(batch, prepared.batch_sharding)
    train_step = prepared.step_fn
    step_rng = jax.random.key(1)
    with sharding.mesh_context(mesh, rules):
        start = time.perf_counter()
        compiled = train_step.lower(state, batch, step_rng).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, batch, step_rng)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(FLAGS.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch, step_rng)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)

    flops = text_lm.train_flops_per_token(config.model, seq_len) * batch_size * seq_len
    median = statistics.median(times)
    result = {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "params": int(
            sum(
                x.size
                for x in jax.tree_util.tree_leaves(combine_params(state.trainable, state.frozen))
            )
        ),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "compile_s": round(compile_s, 2),
        "step_s_median": round(median, 7),
        "step_s_mean": round(statistics.mean(times), 4),
        "tokens_per_s": round(batch_size * seq_len / median, 1),
        "gflops_per_s": round(flops / median / 1e9, 2),
        "fraction_of_peak": round(flops / median / 1e9 / FLAGS.peak_gflops, 3),
        "final_loss": float(metrics["loss"]),
    }
    print(json.dumps(result, indent=2))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
