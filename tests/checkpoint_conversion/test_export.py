"""Weights out: HF -> mllm_jax -> HF is bit-identical per tensor; merged LoRA and PEFT adapters
load in transformers / peft with the same outputs; Dual-LoRA round-trips through its own layout.

Tolerance for outputs: float32 max |Δlogit| <= 2e-4 against our model on a 256-token prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flax import traverse_util  # noqa: E402

from mllm_jax.checkpoint_conversion.adapter_export import (  # noqa: E402
    read_dual_lora,
    write_dual_lora,
    write_peft_lora,
)
from mllm_jax.checkpoint_conversion.export_hf import save_hf_lm  # noqa: E402
from mllm_jax.checkpoint_conversion.hf_config import lm_config_from_hf  # noqa: E402
from mllm_jax.checkpoint_conversion.hf_lm import hf_lm_sources, load_hf_lm  # noqa: E402
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory  # noqa: E402
from mllm_jax.layers.lora import AdapterConfig  # noqa: E402
from mllm_jax.layers.lora_params import merge_lora  # noqa: E402
from mllm_jax.sharding import strip_boxes  # noqa: E402
from tests.checkpoint_conversion.parity_checks import perturb_norms_and_biases  # noqa: E402

MAX_ABS = 2e-4
PROMPT = np.random.default_rng(0).integers(0, 256, size=(1, 256))
LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
    max_position_embeddings=512, rope_parameters=dict(rope_theta=20_000.0),
)  # fmt: skip
TARGETS = ("query", "value", "out", "wo")
HF_TARGETS = {"q_proj", "v_proj", "o_proj", "down_proj"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(directory, torch model) of a tiny untied Llama saved in bfloat16 and float32 tensors."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    perturb_norms_and_biases(model, 0)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def adapted(llama):
    """kind -> (adapted model, adapter config, params, our logits), built once per kind."""
    built = {}

    def get(kind: str):
        if kind not in built:
            model, adapter, params = _with_adapter(llama[0], kind)
            built[kind] = (model, adapter, params, _our_logits(model, params))
        return built[kind]

    return get


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits.double().numpy()


def _with_adapter(path, kind: str):
    """(adapted DecoderLM, params): the imported base plus random non-zero adapter params."""
    base_model, base = load_hf_lm(path)
    adapter = AdapterConfig(kind=kind, rank=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    model = dataclasses.replace(
        base_model, transformer=dataclasses.replace(base_model.transformer, adapter=adapter)
    )
    fresh = strip_boxes(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32)))
    flat = traverse_util.flatten_dict(fresh["params"], sep="/")
    flat |= traverse_util.flatten_dict(base, sep="/")  # base weights imported, adapters fresh
    keys = iter(jax.random.split(jax.random.key(2), len(flat)))
    for path_, value in flat.items():
        if "lora" in path_:  # B starts at zero: make every adapter matter
            flat[path_] = value + 0.05 * jax.random.normal(next(keys), value.shape)
    return model, adapter, traverse_util.unflatten_dict(flat, sep="/")


def _our_logits(model, params) -> np.ndarray:
    forward = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))
    return np.asarray(forward(params, jnp.asarray(PROMPT)), np.float64)


def test_import_then_export_is_bit_identical_per_tensor(llama, tmp_path):
    path, _ = llama
    for scan in (False, True):
        _, params = load_hf_lm(path, scan_layers=scan)
        out = tmp_path / f"scan_{scan}"
        save_hf_lm(out, params, path)
        original, written = SafetensorsDirectory(path), SafetensorsDirectory(out)
        assert written.names() == original.names()
        for name in original.names():
            assert written.entry(name).dtype == original.entry(name).dtype, name
            np.testing.assert_array_equal(written.read(name), original.read(name), err_msg=name)
        assert (out / "config.json").read_text() == (path / "config.json").read_text()


def test_merged_lora_exports_to_a_checkpoint_transformers_loads_with_parity(
    llama, adapted, tmp_path
):
    path, _ = llama
    _, adapter, params, ours = adapted("lora")
    merged = merge_lora(params, adapter)
    save_hf_lm(tmp_path, merged, path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert np.max(np.abs(_torch_logits(reloaded) - ours)) <= MAX_ABS


def test_lora_exports_to_peft_with_the_same_outputs(llama, adapted, tmp_path):
    path, base_torch = llama
    _, adapter, params, ours = adapted("lora")
    cfg = lm_config_from_hf(path)
    modules = write_peft_lora(tmp_path, params, hf_lm_sources(cfg)[0], adapter)
    assert len(modules) == len(TARGETS) * LLAMA["num_hidden_layers"]
    base = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert set(with_adapter.peft_config["default"].target_modules) == HF_TARGETS
    got = _torch_logits(with_adapter)
    assert np.max(np.abs(got - ours)) <= MAX_ABS
    # Without the adapter the base model differs: the adapter is really applied.
    assert np.max(np.abs(_torch_logits(base_torch) - ours)) > 100 * MAX_ABS


def _dual_lora_hooks(model, directory):
    """Applies a Dual-LoRA file to a transformers model as its layout documents:
    h = W0 x + b0 + (alpha / r) up(relu(task x) * LayerNorm_r(skill x))."""
    import json

    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = SafetensorsDirectory(directory / "adapter_model.safetensors")
    scale = config["alpha"] / config["r"]
    handles = []
    for module_name in config["modules"]:
        weights = {
            part: torch.from_numpy(np.asarray(tensors.read(f"{module_name}.dual_lora.{part}")))
            for part in ("skill.weight", "task.weight", "up.weight", "norm.weight", "norm.bias")
        }

        def hook(module, inputs, output, w=weights):
            x = inputs[0]
            task = torch.relu(x @ w["task.weight"].T)
            skill = torch.nn.functional.layer_norm(
                x @ w["skill.weight"].T, (config["r"],), w["norm.weight"], w["norm.bias"],
                eps=config["norm_epsilon"],
            )  # fmt: skip
            return output + scale * (task * skill) @ w["up.weight"].T

        handles.append(model.get_submodule(module_name).register_forward_hook(hook))
    return handles


def test_dual_lora_round_trips_and_its_layout_reproduces_the_outputs(llama, adapted, tmp_path):
    path, base_torch = llama
    _, adapter, params, ours = adapted("dual_lora")
    sources = hf_lm_sources(lm_config_from_hf(path))[0]
    write_dual_lora(tmp_path, params, sources, adapter)
    read_adapter, flat = read_dual_lora(tmp_path, sources, params)
    assert read_adapter == adapter
    ours_flat = traverse_util.flatten_dict(params, sep="/")
    assert set(flat) == {k for k in ours_flat if "dual_lora" in k}
    for key, value in flat.items():
        np.testing.assert_array_equal(value, np.asarray(ours_flat[key]), err_msg=key)
    handles = _dual_lora_hooks(base_torch, tmp_path)
    try:
        assert np.max(np.abs(_torch_logits(base_torch) - ours)) <= MAX_ABS
    finally:
        for handle in handles:
            handle.remove()


def test_exports_refuse_the_wrong_adapter_kind(llama, adapted, tmp_path):
    path, _ = llama
    _, adapter, params, _ = adapted("dual_lora")
    sources = hf_lm_sources(lm_config_from_hf(path))[0]
    with pytest.raises(ValueError, match="PEFT export is for adapter kind 'lora'"):
        write_peft_lora(tmp_path, params, sources, adapter)
    with pytest.raises(ValueError, match="Dual-LoRA export is for adapter kind 'dual_lora'"):
        write_dual_lora(tmp_path, params, sources, dataclasses.replace(adapter, kind="lora"))
