"""Inference time of the LLaVA + VCE model per LM adapter, relative to q,v-LoRA (issue 9).

  python tools/benchmark_adapter_inference.py                                # demo size, float32
  python tools/benchmark_adapter_inference.py --batch 32 --dtype bfloat16 --json_out a.json
  python tools/benchmark_adapter_inference.py --config configs/llava_vce.py:size=test --repeats 3

Variants (only the LM's adapter differs; ViT and VCE projector are the same in all):
  qv_lora     LoRA on query, value at ``--reference_rank`` (default: the config's rank); every
              ratio divides by this row
  lora_equal  LoRA on the config's targets at the rank whose param count is closest to dual_lora's
  dual_lora   the config's ``model.adapter`` (demo: rank 16 on all seven projections)
  lora_moe    ``--experts`` LoRA experts (top ``--top_k``) of the config's rank on its targets
  full_ft     no adapter: full fine-tuning, and equally any plain LoRA merged into its kernels

What it measures: unmerged adapters. An unmerged LoRA adds two low-rank matmuls per adapted
projection to every forward. SPEC §3: plain LoRA is mergeable (W = W0 + s·A B, ``merge_lora``),
and merged it costs exactly ``full_ft``: ratio 1.0 to the unadapted model. Dual-LoRA is "not
mergeable into W0 (ReLU and LN), unlike plain LoRA": its update s·(ReLU(x W_T) ⊙ LayerNorm_r(x
W_A)) W_B depends on x through the ReLU of the task-activation path and the LayerNorm of the skill
space, so inference always pays its three matmuls, the ReLU and the LayerNorm. LoRA-MoE is not
mergeable either (its gates depend on x) and pays a router plus all E experts' low-rank products.
The paper reports its VCE + Dual-LoRA adapter at 1.16x the inference time of plain q,v-LoRA and
73% of a 4-expert LoRA-MoE; here every variant has the VCE projector, so the ratios isolate the
LM adapter. The paper's Dual-LoRA adapts q, v only (rank 32); the demo config adapts all seven
projections (rank 16): pass ``--config.model.adapter.targets="('query','value')"`` for the former.

Timed per variant on one batch of random prompts shaped like the recipe's: B prompts, each one
64x64 image (16 image tokens after the first token) and ``--text_tokens`` text tokens. Params are
random: timing does not depend on their values.
  prefill   the forward over the prompts: image encoding (ViT, VCE, token embeddings: one jitted
            program shared by all variants, as no adapter touches it), then one jitted forward
            of the adapted LM -> logits [B, N, V]
  generate  greedy generation of ``--new_tokens`` tokens through the library's path (the same
            image encoding, then ``models.generation.generate``: a KV-cache prefill and one
            jitted decode step per token, host loop included; EOS never stops it)
Each call is warmed up once (compilation excluded); then the calls of all variants take turns
``--repeats`` times, each ending in ``jax.block_until_ready``, and the median is reported.
``adapter params`` are counted in the initialised tree (they equal
``decoder_adapter_param_count``); ``trainable`` is what the variant trains in the LM (its adapter;
every LM param for full_ft). The VCE projector trains in every variant and is reported separately.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mllm_jax.layers.adapter_budget import closest_lora_rank, decoder_adapter_param_count
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import count_adapter_params
from mllm_jax.models.decoder_lm import DecoderLM
from mllm_jax.models.generation import generate
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.recipes.llava_models import multimodal_config
from mllm_jax.sharding import strip_boxes

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("qv_lora", "lora_equal", "dual_lora", "lora_moe", "full_ft")
QV = ("query", "value")
FLAGS = flags.FLAGS


def adapter_variants(
    config: MultimodalConfig, *, reference_rank: int, num_experts: int, top_k: int
) -> dict[str, AdapterConfig]:
    """The LM adapter of each variant in ``VARIANTS``, derived from ``config``'s adapter.

    Every LoRA keeps the config's scale s = alpha / r (alpha = s · r at another rank).
    """
    dual = dataclasses.replace(config.transformer.adapter, kind="dual_lora")
    dual_params = decoder_adapter_param_count(
        dataclasses.replace(config.transformer, adapter=dual), config.embed_dim
    )
    equal_rank = closest_lora_rank(config.transformer, config.embed_dim, dual_params, dual.targets)

    def lora(rank: int, targets: tuple[str, ...]) -> AdapterConfig:
        return dataclasses.replace(
            dual, kind="lora", rank=rank, alpha=dual.scale * rank, targets=targets
        )

    return {
        "qv_lora": lora(reference_rank, QV),
        "lora_equal": lora(equal_rank, dual.targets),
        "dual_lora": dual,
        "lora_moe": dataclasses.replace(
            dual, kind="lora_moe", num_experts=num_experts, top_k=top_k
        ),
        "full_ft": AdapterConfig(kind="none"),
    }


def prompt_batch(
    config: MultimodalConfig, batch: int, text_tokens: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random prompts [B, N], N = P + text_tokens, each with one image [B, 1, H, W, 3] whose
    P tokens follow the first text token (batch-contract fields, no padding)."""
    rng = np.random.default_rng(seed)
    per_image, size = config.tokens_per_image, config.vision.image_size
    length = per_image + text_tokens
    image_slot = np.full((batch, length), -1, np.int32)
    image_patch = np.full((batch, length), -1, np.int32)
    image_slot[:, 1 : 1 + per_image] = 0
    image_patch[:, 1 : 1 + per_image] = np.arange(per_image)
    return {
        "tokens": rng.integers(1, config.vocab_size, (batch, length), dtype=np.int32),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
        "images": rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32),
        "image_slot": image_slot,
        "image_patch": image_patch,
    }


