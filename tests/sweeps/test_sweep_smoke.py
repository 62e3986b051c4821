"""End to end: ``python -m mllm_jax.sweeps`` trains two tiny points in fresh processes, then a
rerun skips both; the tables and the plot hold both points."""

import csv
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SWEEP = "experiments/lm_sweeps.py:smoke"


def _run_sweep(workdir: pathlib.Path, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mllm_jax.sweeps", "--sweep", SWEEP, "--workdir", str(workdir)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_tiny_points_run_then_are_skipped(tmp_path):
    # The jobs use the config's 2 CPU devices, not the 8 this test session forces; points that
    # differ only in seed share compiled programs through the persistent cache.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    workdir = tmp_path / "sweep"

    first = _run_sweep(workdir, env)
    assert first.returncode == 0, first.stderr[-3000:]
    names = ["seed=0,training.eval_batches=1,training.num_steps=3",
             "seed=1,training.eval_batches=1,training.num_steps=3"]  # fmt: skip
    for name in names:
        results = json.loads((workdir / name / "results.json").read_text())
        records = (workdir / name / "metrics.jsonl").read_text().splitlines()
        last = json.loads(records[-1])
        assert results["num_steps"] == last["step"] == 3
        assert results["train_loss"] == last["loss"] and results["eval_loss"] == last["eval_loss"]
        assert results["num_params"] > 0 and results["step_seconds"] > 0
        assert "after 3 steps" in (workdir / name / "train.log").read_text()

    second = _run_sweep(workdir, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("skipped (results exist)") == 2
    assert "running" not in second.stderr

    with (workdir / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["point"] for row in rows] == names
    assert [row["status"] for row in rows] == ["done", "done"]
    assert (
        float(rows[1]["eval_loss"])
        == json.loads((workdir / names[1] / "results.json").read_text())["eval_loss"]
    )
    markdown = (workdir / "results.md").read_text()
    assert "| training.eval_batches=1,training.num_steps=3 | 2 |" in markdown
    assert (workdir / "results.png").read_bytes()[:4] == b"\x89PNG"
