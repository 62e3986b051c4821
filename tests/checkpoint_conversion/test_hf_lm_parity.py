"""DecoderLM loaded by ``load_hf_lm`` vs the transformers model it was saved from.

Each case is a tiny random model (hidden 64, 2 layers, 4 query / 2 key-value heads, vocab 256)
with non-default weights: norm scales and biases perturbed away from 1 and 0, rope_theta other
than 10000, Llama 3 or linear RoPE scaling where the architecture has it. One 512-token prompt.
Tolerances against the float32 torch logits (KL(torch || ours) per token, in float64):
float32 max |Δlogit| <= 2e-4 and KL <= 1e-6; bfloat16 compute (float32 params) KL <= 0.015.
The sharded load on a (2, 2, 2) mesh must equal the single-device load bit for bit.
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from configs.base import LOGICAL_AXIS_RULES  # noqa: E402
from mllm_jax.checkpoint_conversion.hf_lm import load_hf_lm  # noqa: E402
from mllm_jax.sharding import create_mesh, logical_rules_from_config  # noqa: E402

MAX_ABS_F32, MAX_KL_F32, MAX_KL_BF16 = 2e-4, 1e-6, 0.015
PROMPT = np.random.default_rng(0).integers(0, 256, size=(1, 512))
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
    max_position_embeddings=1024,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=50_000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=128,
)
CASES = {
    "llama": ("Llama", dict(rope_parameters=LLAMA3_ROPE)),
    # Explicit head_dim (32 != 64 / 4), biases everywhere, tied head; its config.json is
    # rewritten below in the legacy rope_theta + rope_scaling form.
    "llama_tied": (
        "Llama",
        dict(
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="linear", rope_theta=30_000.0, factor=2.0),
        ),
    ),
    "mistral": ("Mistral", dict(sliding_window=None, rope_parameters=dict(rope_theta=25_000.0))),
    "qwen2": ("Qwen2", dict(rope_parameters=dict(rope_theta=1e6), rms_norm_eps=1e-5)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def _perturb(model, seed: int) -> None:
    """Norm scales off 1 and biases off 0, so a swapped or dropped tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _legacy_rope_config(path: pathlib.Path) -> None:
    """config.json as transformers 4 wrote it: top-level rope_theta and rope_scaling."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    path.write_text(json.dumps(config))


class Checkpoint(NamedTuple):
    """A saved case: its directory, the float64 torch logits [1, N, V] and, for Mixtral, per
    token the smallest over layers of the router-logit gap between the 2nd and 3rd expert."""

    path: pathlib.Path
    logits: np.ndarray
    routing_margin: np.ndarray | None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> Checkpoint, built on first use (each case has its own seed)."""
    built, models = {}, {}

    def get(name: str) -> Checkpoint:
        if name in built:
            return built[name]
        if name == "mixtral_fused":  # the transformers-5 in-memory layout, written as is
            path = tmp_path_factory.mktemp(name)
            shutil.copy(get("mixtral").path / "config.json", path / "config.json")
            state = {k: v.contiguous() for k, v in models["mixtral"].state_dict().items()}
            safetensors_torch.save_file(state, path / "model.safetensors")
            built[name] = get("mixtral")._replace(path=path)
            return built[name]
        prefix, fields = CASES[name]
        seed = list(CASES).index(name)
        config = getattr(transformers, f"{prefix}Config")(**COMMON, **fields)
        torch.manual_seed(seed)
        model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
        _perturb(model, seed)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        if name == "llama_tied":
            _legacy_rope_config(path / "config.json")
        margin = None
        with torch.no_grad():
            if prefix == "Mixtral":
                out = model(torch.tensor(PROMPT), output_router_logits=True)
                ranked = np.sort(torch.stack(out.router_logits).double().numpy(), axis=-1)
                margin = np.min(ranked[..., -2] - ranked[..., -3], axis=0)
            else:
                out = model(torch.tensor(PROMPT))
        built[name] = Checkpoint(path, out.logits.double().numpy(), margin)
        models[name] = model
        return built[name]

    return get


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
    return model.apply({"params": params}, tokens)


def _logits(model, params) -> np.ndarray:
    return np.asarray(_forward(model, params, jnp.asarray(PROMPT)), np.float64)


def _kl(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """[N] KL(softmax(reference) || softmax(logits)) per token of [1, N, V] logits, float64."""
    log_p = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    log_q = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)[0]


