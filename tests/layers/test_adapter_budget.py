"""Analytic adapter param counts equal the initialised trees; the LoRA rank solver is closest."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from configs import llava_vce
from mllm_jax.layers import MoEConfig, TransformerConfig
from mllm_jax.layers.adapter_budget import closest_lora_rank, decoder_adapter_param_count
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import count_adapter_params
from mllm_jax.models import DecoderLM
from mllm_jax.recipes.llava_models import multimodal_config

E, V = 24, 32
BASE = TransformerConfig(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=40)
SWIGLU_ALL = ("query", "key", "value", "out", "wi_gate", "wi_up", "wo")
QV = ("query", "value")
TOKENS = np.zeros((1, 4), np.int32)


def _counted(config: TransformerConfig) -> int:
    """Adapter params of the initialised DecoderLM (shapes only: no compile, no init)."""
    model = DecoderLM(vocab_size=V, embed_dim=E, transformer=config)
    return count_adapter_params(jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"])


def _with(adapter: AdapterConfig, **changes) -> TransformerConfig:
    return dataclasses.replace(BASE, adapter=adapter, **changes)


@pytest.mark.parametrize("targets", [QV, SWIGLU_ALL, ("out", "wo")])
@pytest.mark.parametrize("kind", ["none", "lora", "dual_lora", "lora_moe"])
def test_analytic_count_equals_the_initialised_params(kind, targets):
    config = _with(AdapterConfig(kind=kind, rank=3, targets=targets, num_experts=3, top_k=1))
    assert decoder_adapter_param_count(config, E) == _counted(config)
    assert (decoder_adapter_param_count(config, E) > 0) == (kind != "none")


@pytest.mark.parametrize("scan", [False, True])
def test_analytic_count_skips_the_mlp_of_moe_blocks(scan):
    moe = MoEConfig(num_experts=4, top_k=2, every=3 if scan else 2)
    config = _with(AdapterConfig(kind="dual_lora", rank=2, targets=SWIGLU_ALL), moe=moe)
    config = dataclasses.replace(config, scan_layers=scan)
    dense = decoder_adapter_param_count(dataclasses.replace(config, moe=None), E)
    assert decoder_adapter_param_count(config, E) == _counted(config) < dense


def test_analytic_count_of_a_gelu_mlp_and_a_scanned_stack():
    adapter = AdapterConfig(kind="lora", rank=5, targets=("query", "wi", "wo"))
    config = _with(adapter, mlp_activation="gelu", scan_layers=True)
    assert decoder_adapter_param_count(config, E) == _counted(config)


def test_demo_counts_follow_the_spec_formulas():
    """Width 128, 4 layers, 4 heads (2 KV) of 32, SwiGLU 384, rank 16, all seven projections."""
    config = multimodal_config(llava_vce.get_config(), with_adapter=True)
    transformer, embed = config.transformer, config.embed_dim
    in_out = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 384), (128, 384), (384, 128)]
    r, layers = 16, 4
    dual = layers * sum(r * (2 * i + o) + 2 * r for i, o in in_out)
    moe = layers * sum(4 * r * (i + o) + 4 * i for i, o in in_out)
    assert (dual, moe) == (230_272, 641_024)
    assert decoder_adapter_param_count(transformer, embed) == dual
    as_moe = dataclasses.replace(transformer.adapter, kind="lora_moe")
    assert (
        decoder_adapter_param_count(dataclasses.replace(transformer, adapter=as_moe), embed) == moe
    )
    # LoRA per rank: 9,728 (all targets) and 1,792 (q, v); 230,272 / 1,792 = 128.5 exactly.
    assert closest_lora_rank(transformer, embed, dual) == 24  # 233,472 vs 223,744 at 23
    assert closest_lora_rank(transformer, embed, dual, QV) == 128  # tie with 129: the smaller


@pytest.mark.parametrize("targets", [QV, SWIGLU_ALL])
def test_rank_solver_matches_a_brute_force_search(targets):
    config = _with(AdapterConfig(kind="lora", targets=targets))
    counts = {
        rank: decoder_adapter_param_count(
            _with(AdapterConfig(kind="lora", rank=rank, targets=targets)), E
        )
        for rank in range(1, 80)
    }
    for budget in np.random.default_rng(0).integers(1, counts[70], size=200):
        best = min(counts, key=lambda rank: (abs(counts[rank] - budget), rank))
        assert closest_lora_rank(config, E, int(budget), targets) == best, budget


def test_rank_solver_edge_cases():
    config = _with(AdapterConfig(kind="dual_lora", rank=4, targets=QV))
    per_rank = 3 * ((E + 32) + (E + 16))
    assert closest_lora_rank(config, E, 1) == 1
    assert closest_lora_rank(config, E, 7 * per_rank) == 7
    assert closest_lora_rank(config, E, 7 * per_rank + per_rank // 2) == 7
    assert closest_lora_rank(config, E, 7 * per_rank + per_rank // 2 + 1) == 8
    with pytest.raises(ValueError, match="positive"):
        closest_lora_rank(config, E, 0)
