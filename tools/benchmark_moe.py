"""Step time and FLOP/s of a sparse MoE feed-forward vs a dense one with the same active params.

  python tools/benchmark_moe.py                       # E in {8,16,32,64}, k in {1,2}, both modes
  python tools/benchmark_moe.py --experts 8,64 --top_k 2 --modes dropless --steps 10

One train step of one layer on [B, N, D] float32 activations: forward, backward (inputs and
params) and an SGD update, jitted, on the default device (CPU, or a GPU/TPU when present). Each
expert is ``--mlp_dim`` wide; the dense SwiGLU baseline is ``k · mlp_dim`` wide, so both apply
the same number of feed-forward parameters to every token. Achieved FLOP/s count the useful
FLOPs only, 6 · T · (3 · D · F · k + D · E) per step (expert matmuls and router; dispatch and
combine einsums, sorting and padding slots are overhead), against ``--peak_gflops`` (140: the
measured float32 matmul ceiling of the project's 2-core CPU machines; pass your device's peak).
``dropped`` is the fraction of routing assignments capacity mode dropped (random inputs and a
fresh router, so routing is near uniform). Prints a Markdown table.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("experts", "8,16,32,64", "Comma-separated expert counts E.")
flags.DEFINE_string("top_k", "1,2", "Comma-separated k.")
flags.DEFINE_string("modes", "dropless,capacity", "MoE execution modes.")
flags.DEFINE_integer("batch", 8, "B, sequences per step.")
flags.DEFINE_integer("seq_len", 256, "N, tokens per sequence (the capacity group).")
flags.DEFINE_integer("embed_dim", 256, "D.")
flags.DEFINE_integer("mlp_dim", 512, "F, the width of one expert.")
flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor of capacity mode.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
flags.DEFINE_float("peak_gflops", 140.0, "Peak FLOP/s of the device, in GFLOP/s.")
flags.DEFINE_string("json_out", None, "Optional path for the rows as JSON.")


def _time_step(layer, x, steps: int, collect_moe: bool) -> tuple[float, float]:
    """(median seconds per train step, dropped fraction) of ``layer`` on ``x``."""
    import jax
    import jax.numpy as jnp

    from mllm_jax.layers.moe import MOE_COLLECTION, summarize_moe
    from mllm_jax.sharding import strip_boxes

    params = strip_boxes(jax.jit(layer.init)(jax.random.key(0), x)["params"])

    def loss(params, x):
        if not collect_moe:
            return jnp.mean(layer.apply({"params": params}, x) ** 2), jnp.zeros(())
        out, state = layer.apply({"params": params}, x, mutable=[MOE_COLLECTION])
        aux_loss, metrics = summarize_moe(state[MOE_COLLECTION])
        return jnp.mean(out**2) + aux_loss, metrics["moe/dropped_fraction"]

    @jax.jit
    def step(params, x):
        (_, dropped), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
        return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads), dropped

    params, dropped = jax.block_until_ready(step(params, x))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, dropped = jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times), float(dropped)


def run_benchmark(
    *,
    experts: list[int],
    top_ks: list[int],
    modes: list[str],
    batch: int,
    seq_len: int,
    embed_dim: int,
    mlp_dim: int,
    capacity_factor: float,
    steps: int,
    peak_flops: float,
) -> list[dict]:
    """One row per (E, k, mode): dense and MoE step times, their ratio, FLOP/s, drops."""
    import jax
    import numpy as np

    from mllm_jax.layers import MLP, MoEConfig, MoEFeedForward

    x = jax.numpy.asarray(
        np.random.default_rng(0).normal(size=(batch, seq_len, embed_dim)), np.float32
    )
    tokens = batch * seq_len
    dense_time = {k: _time_step(MLP(hidden_dim=k * mlp_dim), x, steps, False)[0] for k in top_ks}
    rows = []
    for num_experts in experts:
        for k in top_ks:
            for mode in modes:
                config = MoEConfig(
                    num_experts=num_experts, top_k=k, mode=mode, capacity_factor=capacity_factor
                )
                layer = MoEFeedForward(config=config, hidden_dim=mlp_dim)
                seconds, dropped = _time_step(layer, x, steps, True)
                flops = 6 * tokens * (3 * embed_dim * mlp_dim * k + embed_dim * num_experts)
                rows.append(
                    dict(
                        experts=num_experts,
                        top_k=k,
                        mode=mode,
                        dense_ms=1e3 * dense_time[k],
                        moe_ms=1e3 * seconds,
                        ratio=seconds / dense_time[k],
                        moe_gflops=flops / seconds / 1e9,
                        dense_gflops=6 * tokens * 3 * embed_dim * mlp_dim * k / dense_time[k] / 1e9,
                        fraction_of_peak=flops / seconds / peak_flops,
                        dropped=dropped,
                    )
                )
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| E | k | mode | dense ms | MoE ms | MoE/dense | dense GFLOP/s | MoE GFLOP/s "
        "| MoE % of peak | dropped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experts']} | {r['top_k']} | {r['mode']} | {r['dense_ms']:.1f} "
            f"| {r['moe_ms']:.1f} | {r['ratio']:.2f} | {r['dense_gflops']:.1f} "
            f"| {r['moe_gflops']:.1f} | {100 * r['fraction_of_peak']:.1f}% "
            f"| {100 * r['dropped']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    import jax

    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    rows = run_benchmark(
        experts=ints(FLAGS.experts),
        top_ks=ints(FLAGS.top_k),
        modes=FLAGS.modes.split(","),
        batch=FLAGS.batch,
        seq_len=FLAGS.seq_len,
        embed_dim=FLAGS.embed_dim,
        mlp_dim=FLAGS.mlp_dim,
        capacity_factor=FLAGS.capacity_factor,
        steps=FLAGS.steps,
        peak_flops=FLAGS.peak_gflops * 1e9,
    )
    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}); B={FLAGS.batch} N={FLAGS.seq_len} "
        f"D={FLAGS.embed_dim} F={FLAGS.mlp_dim}; median of {FLAGS.steps} steps"
    )
    print(format_table(rows), flush=True)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
