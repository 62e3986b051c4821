"""The main job end to end at test size: every stage, the evaluation and results.json."""

import json

import pytest

from configs import llava_vce
from mllm_jax.recipes import llava_demo

RESULT_KEYS = {
    "easy_vqa_test_accuracy", "per_type", "multi_image_accuracy", "vision_blind_accuracy",
    "trainable_params", "total_params", "adapter_checkpoint_bytes", "wall_seconds",
}  # fmt: skip


@pytest.mark.slow
def test_all_stages_run_and_write_results(tmp_path):
    config = llava_vce.get_config("size=test")
    config.data.data_dir = str(tmp_path / "data")
    config.training.progress_bar = False
    workdir = tmp_path / "run"
    results = llava_demo.run(config, workdir)

    on_disk = json.loads((workdir / "results.json").read_text())
    assert set(on_disk) >= RESULT_KEYS and on_disk == results
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
    config.stage = "stage1"
    llava_demo.run(config, workdir)
    assert (workdir / "stage1" / "metrics.jsonl").read_text().splitlines() == lines


def test_a_stage_without_its_predecessors_names_what_is_missing(tmp_path):
    config = llava_vce.get_config("size=test,stage=stage2")
    config.data.data_dir = str(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="stage1"):
        llava_demo.run(config, tmp_path / "run")
