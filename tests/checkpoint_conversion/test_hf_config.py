"""Hugging Face config.json -> DecoderLM hyper-parameters: fields, RoPE forms, refusals."""

from __future__ import annotations

import json
import re

import pytest

from mllm_jax.checkpoint_conversion.hf_config import lm_config_from_hf
from mllm_jax.layers.rope import RopeScaling

LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)


def test_llama_fields_map_to_the_transformer_config():
    cfg = lm_config_from_hf(LLAMA | dict(tie_word_embeddings=True, head_dim=32))
    t = cfg.transformer
    assert (cfg.vocab_size, cfg.embed_dim, cfg.tie_embeddings) == (256, 64, True)
    assert (t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (2, 4, 2, 32)
    assert (t.mlp_dim, t.mlp_activation, t.norm, t.norm_epsilon) == (128, "swiglu", "rmsnorm", 1e-5)
    assert (t.attention_bias, t.mlp_bias, t.moe, t.rope_scaling) == ("none", False, None, None)
    assert t.rope_max_wavelength == 10_000.0 and cfg.max_length == 1024


def test_head_dim_and_kv_heads_default_like_transformers():
    fields = {k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}
    t = lm_config_from_hf(fields).transformer
    assert (t.num_kv_heads, t.head_dim) == (4, 16)


def test_biases_per_architecture():
    qwen2 = lm_config_from_hf(LLAMA | dict(architectures=["Qwen2ForCausalLM"]))
    assert qwen2.family == "qwen2" and qwen2.transformer.attention_bias == "qkv"
    llama = lm_config_from_hf(LLAMA | dict(attention_bias=True, mlp_bias=True)).transformer
    assert (llama.attention_bias, llama.mlp_bias) == ("all", True)


def test_mixtral_is_a_dropless_top_k_renormalised_moe():
    cfg = lm_config_from_hf(
        LLAMA
        | dict(architectures=["MixtralForCausalLM"], num_local_experts=8, num_experts_per_tok=2)
    )
    moe = cfg.transformer.moe
    assert (moe.num_experts, moe.top_k, moe.mode, moe.renormalize_gates, moe.every) == (
        8,
        2,
        "dropless",
        True,
        1,
    )
    assert cfg.transformer.rope_max_wavelength == 1e6  # MixtralConfig's default theta


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def test_llama3_rope_reads_the_same_from_new_and_legacy_fields():
    new = lm_config_from_hf(
        LLAMA
        | dict(
            rope_parameters=dict(
                rope_type="llama3", rope_theta=5e5, original_max_position_embeddings=8192, **LLAMA3
            )
        )
    )
    legacy = lm_config_from_hf(
        LLAMA
        | dict(
            rope_theta=5e5,
            rope_scaling=dict(type="llama3", original_max_position_embeddings=8192, **LLAMA3),
        )
    )
    assert new.transformer == legacy.transformer
    assert new.transformer.rope_max_wavelength == 5e5
    assert new.transformer.rope_scaling == RopeScaling(
        kind="llama3", original_max_position_embeddings=8192, **LLAMA3
    )


def test_llama3_original_length_defaults_to_max_position_embeddings():
    cfg = lm_config_from_hf(LLAMA | dict(rope_scaling=dict(rope_type="llama3", **LLAMA3)))
    assert cfg.transformer.rope_scaling.original_max_position_embeddings == 1024


def test_linear_rope_and_legacy_scaling_winning_over_rope_parameters():
    cfg = lm_config_from_hf(
        LLAMA
        | dict(
            rope_parameters=dict(rope_type="default", rope_theta=1e4),
            rope_scaling=dict(rope_type="linear", factor=2.0, rope_theta=3e4),
        )
    )
    assert cfg.transformer.rope_scaling == RopeScaling(kind="linear", factor=2.0)
    assert cfg.transformer.rope_max_wavelength == 3e4


def test_config_is_read_from_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert lm_config_from_hf(tmp_path) == lm_config_from_hf(LLAMA)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(architectures=["GPT2LMHeadModel"]), "architectures"),
        (dict(architectures=[]), "architectures"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "rope_parameters.rope_type"),
        (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope_scaling.rope_type='dynamic'"),
        (dict(rope_scaling=dict(rope_type="linear")), "lacks 'factor'"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(num_hidden_layers=None), "num_hidden_layers"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lm_config_from_hf(LLAMA | fields)


def test_sliding_window_loads_only_where_it_cuts_nothing():
    mistral = LLAMA | dict(architectures=["MistralForCausalLM"], sliding_window=512)
    with pytest.raises(ValueError, match="sliding_window=512 is shorter than max_length=1024"):
        lm_config_from_hf(mistral)
    assert lm_config_from_hf(mistral, max_length=512).max_length == 512
    assert lm_config_from_hf(mistral | dict(sliding_window=None)).max_length == 1024
    without_key = {k: v for k, v in mistral.items() if k != "sliding_window"}
    with pytest.raises(ValueError, match="sliding_window=4096"):  # MistralConfig's default
        lm_config_from_hf(without_key | dict(max_position_embeddings=32768))
    # Qwen2 writes a window but uses it only with use_sliding_window.
    qwen2 = LLAMA | dict(architectures=["Qwen2ForCausalLM"], sliding_window=512)
    assert lm_config_from_hf(qwen2).max_length == 1024
    with pytest.raises(ValueError, match="sliding_window"):
        lm_config_from_hf(qwen2 | dict(use_sliding_window=True))