def random_params(shapes: Any, seed: int = 0) -> Any:
    """Arrays of the given param shapes drawn from N(0, 0.02²) with numpy: no init to compile."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray((0.02 * rng.standard_normal(s.shape)).astype(s.dtype)),
        strip_boxes(shapes),
    )


def median_ms(calls: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Median wall time in ms of each call, after one untimed warm-up call each.

    The calls take turns in every repeat, so drift in the machine's speed hits all alike.
    """
    for call in calls.values():
        jax.block_until_ready(call())
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(values) for key, values in times.items()}


def _param_count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def lm_calls(
    lm: DecoderLM,
    prompts: dict[str, np.ndarray],
    embed: Callable[[], jax.Array],
    *,
    new_tokens: int,
) -> tuple[dict[str, int], dict[str, Callable[[], Any]]]:
    """Param counts of one adapted LM (random params) and its timed calls on ``prompts``.

    Calls: "prefill" (the forward's logits [B, N, V]) and, if ``new_tokens``, "generate" (the
    greedy tokens [B, new_tokens]). ``embed()`` returns the prompts' input embeddings [B, N, E]
    with the image tokens in place; it is part of both, as in ``MultimodalLM.__call__`` and
    ``mllm_jax.generate``.
    """
    tokens = jnp.asarray(prompts["tokens"])
    params = random_params(jax.eval_shape(lm.init, jax.random.key(0), tokens)["params"])
    segment_ids, positions = jnp.asarray(prompts["segment_ids"]), jnp.asarray(prompts["positions"])
    mask = segment_ids > 0
    forward = jax.jit(
        lambda p, x: lm.apply(
            {"params": p}, x, input_mask=mask, segment_ids=segment_ids, positions=positions,
            method=lm.decode,
        )
    )  # fmt: skip
    calls = {"prefill": lambda: forward(params, embed())}
    if new_tokens:
        calls["generate"] = lambda: (
            generate(lm, params, embed(), mask, max_new_tokens=new_tokens, eos_id=-1).tokens
        )
    counts = {"adapter_params": count_adapter_params(params), "lm_params": _param_count(params)}
    return counts, calls


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    batch: int,
    text_tokens: int,
    new_tokens: int,
    repeats: int,
    reference_rank: int = 0,
    num_experts: int = 4,
    top_k: int = 2,
) -> list[dict[str, Any]]:
    """One row per variant of ``VARIANTS``: adapter, param counts, times and ratios to qv_lora.

    The image encoding (ViT, VCE projector, token embedding) touches no adapter: it is one
    jitted program with one set of params, shared by all variants; each variant has its own
    LM params and programs.
    """
    base = multimodal_config(config, with_adapter=True)
    adapters = adapter_variants(
        base,
        reference_rank=reference_rank or base.transformer.adapter.rank,
        num_experts=num_experts,
        top_k=top_k,
    )
    prompts = prompt_batch(base, batch, text_tokens)
    inputs = {k: jnp.asarray(v) for k, v in prompts.items()}
    image_fields = ("images", "image_slot", "image_patch")
    encoder = MultimodalLM(multimodal_config(config, with_adapter=False))
    shapes = jax.eval_shape(
        lambda: encoder.init(
            jax.random.key(0), inputs["tokens"],
            **{k: inputs[k] for k in ("segment_ids", "positions", *image_fields)},
        )
    )["params"]  # fmt: skip
    encoder_params = random_params(shapes)
    embed_program = jax.jit(
        lambda p, t, images, slot, patch: encoder.apply(
            {"params": p}, t, images, slot, patch, method=encoder.input_embeddings
        )
    )

    def embed() -> jax.Array:
        return embed_program(encoder_params, *(inputs[k] for k in ("tokens", *image_fields)))

    rows, calls = [], {}
    for name, adapter in adapters.items():
        lm = DecoderLM(
            vocab_size=base.vocab_size,
            embed_dim=base.embed_dim,
            transformer=dataclasses.replace(base.transformer, adapter=adapter),
            tie_embeddings=base.tie_embeddings,
        )
        counts, variant_calls = lm_calls(lm, prompts, embed, new_tokens=new_tokens)
        calls |= {(name, measure): call for measure, call in variant_calls.items()}
        rows.append(
            dict(
                variant=name,
                adapter=adapter_summary(adapter),
                trainable=counts["lm_params"]
                if adapter.kind == "none"
                else counts["adapter_params"],
                projector_params=_param_count(encoder_params["projector"]),
                **counts,
            )
        )
    times = median_ms(calls, repeats)
    for row in rows:
        for measure in ("prefill", "generate"):
            ms = times.get((row["variant"], measure))
            reference = times.get((rows[0]["variant"], measure))
            row[f"{measure}_ms"] = ms
            row[f"{measure}_ratio"] = None if ms is None else ms / reference
    return rows


