"""The train-step benchmark runs end to end and reports consistent numbers."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_reports_throughput_and_flops_fraction(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            sys.executable, "tools/benchmark_train_step.py",
            "--config", "configs/base.py:size=test", "--steps", "3", "--peak_gflops", "100",
            "--json_out", str(out),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 2 and report["seq_len"] == 32
    tokens = report["batch_size"] * report["seq_len"]
    assert report["tokens_per_s"] == pytest.approx(tokens / report["step_s_median"], rel=1e-2)
    assert report["fraction_of_peak"] == pytest.approx(report["gflops_per_s"] / 100, abs=2e-3)
