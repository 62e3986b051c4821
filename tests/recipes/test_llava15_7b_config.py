"""configs/llava15_7b.py: the paper's LLaVA-1.5-7B + VCE + Dual-LoRA builds (``jax.eval_shape``,
nothing allocated), its parameter counts equal the architecture's formulae, its architecture is
llava-1.5-7b-hf's as that checkpoint's config.json describes it, and its FSDP mesh divides every
sharded dimension on a v5e-256 (256 chips) and a v4-64 (32 chips)."""

import dataclasses
import json
import math

import flax.linen as nn
import pytest
from flax import traverse_util

from configs import llava15_7b
from mllm_jax.checkpoint_conversion.hf_llava import abstract_llava_params, llava_config_from_hf
from mllm_jax.models.multimodal_lm import MultimodalLM
from mllm_jax.recipes import llava_hf_base, llava_models
from mllm_jax.sharding import logical_rules_from_config, strip_boxes

# llava-hf/llava-1.5-7b-hf's config.json as the hub holds it: text_config is saved as a diff
# from LlamaConfig's defaults (no hidden_size, layers or heads).
LLAVA_15_7B_HF = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}  # fmt: skip


def _vit_l_14_336() -> int:
    d, layers, mlp, patch, tokens = 1024, 24, 4096, 14, (336 // 14) ** 2
    # patches (no bias), CLS, positions, ln_pre
    embeddings = 3 * patch * patch * d + d + (tokens + 1) * d + 2 * d
    block = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d
    return embeddings + layers * block


def _vicuna_7b() -> int:
    vocab, d, layers, mlp = 32064, 4096, 32, 11008
    block = 4 * d * d + 3 * d * mlp + 2 * d  # q, k, v, o; gate, up, down; two RMSNorm scales
    return 2 * vocab * d + layers * block + d  # untied embedding and head; final norm


def _vce_projector() -> int:
    c, d, levels, heads, points = 1024, 4096, 4, 16, 4
    samples = heads * levels * points
    vce = 3 * 2 * c  # query, feature and output LayerNorms
    vce += 2 * (c * c + c)  # value and output projections
    vce += c * samples * 2 + samples * 2 + c * samples + samples  # offsets (x, y) and weights
    return vce + (c * d + d) + (d * d + d)  # mlp2x_gelu


def _dual_lora_q_v() -> int:
    d, rank, layers = 4096, 32, 32
    per_projection = d * rank + d * rank + 2 * rank + rank * d  # W_T, W_A, LayerNorm_r, W_B
    return layers * 2 * per_projection


@pytest.fixture(scope="module")
def abstract_params():
    config = llava15_7b.get_config()
    model = MultimodalLM(llava_models.multimodal_config(config, with_adapter=True))
    return config, abstract_llava_params(model)


def test_parameter_counts_equal_the_architecture_formulae(abstract_params):
    _, boxed = abstract_params
    counts = {"vision": 0, "projector": 0, "lm": 0, "adapter": 0}
    for path, leaf in traverse_util.flatten_dict(strip_boxes(boxed), sep="/").items():
        group = "adapter" if "dual_lora" in path else path.split("/")[0]
        counts[group] += math.prod(leaf.shape)
    expected = {
        "vision": _vit_l_14_336(),
        "projector": _vce_projector(),
        "lm": _vicuna_7b(),
        "adapter": _dual_lora_q_v(),
    }
    print(
        f"\nViT-L/14-336 {counts['vision']:,}, LM {counts['lm']:,}, trainable: VCE projector "
        f"{counts['projector']:,} + Dual-LoRA {counts['adapter']:,} = "
        f"{counts['projector'] + counts['adapter']:,}"
    )
    assert counts == expected
    assert 303e6 < counts["vision"] < 304e6 and 6.7e9 < counts["lm"] < 6.8e9


def test_architecture_is_llava_1_5_7b_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_15_7B_HF))
    config = llava15_7b.get_config()
    imported = llava15_7b.get_config(f"init_from=hf:{tmp_path}")
    assert imported.model.init_from == f"hf:{tmp_path}"
    hf = llava_hf_base.hf_llava_config(imported)

    assert llava_hf_base.overridden_fields(config, hf) == []
    ours = llava_models.multimodal_config(config, with_adapter=False)
    assert ours.vision == hf.multimodal.vision
    assert ours.transformer == dataclasses.replace(hf.multimodal.transformer, remat_policy="full")
    assert (ours.vocab_size, ours.embed_dim, ours.tie_embeddings) == (32064, 4096, False)
    assert ours.tokens_per_image == hf.multimodal.tokens_per_image == 576
    # With init_from the model is built from config.json alone: the same model.
    for with_adapter in (False, True):
        assert llava_models.multimodal_config(
            imported, with_adapter=with_adapter
        ) == llava_models.multimodal_config(config, with_adapter=with_adapter)
    assert llava_config_from_hf(tmp_path).image_token_id == 32000


@pytest.mark.parametrize("chips", [256, 32])
def test_fsdp_mesh_divides_every_sharded_dimension(abstract_params, chips):
    config, boxed = abstract_params
    assert config.mesh.ici_parallelism.fsdp == -1 and config.mesh.ici_parallelism.data == 1
    sizes = {"data": 1, "fsdp": chips, "tensor": 1, "expert": 1}
    rules = logical_rules_from_config(config.mesh.logical_axis_rules)
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
    leaves = traverse_util.flatten_dict(strip_boxes(boxed), sep="/")
    uneven, sharded = [], 0
    for path, spec in specs.items():
        for dim, axes in zip(leaves[path].shape, nn.logical_to_mesh_axes(spec, rules), strict=True):
            ways = math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
            sharded += ways > 1
            if dim % ways:
                uneven.append((path, dim, ways))
    assert uneven == [] and sharded > 100
    for stage in ("stage1", "stage2"):
        assert config[stage].batch_size % chips == 0