def adapter_summary(adapter: AdapterConfig) -> str:
    """E.g. "lora r=16 on query,value" or "lora_moe 4x r=16 top-2 on 7 projections"."""
    if adapter.kind == "none":
        return "none (all LM params train)"
    targets = adapter.targets
    targets = ",".join(targets) if len(targets) <= 2 else f"{len(targets)} projections"
    if adapter.kind == "lora_moe":
        experts = f"{adapter.num_experts}x r={adapter.rank} top-{adapter.top_k}"
        return f"lora_moe {experts} on {targets}"
    return f"{adapter.kind} r={adapter.rank} on {targets}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (times in ms per batch, ratios to the first row)."""
    lines = [
        "| variant | adapter | adapter params | trainable params | prefill ms | x q,v-LoRA "
        "| generate ms | x q,v-LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        generate_cells = (
            f"{r['generate_ms']:.1f} | {r['generate_ratio']:.2f}"
            if r["generate_ms"] is not None
            else "- | -"
        )
        lines.append(
            f"| {r['variant']} | {r['adapter']} | {r['adapter_params']:,} | {r['trainable']:,} "
            f"| {r['prefill_ms']:.1f} | {r['prefill_ratio']:.2f} | {generate_cells} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    config = FLAGS.config
    config.model.dtype = FLAGS.dtype
    rows = run_benchmark(
        config,
        batch=FLAGS.batch,
        text_tokens=FLAGS.text_tokens,
        new_tokens=FLAGS.new_tokens,
        repeats=FLAGS.repeats,
        reference_rank=FLAGS.reference_rank,
        num_experts=FLAGS.experts,
        top_k=FLAGS.top_k,
    )
    base = multimodal_config(config, with_adapter=True)
    dual = next(r for r in rows if r["variant"] == "dual_lora")["adapter_params"]
    qv_rank = closest_lora_rank(base.transformer, base.embed_dim, dual, QV)
    device = jax.devices()[0]
    settings = dict(
        device=f"{device.platform} ({device.device_kind})",
        dtype=FLAGS.dtype,
        batch=FLAGS.batch,
        seq_len=base.tokens_per_image + FLAGS.text_tokens,
        new_tokens=FLAGS.new_tokens,
        repeats=FLAGS.repeats,
        projector_params=rows[0]["projector_params"],
        qv_lora_rank_equal_to_dual_lora=qv_rank,
    )
    print(
        f"device: {settings['device']}; {FLAGS.dtype}; B={FLAGS.batch} prompts of "
        f"N={settings['seq_len']} tokens (1 image); {FLAGS.new_tokens} new tokens; median of "
        f"{FLAGS.repeats}; unmerged adapters. VCE projector: {settings['projector_params']:,} "
        f"params (trains in every variant). q,v-only LoRA at Dual-LoRA's count: rank {qv_rank}."
    )
    print(format_table(rows), flush=True)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=2)


def define_flags() -> None:
    """The command line's flags (defined only when run as a script: other tools that tests import
    define flags of the same names)."""
    config_flags.DEFINE_config_file(
        "config", str(REPO / "configs" / "llava_vce.py"), "The LLaVA + VCE config."
    )
    flags.DEFINE_integer("batch", 16, "B, prompts per batch.")
    flags.DEFINE_integer("text_tokens", 20, "Text tokens per prompt (besides the image's).")
    flags.DEFINE_integer("new_tokens", 4, "Tokens generated per prompt (0: no generation timing).")
    flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (after one warm-up call).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params fp32).")
    flags.DEFINE_integer("reference_rank", 0, "Rank of the q,v-LoRA reference (0: the config's).")
    flags.DEFINE_integer("experts", 4, "LoRA-MoE experts.")
    flags.DEFINE_integer("top_k", 2, "LoRA-MoE experts per token.")
    flags.DEFINE_string("json_out", None, "Optional path for settings and rows as JSON.")


if __name__ == "__main__":
    # configs/*.py import ``configs.base``: the repository root must be importable (as a script,
    # sys.path[0] is tools/).
    sys.path.insert(0, str(REPO))
    define_flags()
    app.run(main)
