"""tools/aot_compile.py compiles the real train step for TPU topologies on this CPU host.

Runs in subprocesses: the TPU environment must be set before jax starts, and this session's
jax is already on 8 fake CPU devices. Skipped where libtpu is not installed.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (mllm_jax[tpu])"
)


def _compile(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "tools/aot_compile.py", "--json_out", str(out), *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return done, (json.loads(out.read_text()) if out.exists() else None)


def test_text_lm_step_compiles_for_v5e_2x2_and_reports_memory_flops_collectives(tmp_path):
    done, report = _compile(tmp_path, "--config", "configs/base.py:size=test", "--topology",
                            "v5e:2x2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["num_devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"]["data"] == 4
    assert report["hbm_bytes"] == 16 * 1024**3
    # The donated state aliases its outputs; arguments hold params + Adam moments (3 x 27040
    # float32 replicated, plus the batch), so at least 3 x 27040 x 4 bytes.
    assert report["argument_bytes"] >= 3 * report["num_params"] * 4
    assert report["alias_bytes"] > 0 and report["flops_per_device"] > 0
    assert report["collectives"]["all-reduce"] >= 1  # data-parallel gradient reduction
    assert "fits" in done.stdout


def test_two_slices_with_fsdp_and_an_expert_parallel_moe_compile(tmp_path):
    done, report = _compile(
        tmp_path, "--config", "configs/moe_lm.py:size=test,mode=capacity,ep=2",
        "--topology", "v5e:2x2", "--num_slices", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["num_devices"] == 8 and report["mesh"]["expert"] == 2
    assert report["mesh"]["data"] == 4  # 2 over DCN x 2 over ICI
    assert report["collectives"]["all-to-all"] > 0  # tokens move to their experts


def test_a_step_that_does_not_fit_exits_non_zero_naming_the_memory(tmp_path):
    done, report = _compile(
        tmp_path, "--config", "configs/base.py:size=test", "--topology", "v5e:2x2",
        "--config.data.batch_size=4096", "--config.data.seq_len=2048",
        "--config.model.vocab_size=65536",
    )  # fmt: skip
    assert done.returncode == 1
    assert "does not fit in HBM on v5e:2x2" in done.stderr and "shard more" in done.stderr
    assert "Traceback" not in done.stderr and report is None
