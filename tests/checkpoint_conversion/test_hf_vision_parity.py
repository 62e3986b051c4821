"""Imported CLIP and SigLIP vision towers against transformers' own (torch, CPU) forward pass.

Tiny random towers (image 32, patch 8, width 64, 3 layers, 4 heads, MLP 128) built here and saved
as safetensors, every weight moved off its init: LayerNorm scales 1 + N(0, 0.2²), all biases and
the CLS embedding N(0, 0.2²), matrices N(0, 1/fan_in). Three random images, the same pixels NCHW
for torch and NHWC for us. Compared: every hidden state (``output_hidden_states``, all L + 1),
``last_hidden_state`` and CLIP's ``pooler_output``.

Tolerances: float32, max |ours - torch| <= 2e-4 (measured <= 3e-6); bfloat16 params and compute,
||ours - torch|| / ||torch|| <= 2e-2 per array (measured <= 0.8%).
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from mllm_jax.checkpoint_conversion.hf_vision import (
    load_hf_vision,
    vision_tower_ignored,
    vision_tower_sources,
    vit_config_from_hf,
)
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.checkpoint_conversion.sharded_load import load_params
from mllm_jax.sharding import create_mesh

F32_MAX_ABS = 2e-4
BF16_MAX_RELATIVE = 2e-2
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=100,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
FULL_MODELS = {
    "clip": lambda: CLIPModel(
        CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    ),
    "siglip": lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)),
}
RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"))
LLAVA_PREFIX = "model.vision_tower.vision_model."


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_scale = "norm" in name and name.endswith("weight")
            std = 0.2 if param.ndim == 1 else math.prod(param.shape[1:]) ** -0.5
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(float(is_scale) + std * noise)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """family -> (torch vision tower, full-model dir, standalone vision-model dir)."""
    built = {}
    for seed, (family, make) in enumerate(FULL_MODELS.items()):
        torch.manual_seed(seed)
        model = make().eval()
        perturb(model, seed)
        full_dir = tmp_path_factory.mktemp(f"{family}_full")
        vision_dir = tmp_path_factory.mktemp(f"{family}_vision")
        model.save_pretrained(full_dir)
        model.vision_model.save_pretrained(vision_dir)
        built[family] = (model.vision_model, full_dir, vision_dir)
    return built


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def references(towers, pixels):
    """family -> transformers' outputs as numpy: (hidden states, last_hidden_state, pooler)."""
    outputs = {}
    for family, (tower, _, _) in towers.items():
        with torch.no_grad():
            out = tower(torch.from_numpy(pixels), output_hidden_states=True)
        pooled = out.pooler_output.numpy() if family == "clip" else None
        states = [h.numpy() for h in out.hidden_states]
        outputs[family] = (states, out.last_hidden_state.numpy(), pooled)
    return outputs


@pytest.fixture(scope="module")
def loaded(towers):
    """family -> float32 import (CLIP from the full model, SigLIP from the vision model)."""
    return {
        "clip": load_hf_vision(towers["clip"][1]),
        "siglip": load_hf_vision(towers["siglip"][2]),
    }


def run_tower(config, module, params, pixels):
    """(all L + 1 hidden states, final-normed tokens, pooled) in one compiled call."""

    def forward(params, images):
        indices = tuple(range(config.num_layers + 1))
        states, normed = module.apply({"params": params}, images, indices, method="encode")
        return states, normed, module.apply({"params": params}, images)

    outputs = jax.jit(forward)(params, pixels.transpose(0, 2, 3, 1))
    return jax.tree.map(lambda a: np.asarray(a, np.float32), outputs)


def assert_close(ours, theirs, dtype, what):
    assert ours.shape == theirs.shape, what
    if dtype == jnp.float32:
        error = np.abs(ours - theirs).max()
        assert error <= F32_MAX_ABS, f"{what}: max abs diff {error:.2e}"
    else:
        error = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        assert error <= BF16_MAX_RELATIVE, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_every_hidden_state_matches_transformers(family, dtype, towers, references, pixels):
    _, full_dir, vision_dir = towers[family]
    config, module, params = load_hf_vision(
        full_dir if family == "clip" else vision_dir, dtype=dtype, param_dtype=dtype
    )
    assert jax.tree.leaves(params)[0].dtype == dtype
    states, normed, pooled = run_tower(config, module, params, pixels)
    ref_states, ref_last, ref_pooled = references[family]
    assert len(states) == len(ref_states) == 4
    for i, (ours, theirs) in enumerate(zip(states, ref_states, strict=True)):
        assert_close(ours, theirs, dtype, f"hidden state {i}")
    if family == "clip":  # last_hidden_state is before post_layernorm; the pooler normalises CLS
        assert_close(states[-1], ref_last, dtype, "last_hidden_state")
        assert_close(pooled, ref_pooled, dtype, "pooler_output")
        assert_close(normed[:, 0], ref_pooled, dtype, "normed CLS")
    else:  # last_hidden_state is post_layernorm over every token
        assert_close(normed, ref_last, dtype, "last_hidden_state")


