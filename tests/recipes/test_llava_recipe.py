"""The main job end to end at test size: every stage, the evaluation and results.json; then an
ablation point that reuses the base run's stage 0 (MLP projector, full fine-tuning, grid VQA)."""

import json
import pathlib

import pytest

from configs import llava_vce
from mllm_jax.recipes import llava_demo
from mllm_jax.train import checkpoint as checkpoint_lib

RESULT_KEYS = {
    "easy_vqa_test_accuracy", "per_type", "multi_image_accuracy", "vision_blind_accuracy",
    "trainable_params", "total_params", "adapter_checkpoint_bytes", "wall_seconds",
}  # fmt: skip


def _test_config(data_dir: pathlib.Path):
    config = llava_vce.get_config("size=test")
    config.data.data_dir = str(data_dir)
    config.training.progress_bar = False
    return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(config, workdir, results) of a run of every stage."""
    tmp_path = tmp_path_factory.mktemp("llava")
    config = _test_config(tmp_path / "data")
    workdir = tmp_path / "run"
    return config, workdir, llava_demo.run(config, workdir)


@pytest.mark.slow
def test_all_stages_run_and_write_results(base_run):
    config, workdir, results = base_run

    on_disk = json.loads((workdir / "results.json").read_text())
    assert set(on_disk) >= RESULT_KEYS and on_disk == results
    assert results["vqa_dataset"] == "easy_vqa"
    assert results["vqa_test_accuracy"] == results["easy_vqa_test_accuracy"]
    assert set(results["per_type"]) == {"color", "shape", "yes_no"}
    for key in ("easy_vqa_test_accuracy", "multi_image_accuracy", "vision_blind_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert 0 < results["trainable_params"] < results["total_params"]
    assert results["adapter_checkpoint_bytes"] >= results["trainable_bytes"]
    for stage in llava_demo.TRAINING_STAGES:
        summary = json.loads((workdir / stage / "summary.json").read_text())
        assert summary["steps"] == config[stage].num_steps
        assert (workdir / stage / "metrics.jsonl").exists()
    # Stage 2 trained only adapters and the projector: its base weights hold the rest.
    assert (workdir / "stage2" / "base_params").exists()
    assert (workdir / "model" / "config.json").exists()

    # Running one stage alone from its config resumes it: already at its last step, it only
    # restores (no new metrics lines).
    lines = (workdir / "stage1" / "metrics.jsonl").read_text().splitlines()
    config = config.copy_and_resolve_references()
    config.stage = "stage1"
    llava_demo.run(config, workdir)
    assert (workdir / "stage1" / "metrics.jsonl").read_text().splitlines() == lines


@pytest.mark.slow
def test_an_ablation_point_reuses_stage0_and_fine_tunes_on_the_grid_set(base_run, tmp_path):
    base_config, base_workdir, base_results = base_run
    config = _test_config(base_config.data.data_dir)
    config.seed = 1
    config.reuse_stages_from = str(base_workdir)
    config.data.vqa_dataset = "easy_vqa_grid"
    config.model.projector = "mlp"
    config.model.adapter.kind = "none"
    config.stage2.train_lm = True
    workdir = tmp_path / "point"
    results = llava_demo.run(config, workdir)

    assert sorted(p.name for p in workdir.iterdir() if (p / "summary.json").exists()) == [
        "stage1", "stage2",
    ]  # fmt: skip
    assert results["paths"]["reused_stages"] == {
        stage: str(base_workdir / stage) for stage in ("stage0_vision", "stage0_lm")
    }
    assert results["vqa_dataset"] == "easy_vqa_grid" and "easy_vqa_test_accuracy" not in results
    assert set(results["per_type"]) == {"color", "shape", "yes_no"}
    assert results["test_questions"] == config.evaluate.test_examples
    # The whole LM trained (and was checkpointed); only the vision tower stayed frozen.
    trained = checkpoint_lib.read_params(
        next((workdir / "stage2" / "checkpoints").glob("*/trainable"))
    )
    assert set(trained) == {"lm", "projector"}
    assert set(trained["projector"]) == {"fc1", "fc2"}  # LLaVA's MLP, no VCE
    assert set(checkpoint_lib.read_params(workdir / "stage2" / "base_params")) == {"vision"}
    assert results["trainable_params"] > base_results["trainable_params"]
    assert results["trainable_bytes"] == 4 * results["trainable_params"]


def test_a_stage_without_its_predecessors_names_what_is_missing(tmp_path):
    config = llava_vce.get_config("size=test,stage=stage2")
    config.data.data_dir = str(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="stage1"):
        llava_demo.run(config, tmp_path / "run")
