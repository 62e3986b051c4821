"""Configs, their string arguments and command-line overrides, and the training entry point."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import base
from mllm_jax.config_args import parse_config_arg
from mllm_jax.data.text_corpus import ByteTokenizer
from mllm_jax.models.decoder_lm import transformer_config_from

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", sorted(base.SIZES))
def test_every_size_builds_a_consistent_config(size):
    config = base.get_config(f"size={size}")
    assert set(config) >= {"model", "mesh", "optimizer", "data", "training"}
    transformer = transformer_config_from(config.model)
    assert transformer.num_heads % transformer.num_kv_heads == 0
    assert config.model.vocab_size >= ByteTokenizer.vocab_size
    assert config.optimizer.warmup_steps < config.training.num_steps


def test_config_arguments_are_typed_and_validated():
    config = base.get_config("size=test,scan=true,remat=dots")
    assert config.model.scan_layers is True and config.model.remat_policy == "dots"
    assert parse_config_arg("n=3,x=0.5", n=1, x=1.0, s="a").to_dict() == {
        "n": 3,
        "x": 0.5,
        "s": "a",
    }
    with pytest.raises(ValueError, match="unknown config argument 'sz'"):
        base.get_config("sz=tiny")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        base.get_config("size=huge")
    with pytest.raises(ValueError, match="not a bool"):
        base.get_config("scan=maybe")
    with pytest.raises(ValueError, match="key=value"):
        base.get_config("tiny")


def test_unknown_dtype_is_rejected_with_the_field_name():
    config = base.get_config("size=test")
    config.model.dtype = "float8"
    with pytest.raises(ValueError, match="model.dtype='float8'"):
        transformer_config_from(config.model)


@pytest.mark.slow
def test_train_command_line_overrides_and_loss_falls(tmp_path):
    """python -m mllm_jax.train with a config string argument and --config.* overrides."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mllm_jax.train",
            "--config",
            "configs/base.py:size=test",
            "--workdir",
            str(tmp_path),
            "--config.model.num_layers=1",
            "--config.training.num_steps=30",
            "--config.training.eval_every=15",
            "--config.mesh.num_cpu_devices=4",
            "--config.mesh.ici_parallelism.fsdp=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["num_layers"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert evals[-1] < records[0]["loss"] - 0.5
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1, 'expert': 1}" in result.stderr
