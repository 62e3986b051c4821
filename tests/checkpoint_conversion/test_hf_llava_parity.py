"""MultimodalLM loaded by ``load_hf_llava`` vs the transformers LLaVA it was saved from.

Two tiny random LLaVA models with non-default weights (norm scales and biases perturbed away
from 1 and 0, rope_theta other than 10000): a CLIP tower (CLS, quick_gelu, ln_pre) under a
Llama LM with ``vision_feature_select_strategy="default"``, and a SigLIP tower (no CLS,
gelu_tanh) under a Qwen2 LM with "full". One 512-token prompt holding two images.
Tolerances against the float32 torch logits (per-token KL in float64): float32 max |Δlogit|
<= 2e-4 and KL <= 1e-6; bfloat16 compute KL <= 0.015. The sharded load on a (2, 2, 2) mesh
equals the single-device load bit for bit.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs.base import LOGICAL_AXIS_RULES  # noqa: E402
from mllm_jax.checkpoint_conversion.hf_llava import llava_config_from_hf, load_hf_llava  # noqa: E402
from mllm_jax.sharding import create_mesh, logical_rules_from_config  # noqa: E402
from tests.checkpoint_conversion.parity_checks import (  # noqa: E402
    perturb_norms_and_biases,
    token_kl,
)

MAX_ABS_F32, MAX_KL_F32, MAX_KL_BF16 = 2e-4, 1e-6, 0.015
LENGTH, VOCAB, IMAGE_TOKEN, IMAGE_SIZE = 512, 256, 255, 32
IMAGE_STARTS = (7, 300)
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
    max_position_embeddings=1024,
)  # fmt: skip
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=IMAGE_SIZE, patch_size=8,
)  # fmt: skip
CASES = {
    "clip_llama": dict(
        vision=("CLIPVisionConfig", {}),
        text=("LlamaConfig", dict(rope_parameters=dict(rope_theta=40_000.0))),
        llava=dict(vision_feature_select_strategy="default", vision_feature_layer=-2),
    ),
    "siglip_qwen2": dict(
        vision=("SiglipVisionConfig", {}),
        text=("Qwen2Config", dict(rope_parameters=dict(rope_theta=1e6))),
        llava=dict(vision_feature_select_strategy="full", vision_feature_layer=-1),
    ),
}


def _inputs(tokens_per_image: int):
    """(token ids [1, N] with two image runs, NCHW pixels [2, 3, H, W], our batch fields)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, IMAGE_TOKEN, size=(1, LENGTH))
    slot, patch = -np.ones((1, LENGTH), np.int32), -np.ones((1, LENGTH), np.int32)
    for k, start in enumerate(IMAGE_STARTS):
        ids[0, start : start + tokens_per_image] = IMAGE_TOKEN
        slot[0, start : start + tokens_per_image] = k
        patch[0, start : start + tokens_per_image] = np.arange(tokens_per_image)
    pixels = rng.normal(size=(len(IMAGE_STARTS), 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    fields = dict(
        segment_ids=jnp.ones((1, LENGTH), jnp.int32),
        positions=jnp.arange(LENGTH)[None],
        images=jnp.asarray(pixels.transpose(0, 2, 3, 1))[None],
        image_slot=jnp.asarray(slot),
        image_patch=jnp.asarray(patch),
    )
    return ids, pixels, fields


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (directory, float64 torch logits [1, N, V], our batch fields), built once."""
    built = {}

    def get(name: str):
        if name not in built:
            case = CASES[name]
            vision = getattr(transformers, case["vision"][0])(**VISION, **case["vision"][1])
            text = getattr(transformers, case["text"][0])(**TEXT, **case["text"][1])
            config = transformers.LlavaConfig(
                vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                **case["llava"],
            )  # fmt: skip
            seed = list(CASES).index(name)
            torch.manual_seed(seed)
            model = transformers.LlavaForConditionalGeneration(config).eval()
            perturb_norms_and_biases(model, seed)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            tokens_per_image = llava_config_from_hf(path).multimodal.tokens_per_image
            ids, pixels, fields = _inputs(tokens_per_image)
            with torch.no_grad():
                out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
            built[name] = (path, out.logits.double().numpy(), jnp.asarray(ids), fields)
        return built[name]

    return get


_forward = jax.jit(
    lambda model, params, tokens, fields: model.apply({"params": params}, tokens, **fields),
    static_argnums=0,
)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers(checkpoint, name):
    path, reference, tokens, fields = checkpoint(name)
    model, params, config = load_hf_llava(path)
    assert config.multimodal.tokens_per_image == 16  # 4x4 patches; CLS dropped or absent
    assert config.image_token_id == IMAGE_TOKEN
    logits = np.asarray(_forward(model, params, tokens, fields), np.float64)
    max_abs, max_kl = np.max(np.abs(logits - reference)), np.max(token_kl(reference, logits))
    assert max_abs <= MAX_ABS_F32 and max_kl <= MAX_KL_F32, (max_abs, max_kl)


def test_bfloat16_compute_stays_close_to_float32_transformers(checkpoint):
    path, reference, tokens, fields = checkpoint("clip_llama")
    model, params, _ = load_hf_llava(path, dtype=jnp.bfloat16)
    logits = np.asarray(_forward(model, params, tokens, fields), np.float64)
    kl = token_kl(reference, logits)
    assert np.max(kl) <= MAX_KL_BF16, np.max(kl)


def test_sharded_load_equals_the_single_device_load(checkpoint):
    path = checkpoint("clip_llama")[0]
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = logical_rules_from_config(LOGICAL_AXIS_RULES)
    _, sharded, _ = load_hf_llava(path, mesh=mesh, rules=rules)
    _, single, _ = load_hf_llava(path)
    query = sharded["lm"]["decoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert len(query.sharding.device_set) == 8
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, single)


def test_select_strategies_and_unsupported_configs(checkpoint):
    config = json.loads((checkpoint("clip_llama")[0] / "config.json").read_text())
    full = llava_config_from_hf({**config, "vision_feature_select_strategy": "full"})
    assert full.multimodal.keep_cls_token and full.multimodal.tokens_per_image == 17
    with pytest.raises(ValueError, match="vision_feature_layer"):
        llava_config_from_hf({**config, "vision_feature_layer": [-2, -5]})
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        llava_config_from_hf({**config, "vision_feature_select_strategy": "cls_patch"})
    with pytest.raises(ValueError, match="projector_hidden_act"):
        llava_config_from_hf({**config, "projector_hidden_act": "relu"})
    siglip = json.loads((checkpoint("siglip_qwen2")[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="no CLS token"):
        llava_config_from_hf({**siglip, "vision_feature_select_strategy": "default"})
