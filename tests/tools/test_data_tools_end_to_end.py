"""Prepare easy-VQA, train the tokenizer from it, and stream it through the benchmark."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from mllm_jax.data.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_prepare_tokenize_and_benchmark_easy_vqa(tmp_path):
    data = str(tmp_path)
    _run("tools/prepare_data.py", "--dataset", "easy_vqa", "--data_dir", data)
    _run("tools/train_tokenizer.py", "--data_dir", data, "--dataset", "easy_vqa",
         "--vocab_size", "400")  # fmt: skip
    tokenizer = Tokenizer.load(tmp_path / "tokenizer.model")
    # Answers were seen with a leading space, so each is a single piece.
    for answer in ("yes", "no", "circle", "rectangle", "triangle", "teal"):
        assert len(tokenizer.encode(" " + answer)) == 1, answer
    out = tmp_path / "bench.json"
    _run("tools/benchmark_data_pipeline.py", "--data_dir", data, "--batches", "3",
         "--warmup_batches", "1", "--workers", "0", "--seq_len", "512",
         "--json_out", str(out))  # fmt: skip
    (result,) = json.loads(out.read_text())
    assert result["samples_per_s"] > 0 and result["skipped"] == 0
    assert 0.5 < result["packing_efficiency"] <= 1.0
    assert result["samples_per_row"] >= 2  # 512-token rows hold several ~180-token samples