def test_hf_configs_map_to_the_tower_options(loaded):
    clip, siglip = loaded["clip"][0], loaded["siglip"][0]
    assert (clip.use_cls_token, clip.pre_norm, clip.patch_bias) == (True, True, False)
    assert (clip.mlp_activation, clip.norm_epsilon) == ("quick_gelu", 1e-5)
    assert (siglip.use_cls_token, siglip.pre_norm, siglip.patch_bias) == (False, False, True)
    assert (siglip.mlp_activation, siglip.norm_epsilon) == ("gelu_tanh", 1e-6)
    for config in (clip, siglip):
        assert (config.attention_bias, config.mlp_bias) == ("all", True)
        assert (config.width, config.num_layers, config.num_heads, config.mlp_dim) == (
            64,
            3,
            4,
            128,
        )


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_full_and_vision_only_checkpoints_import_the_same_params(family, towers, caplog):
    _, full_dir, vision_dir = towers[family]
    with caplog.at_level(logging.INFO):
        _, _, from_full = load_hf_vision(full_dir)
    assert "not loaded (ignored by design)" in caplog.text
    _, _, from_vision = load_hf_vision(vision_dir)
    flat_full = traverse_util.flatten_dict(from_full, sep="/")
    flat_vision = traverse_util.flatten_dict(from_vision, sep="/")
    assert flat_full.keys() == flat_vision.keys()
    for path, array in flat_full.items():
        np.testing.assert_array_equal(array, flat_vision[path], err_msg=path)


def test_sharded_load_on_a_2x2x2_mesh_equals_the_single_device_load(towers, loaded):
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, _, sharded = load_hf_vision(towers["clip"][1], mesh=mesh, rules=RULES)
    query = sharded["vit"]["layers_0"]["attention"]["query"]["kernel"]
    assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len(query.sharding.device_set) == 8
    flat_single = traverse_util.flatten_dict(loaded["clip"][2], sep="/")
    flat_sharded = traverse_util.flatten_dict(sharded, sep="/")
    assert flat_single.keys() == flat_sharded.keys()
    for path, array in flat_sharded.items():
        for shard in array.addressable_shards:
            expected = np.asarray(flat_single[path])[shard.index]
            np.testing.assert_array_equal(shard.data, expected, err_msg=path)


def test_tower_mapping_under_a_llava_prefix_loads_the_vision_transformer(towers, loaded, tmp_path):
    """The LLaVA importer's use: tower tensors under another prefix, post_layernorm left out."""
    tensors = load_file(towers["clip"][2] / "model.safetensors")
    save_file(
        {LLAVA_PREFIX + name: t for name, t in tensors.items()}, tmp_path / "model.safetensors"
    )
    config, _, params = loaded["clip"]
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {
        path: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single)
        for path, a in traverse_util.flatten_dict(params["vit"], sep="/").items()
    }
    flat = load_params(
        SafetensorsDirectory(tmp_path),
        vision_tower_sources(config, LLAVA_PREFIX),
        targets,
        ignored=vision_tower_ignored(LLAVA_PREFIX, post_norm=False),
    )
    for path, array in traverse_util.flatten_dict(params["vit"], sep="/").items():
        np.testing.assert_array_equal(flat[path], array, err_msg=path)


def test_a_diff_style_nested_config_gets_the_towers_defaults():
    """llava-1.5's config.json names only the non-default fields of its CLIP tower."""
    llava = {
        "model_type": "llava",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
        },
    }
    config = vit_config_from_hf(llava)
    assert (config.mlp_activation, config.norm_epsilon, config.grid_shape()) == (
        "quick_gelu",
        1e-5,
        (24, 24),
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"),
            "missing tensor encoder.layers.1.mlp.fc2.bias",
        ),
        (
            lambda t: t.update({"encoder.layers.0.self_attn.rotary": np.zeros(4, np.float32)}),
            "unexpected tensor encoder.layers.0.self_attn.rotary",
        ),
        (
            lambda t: t.update({"embeddings.position_embedding.weight": np.zeros((17, 64))}),
            r"shape mismatch for parameter vit/position_embedding: the model wants \(16, 64\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_checkpoint_problems_raise_naming_the_tensor(edit, message, towers, tmp_path):
    tensors = load_file(towers["siglip"][2] / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(towers["siglip"][2] / "config.json", tmp_path)
    with pytest.raises(ValueError, match=message):
        load_hf_vision(tmp_path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_act", "relu", "hidden_act='relu' is not supported"),
        ("model_type", "dinov2", "unsupported vision tower model_type 'dinov2'"),
        ("image_size", [32, 16], r"image_size=\[32, 16\]: only square sizes"),
    ],
)
def test_unsupported_config_fields_raise_naming_the_field(field, value, message, towers, tmp_path):
    shutil.copy(towers["clip"][2] / "model.safetensors", tmp_path)
    config = json.loads((towers["clip"][2] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message):
        load_hf_vision(tmp_path)
