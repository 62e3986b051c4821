"""The adapter inference benchmark times every variant and reports the analytic param counts."""

import dataclasses
import importlib.util
import pathlib

from configs import llava_vce
from mllm_jax.layers.adapter_budget import decoder_adapter_param_count
from mllm_jax.recipes.llava_models import multimodal_config

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "benchmark_adapter_inference.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_adapter_inference", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_every_variant_is_timed_with_its_analytic_param_count():
    config = llava_vce.get_config("size=test")
    # One new token: generate's KV-cache prefill, no decode step (a decode-step program per
    # variant would add about a fifth to the test's time; the command line decodes 4 tokens).
    rows = bench.run_benchmark(config, batch=2, text_tokens=4, new_tokens=1, repeats=1)
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)

    base = multimodal_config(config, with_adapter=True)
    adapters = bench.adapter_variants(
        base, reference_rank=base.transformer.adapter.rank, num_experts=4, top_k=2
    )
    for row in rows:
        transformer = dataclasses.replace(base.transformer, adapter=adapters[row["variant"]])
        assert row["adapter_params"] == decoder_adapter_param_count(transformer, base.embed_dim)
        assert row["prefill_ms"] > 0 and row["generate_ms"] > 0
    by_name = {r["variant"]: r for r in rows}
    # Width 32, 2 layers, rank 16: q,v LoRA 2·16·((32+32) + (32+16)); Dual-LoRA on all seven
    # projections 2·Σ 16·(2 d_in + d_out) + 32; full fine-tuning: embedding 512·32 + 2 blocks of
    # 12,352 + the final norm.
    in_out = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 96), (32, 96), (96, 32)]
    assert by_name["qv_lora"]["adapter_params"] == 2 * 16 * (64 + 48) == 3_584
    assert by_name["dual_lora"]["adapter_params"] == 2 * sum(
        16 * (2 * i + o) + 32 for i, o in in_out
    )
    assert by_name["full_ft"]["adapter_params"] == 0
    assert by_name["full_ft"]["trainable"] == 512 * 32 + 2 * 12_352 + 32
    assert by_name["dual_lora"]["trainable"] == by_name["dual_lora"]["adapter_params"]
    # Equal-param LoRA: rank 24 (29,184) is the closest to Dual-LoRA's 29,120.
    assert adapters["lora_equal"].rank == 24
    assert by_name["lora_equal"]["adapter_params"] == 2 * 24 * sum(i + o for i, o in in_out)
    assert by_name["qv_lora"]["prefill_ratio"] == by_name["qv_lora"]["generate_ratio"] == 1.0

    table = bench.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(bench.VARIANTS)
    for name, line in zip(bench.VARIANTS, lines[2:], strict=True):
        assert line.startswith(f"| {name} | ")
    assert "| lora_equal | lora r=24 on 7 projections | 29,184 | 29,184 |" in table
