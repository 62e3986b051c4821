"""Times the FuseMix adapter train step and reports pairs/s and FLOP/s against a peak.

  nice -n 19 .venv/bin/python tools/benchmark_fusemix.py                 # CPU, batch 4096
  python tools/benchmark_fusemix.py --batch_size=40960 --peak_gflops=<GPU peak>   # the paper's

The step is the shared trainer's (``trainer.prepare_step`` of the FuseMix task), the batch split
over all devices. Adapters default to the paper's (SPEC §6: e 512, n 4 blocks, MLP ratio 4,
dropout 0.6) on this project's encoders' latent widths (MobileNetV2 1280, MiniLM 384);
``--image_dim/--text_dim`` take the paper's (DINOv2 ViT-g 1536, BGE-large 1024). Latents are
random (the step does not depend on their values) and already on the device, so only the step
is timed. FLOPs are analytic: 3x the forward matmul FLOPs (forward + backward) of both adapters
for the B/2 mixed pairs, plus the [B/2, B/2] similarity matrix; XLA's own count (per device,
times the device count) is printed beside it.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 4096, "Latent pairs per step (mixed into batch_size / 2).")
flags.DEFINE_integer("image_dim", 1280, "Image latent width d_x.")
flags.DEFINE_integer("text_dim", 384, "Text latent width d_y.")
flags.DEFINE_integer("embed_dim", 512, "Shared space width e.")
flags.DEFINE_integer("num_blocks", 4, "Residual blocks per adapter.")
flags.DEFINE_float("mlp_ratio", 4.0, "Block hidden width / latent width.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one compiling step).")
flags.DEFINE_float("peak_gflops", 140.0, "Peak float32 FLOP/s in GFLOP/s (140: this CPU).")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def main(argv):
    del argv
    import jax
    import numpy as np

    from mllm_jax import sharding
    from mllm_jax.models.fusion_adapter import AdapterConfig, count_flops_per_pair
    from mllm_jax.recipes.fusemix import (
        LOGICAL_RULES,
        FuseMixConfig,
        fusemix_task,
        optimizer_config,
        training_config,
    )
    from mllm_jax.train.trainer import prepare_step

    adapter = AdapterConfig(
        embed_dim=FLAGS.embed_dim, num_blocks=FLAGS.num_blocks, mlp_ratio=FLAGS.mlp_ratio
    )
    config = FuseMixConfig(adapter=adapter, batch_size=FLAGS.batch_size, num_steps=1000)
    mesh = sharding.create_mesh({"data": -1})
    # The trainer's own jitted step (FuseMix loss, AdamW, τ clamp), without its data or saves.
    prepared = prepare_step(
        fusemix_task(config, (FLAGS.image_dim, FLAGS.text_dim), None, batch_size=FLAGS.batch_size),
        optimizer_config=optimizer_config(config),
        training_config=training_config(config, log_every=1, checkpoint_every=1, progress=False),
        mesh=mesh, rules=LOGICAL_RULES,
    )  # fmt: skip
    state, key = prepared.state, prepared.step_rng
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "image": rng.normal(size=(FLAGS.batch_size, FLAGS.image_dim)).astype(np.float32),
        "text": rng.normal(size=(FLAGS.batch_size, FLAGS.text_dim)).astype(np.float32),
    }, prepared.batch_sharding)  # fmt: skip
    times = []
    with sharding.mesh_context(mesh, LOGICAL_RULES):
        started = time.perf_counter()
        compiled = prepared.step_fn.lower(state, batch, key).compile()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics["loss"])
        compile_seconds = time.perf_counter() - started
        for _ in range(FLAGS.steps):
            started = time.perf_counter()
            state, metrics = compiled(state, batch, key)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - started)
    mixed = FLAGS.batch_size // 2
    flops = 3 * (mixed * count_flops_per_pair(adapter, FLAGS.image_dim, FLAGS.text_dim)
                 + 2 * mixed * mixed * FLAGS.embed_dim)  # fmt: skip
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    median = statistics.median(times)
    params = sum(x.size for x in jax.tree_util.tree_leaves(state.trainable))
    result = {
        "device": str(jax.devices()[0].device_kind),
        "batch_size": FLAGS.batch_size,
        "adapter_params": int(params),
        "compile_and_first_step_s": round(compile_seconds, 2),
        "median_step_s": round(median, 4),
        "pairs_per_s": round(FLAGS.batch_size / median, 1),
        "analytic_gflop_per_step": round(flops / 1e9, 2),
        "xla_gflop_per_step": round(float(analysis.get("flops", 0.0)) * mesh.size / 1e9, 2)
        if analysis
        else None,
        "achieved_gflops": round(flops / median / 1e9, 2),
        "fraction_of_peak": round(flops / median / (FLAGS.peak_gflops * 1e9), 4),
        "loss": float(metrics["loss"]),
    }
    print(json.dumps(result, indent=1))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    app.run(main)
