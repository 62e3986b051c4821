"""tools/prepare_data.py builds a dataset into a data_dir that load_samples then reads."""

import json
import os
import pathlib
import subprocess
import sys

from mllm_jax.data import builders

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "tools/prepare_data.py", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_prepare_tool_builds_and_prints_split_sizes(tmp_path):
    result = run_tool(
        "--dataset", "easy_vqa_captions", "--data_dir", str(tmp_path), "--max_examples", "30"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    sizes, skipped = report["sizes"], report["skipped"]
    assert {split: sizes[split] + sum(skipped[split].values()) for split in sizes} == {
        "train": 30,
        "test": 30,
    }
    source = builders.load_samples("easy_vqa_captions", str(tmp_path), "test", max_examples=30)
    assert len(source) == sizes["test"] and source[0].turns[1].text.startswith("a ")


def test_prepare_tool_rejects_options_the_dataset_does_not_take(tmp_path):
    result = run_tool("--dataset", "easy_vqa", "--data_dir", str(tmp_path), "--num_shots", "2")
    assert result.returncode != 0
    assert "num_shots" in result.stderr
    assert not (tmp_path / "easy_vqa").exists()
