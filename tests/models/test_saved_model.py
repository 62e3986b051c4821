"""Saved-model directories: every option an imported model uses round-trips through config.json,
and an imported model's tokenizer directory and image processor come back as they were."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.data.hf_image_processor import HFImageProcessor
from mllm_jax.data.hf_tokenizer import HFTokenizer
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.layers import TransformerConfig, ViTConfig
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.moe import MoEConfig
from mllm_jax.layers.rope import RopeScaling
from mllm_jax.models.multimodal_lm import MultimodalConfig
from mllm_jax.models.saved_model import (
    config_from_dict,
    config_to_dict,
    load_image_preprocessing,
    load_model,
    load_tokenizer,
    save_model,
)
from tests.recipes.tiny_llava_hf import save_tiny_llava

VISION = ViTConfig(
    image_size=32, patch_size=8, width=16, num_layers=2, num_heads=2, mlp_dim=32,
    use_cls_token=True, mlp_activation="quick_gelu", attention_bias="all", mlp_bias=True,
    patch_bias=False, pre_norm=True, dtype=jnp.bfloat16,
)  # fmt: skip


def _imported_style_config() -> MultimodalConfig:
    transformer = TransformerConfig(
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32, norm_epsilon=1e-5,
        rope_max_wavelength=500_000.0,
        rope_scaling=RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
        moe=MoEConfig(num_experts=4, top_k=2, renormalize_gates=True, z_loss_weight=0.0),
        attention_bias="qkv", mlp_bias=True, scan_layers=True, remat_policy="full",
        adapter=AdapterConfig(kind="dual_lora", rank=4, alpha=8.0, targets=("query", "value")),
        dtype=jnp.bfloat16,
    )  # fmt: skip
    return MultimodalConfig(
        vocab_size=64, embed_dim=32, transformer=transformer, vision=VISION,
        tie_embeddings=False, projector="mlp", vision_feature_layer=-2, keep_cls_token=True,
    )  # fmt: skip


def test_imported_model_options_round_trip_through_json():
    config = _imported_style_config()
    loaded = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert loaded == config
    assert isinstance(loaded.transformer.rope_scaling, RopeScaling)
    assert isinstance(loaded.transformer.moe, MoEConfig)
    assert loaded.transformer.adapter.targets == ("query", "value")
    with pytest.raises(ValueError, match="RopeScaling has no fields"):
        fields = config_to_dict(config)
        fields["transformer"]["rope_scaling"]["kind_of"] = "x"
        config_from_dict(fields)


def test_a_hugging_face_tokenizer_and_image_processor_come_back(tmp_path):
    hf_dir = save_tiny_llava(tmp_path / "hf")
    processor = json.loads((hf_dir / "preprocessor_config.json").read_text())
    config = _imported_style_config()
    params = {"lm": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    save_model(tmp_path / "model", config, params, hf_dir, image_processor_config=processor)

    loaded, loaded_params, tokenizer_path = load_model(tmp_path / "model")
    assert loaded == config and pathlib.Path(tokenizer_path).is_dir()
    np.testing.assert_array_equal(loaded_params["lm"]["kernel"], params["lm"]["kernel"])
    tokenizer, original = load_tokenizer(tokenizer_path), HFTokenizer.load(hf_dir)
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.image_id, tokenizer.pad_id, tokenizer.vocab_size) == (
        original.image_id, original.pad_id, original.vocab_size,
    )  # fmt: skip
    text = "What color is the shape?"
    assert tokenizer.encode(text) == original.encode(text)
    preprocessing = load_image_preprocessing(tmp_path / "model", loaded)
    assert preprocessing == HFImageProcessor.from_config(processor)

    # A model saved without a processor config prepares images as the from-scratch towers do.
    save_model(tmp_path / "plain", config, params, hf_dir)
    assert load_image_preprocessing(tmp_path / "plain", loaded) == ImagePreprocessing(size=32)
