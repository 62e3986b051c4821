"""The LLaVA recipe on an imported llava-hf checkpoint (``model.init_from="hf:DIR"``): stage 0 is
skipped, stages 1-2 train VCE + Dual-LoRA on DIR's frozen tower and LM, the saved model
reloads; a bad ``init_from`` is refused before anything compiles."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from safetensors.numpy import load_file

from configs import llava_vce
from mllm_jax.checkpoint_conversion.hf_llava import load_hf_llava
from mllm_jax.data.hf_image_processor import CLIP_MEAN, HFImageProcessor
from mllm_jax.data.hf_tokenizer import HFTokenizer
from mllm_jax.generate import saved_prompt
from mllm_jax.models.saved_model import load_image_preprocessing, load_model, load_tokenizer
from mllm_jax.recipes import llava_demo, llava_hf_base, llava_models, llava_stages
from mllm_jax.train import checkpoint as checkpoint_lib
from tests.recipes.tiny_llava_hf import IMAGE_SIZE, save_tiny_llava

STEPS = 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava-hf"))


def _config(hf_dir: pathlib.Path, data_dir: pathlib.Path):
    config = llava_vce.get_config("size=test")
    config.model.init_from = f"hf:{hf_dir}"
    config.data.data_dir = str(data_dir)
    config.model.scan_layers = True  # one compiled LM block: faster compiles on CPU
    config.model.adapter.targets = ("query", "value")
    config.training.progress_bar = False
    for stage in ("stage1", "stage2"):
        config[stage].update(dict(num_steps=STEPS, batch_size=8, warmup_steps=1))
    config.stage2.eval_examples = 0  # scored once, by the evaluate stage
    config.evaluate.update(
        dict(batch_size=4, test_examples=4, vision_blind_examples=2, max_new_tokens=2)
    )
    return config


@pytest.fixture(scope="module")
def run(hf_dir, tmp_path_factory):
    """(config, workdir, results) of stage=all on the imported checkpoint."""
    root = tmp_path_factory.mktemp("init_from")
    config = _config(hf_dir, root / "data")
    workdir = root / "run"
    # XLA:CPU spends most of the stages' init compiles on the threefry rounds of every
    # parameter's random init; rbg keys compile ~3x faster and change nothing checked here.
    default_impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        results = llava_demo.run(config, workdir)
    finally:
        jax.config.update("jax_default_prng_impl", default_impl)
    return config, workdir, results


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _trainable(workdir: pathlib.Path, stage: str) -> dict:
    return _flat(checkpoint_lib.load_trainable_params(workdir / stage))


@pytest.mark.slow
def test_stages_1_and_2_train_adapters_on_the_frozen_imported_model(run, hf_dir):
    config, workdir, results = run
    assert not (workdir / "stage0_vision").exists() and not (workdir / "stage0_lm").exists()
    for stage in ("stage1", "stage2"):
        assert json.loads((workdir / stage / "summary.json").read_text())["steps"] == STEPS
    assert results["paths"]["init_from"] == str(hf_dir)
    assert results["test_questions"] == 4 and 0.0 <= results["vqa_test_accuracy"] <= 1.0

    # Checkpoints hold the trainable params alone: the projector (stage 1), and the projector
    # and Dual-LoRA adapters (stage 2), never a tower or LM weight.
    stage1, stage2 = _trainable(workdir, "stage1"), _trainable(workdir, "stage2")
    assert all(p.startswith(("projector/vce/", "projector/mlp_projector/")) for p in stage1)
    adapters = {p for p in stage2 if "/dual_lora_" in p}
    assert adapters and set(stage2) - adapters == set(stage1)

    # Everything trained moved: VCE's attention-weight and sampling-offset kernels and the
    # adapters' up-projections away from their zero init, the projector again in stage 2.
    for path in ("projector/vce/attention_weights/kernel", "projector/vce/sampling_offsets/kernel"):
        assert np.any(np.asarray(stage1[path]) != 0), path
    assert any(not np.array_equal(stage1[p], stage2[p]) for p in stage1)
    ups = [v for p, v in stage2.items() if p.endswith("dual_lora_up")]
    assert ups and all(np.any(np.asarray(v) != 0) for v in ups)

    # The saved model's tower and LM are the imported weights, bit for bit.
    model_dir = workdir / "model"
    config_loaded, params, tokenizer_path = load_model(model_dir)
    assert config_loaded == llava_models.multimodal_config(config, with_adapter=True)
    _, imported, _ = load_hf_llava(hf_dir, scan_layers=True)
    saved = _flat(params)
    for path, value in _flat({k: imported[k] for k in ("vision", "lm")}).items():
        np.testing.assert_array_equal(np.asarray(saved[path]), np.asarray(value), err_msg=path)
    assert {p for p in saved if "/dual_lora_" in p} == adapters

    # It reloads as generate --model_dir reads it: DIR's tokenizer, template and processor.
    tokenizer = load_tokenizer(tokenizer_path)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.image_id == 3
    processor = load_image_preprocessing(model_dir, config_loaded)
    assert isinstance(processor, HFImageProcessor) and processor.mean == CLIP_MEAN
    assert saved_prompt(model_dir)["template"] == "llava_v1"


@pytest.mark.slow
def test_an_imported_mlp_projector_starts_stage1_on_the_mesh(run, hf_dir, tmp_path):
    config, _, _ = run
    config = config.copy_and_resolve_references()
    config.model.projector = "mlp"
    config.mesh.ici_parallelism.fsdp = 2  # the base weights are sharded, not replicated
    tokenizer = llava_stages.load_tokenizer(config)
    task = llava_stages.stage1_task(config, tokenizer, tmp_path)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(task.pretrained["projector"]["fc1"]["kernel"]),
        tensors["multi_modal_projector.linear_1.weight"].T,
    )
    query = task.pretrained["lm"]["decoder"]["layers"]["attention"]["query"]["kernel"]
    assert isinstance(query.sharding, NamedSharding) and "fsdp" in str(query.sharding.spec)
    assert len(query.sharding.device_set) == len(jax.devices())
    assert llava_models.image_processor(config).output_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert llava_hf_base.chat_template(config) == "llava_v1"


def test_the_imported_sizes_override_the_config_and_are_logged(hf_dir, tmp_path, caplog):
    config = _config(hf_dir, tmp_path)
    with caplog.at_level("INFO"):
        llava_hf_base.check_init_from(config)
    assert "vision.num_layers: 2 -> 3" in caplog.text and "model.embed_dim: 32 -> 64" in caplog.text
    mm_config = llava_models.multimodal_config(config, with_adapter=True)
    assert (mm_config.embed_dim, mm_config.vision.num_layers, mm_config.tokens_per_image) == (
        64, 3, 16,
    )  # fmt: skip
    assert mm_config.projector == "vce" and mm_config.transformer.adapter.kind == "dual_lora"


def _bad_init_from(hf_dir: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    not_llava = tmp_path / "llama"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return {
        "no prefix": (str(hf_dir), ValueError, "expected 'hf:DIR'"),
        "missing directory": (f"hf:{tmp_path / 'absent'}", FileNotFoundError, "not a directory"),
        "not a LLaVA": (f"hf:{not_llava}", ValueError, "not a LLaVA"),
    }


@pytest.mark.parametrize("case", ["no prefix", "missing directory", "not a LLaVA", "reuse"])
def test_a_bad_init_from_is_refused_before_anything_runs(hf_dir, tmp_path, case):
    config = _config(hf_dir, tmp_path / "data")
    if case == "reuse":
        config.reuse_stages_from = str(tmp_path / "base")
        error, match = ValueError, "reuse_stages_from"
    else:
        config.model.init_from, error, match = _bad_init_from(hf_dir, tmp_path)[case]
    with pytest.raises(error, match=r"model\.init_from=.*" + match):
        llava_demo.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