def _assert_float32_parity(reference: np.ndarray, logits: np.ndarray) -> None:
    max_abs, max_kl = np.max(np.abs(logits - reference)), np.max(_kl(reference, logits))
    assert max_abs <= MAX_ABS_F32 and max_kl <= MAX_KL_F32, (max_abs, max_kl)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers(checkpoint, name):
    case = checkpoint(name)
    model, params = load_hf_lm(case.path)
    assert model.tie_embeddings == (name == "llama_tied")
    _assert_float32_parity(case.logits, _logits(model, params))


def test_mixtral_fused_expert_layout_loads_the_same_params(checkpoint):
    legacy_model, legacy = load_hf_lm(checkpoint("mixtral").path)
    case = checkpoint("mixtral_fused")
    model, params = load_hf_lm(case.path)
    assert model == legacy_model
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, legacy)
    _assert_float32_parity(case.logits, _logits(model, params))


def test_scanned_layout_matches_transformers(checkpoint):
    case = checkpoint("llama")
    model, params = load_hf_lm(case.path, scan_layers=True)
    assert params["decoder"]["layers"]["attention"]["query"]["kernel"].shape == (2, 64, 4, 16)
    _assert_float32_parity(case.logits, _logits(model, params))


@pytest.mark.parametrize("name", ["llama", "qwen2", "mixtral"])
def test_bfloat16_compute_stays_close_to_float32_transformers(checkpoint, name):
    """For Mixtral the bound holds on tokens whose float32 top-2 choice wins by >= 0.03 router
    logits in every layer (>= 85% of them): a near-tie may pick another expert in bfloat16,
    a discrete jump that transformers' own bfloat16 model makes too (its max KL here is ~0.15).
    """
    case = checkpoint(name)
    model, params = load_hf_lm(case.path, dtype=jnp.bfloat16)
    assert params["embedder"]["embedding"].dtype == jnp.float32
    kl = _kl(case.logits, _logits(model, params))
    decided = np.ones_like(kl, bool) if case.routing_margin is None else case.routing_margin >= 0.03
    assert decided.mean() >= 0.85
    assert np.max(kl[decided]) <= MAX_KL_BF16, np.max(kl[decided])
    assert np.mean(kl) <= MAX_KL_BF16, np.mean(kl)


def test_bfloat16_params_are_the_float32_params_rounded(checkpoint):
    path = checkpoint("qwen2").path
    _, exact = load_hf_lm(path)
    _, rounded = load_hf_lm(path, param_dtype=jnp.bfloat16)
    leaves = zip(jax.tree_util.tree_leaves(exact), jax.tree_util.tree_leaves(rounded), strict=True)
    for a, b in leaves:
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16), np.asarray(b))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_load_equals_single_device_load(checkpoint, devices, scan_layers):
    path = checkpoint("mixtral").path
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2, expert=1), devices=devices)
    rules = logical_rules_from_config(LOGICAL_AXIS_RULES)
    _, single = load_hf_lm(path, scan_layers=scan_layers)
    _, sharded = load_hf_lm(path, mesh=mesh, rules=rules, scan_layers=scan_layers)
    flat_single = jax.tree_util.tree_leaves_with_path(single)
    flat_sharded = jax.tree_util.tree_leaves_with_path(sharded)
    split = 0
    for (key, a), (key_sharded, b) in zip(flat_single, flat_sharded, strict=True):
        assert key == key_sharded
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key)
        )
        assert b.sharding.mesh.shape == mesh.shape
        split += b.sharding.shard_shape(b.shape) != b.shape
    assert split >= len(flat_sharded) // 2  # the rules split most parameters


def _edited_copy(tmp_path, source: pathlib.Path, edit) -> pathlib.Path:
    from safetensors.numpy import load_file, save_file

    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_extra_and_misshapen_tensors_are_named(checkpoint, tmp_path):
    source = checkpoint("llama").path

    def damage(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
        tensors["model.norm.weight"] = np.ones(63, np.float32)

    with pytest.raises(ValueError) as error:
        load_hf_lm(_edited_copy(tmp_path, source, damage))
    message = str(error.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensor model.layers.0.self_attn.extra.weight" in message
    assert "shape mismatch for parameter decoder/final_norm/scale" in message


def test_a_mesh_that_does_not_divide_the_params_is_refused_by_name(checkpoint, devices):
    mesh = create_mesh(dict(data=1, fsdp=1, tensor=8, expert=1), devices=devices)
    rules = logical_rules_from_config(LOGICAL_AXIS_RULES)
    with pytest.raises(ValueError, match=r"attention'\]\['key'\]\['kernel'\]: dim 1"):
        load_hf_lm(checkpoint("llama").path, mesh=mesh, rules=rules)
