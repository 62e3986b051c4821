"""Multi-process training on one machine (jax.distributed, gloo): the text LM run as 1, 2 and 4
processes trains on the same global batches and ends at the same params; a checkpoint written by
one process count resumes on another (2 -> 1, 1 -> 2, 2 -> 4) with no example skipped or seen
twice; SIGTERM to one process makes every process save at the same step and exit 0.

Every run has 4 CPU devices in all (1 x 4, 2 x 2, 4 x 1), so the mesh is the same; only the
float32 reduction order of the gradient all-reduce differs between process counts.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS
from flax import traverse_util

from mllm_jax.launch.local_processes import check_train_args, process_command
from mllm_jax.train.checkpoint import load_trained_params
from mllm_jax.train.metric_writers import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 6
DEVICES = 4
# Float32 tolerance between process counts: the same program, a different all-reduce order.
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5


def _train_args(workdir, num_steps=NUM_STEPS, extra=()):
    return [
        f"--config={REPO / 'configs/base.py'}:size=test",
        f"--workdir={workdir}",
        f"--config.training.num_steps={num_steps}",
        "--config.training.log_every=1",
        "--config.training.checkpoint_every=3",
        "--config.training.eval_every=0",
        "--config.training.eval_batches=1",
        "--config.training.progress_bar=False",
        "--config.data.num_data_shards=4",
        *extra,
    ]


def _launch(num_processes, train_args, **popen):
    command = [
        sys.executable, str(REPO / "tools/launch_local.py"),
        f"--num_processes={num_processes}", f"--devices_per_process={DEVICES // num_processes}",
        "--", *train_args,
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # each process's devices come from the launcher
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen
    )


def _run(num_processes, workdir, **kwargs):
    process = _launch(num_processes, _train_args(workdir, **kwargs))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


def _params(workdir):
    flat = traverse_util.flatten_dict(jax.device_get(load_trained_params(workdir)), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def _assert_same_run(workdir, reference):
    losses, want = _losses(workdir), _losses(reference)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1)) == sorted(want)
    np.testing.assert_allclose(
        [losses[s] for s in sorted(losses)], [want[s] for s in sorted(want)], rtol=LOSS_RTOL
    )
    got, expected = _params(workdir), _params(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=PARAM_ATOL, err_msg=name)


def _crashed_after_step_3(source, target):
    """A copy of ``source`` as a run killed after its step-3 save would have left it."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / str(NUM_STEPS))
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_process")
    _run(1, root / "one")
    _run(2, root / "two")
    return root


def test_two_processes_train_like_one(runs):
    _assert_same_run(runs / "two", runs / "one")


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_process_count(runs, before, after, tmp_path):
    source = runs / {1: "one", 2: "two"}[before]
    workdir = _crashed_after_step_3(source, tmp_path / "resumed")
    output = _run(after, workdir)
    assert "resumed from step 3" in output
    _assert_same_run(workdir, runs / "one")


def _children(pid):
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append((int(stat.parent.name), cmdline))
    return found


def test_sigterm_to_one_process_saves_all_at_one_step(tmp_path):
    workdir = tmp_path / "preempted"
    # Long enough that the signal always comes before the end.
    launcher = _launch(2, _train_args(workdir, num_steps=100_000))
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None, launcher.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run logged no second step in 300 s"
        time.sleep(0.1)
    (second,) = [pid for pid, cmd in _children(launcher.pid) if "--process_id=1" in cmd]
    os.kill(second, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-4000:]
    saved = [line for line in output.splitlines() if "SIGTERM; saving at step" in line]
    steps = {int(line.split("saving at step ")[1].split()[0]) for line in saved}
    assert sorted(line[:4] for line in saved) == ["[p0]", "[p1]"], output[-4000:]
    assert len(steps) == 1, saved
    (step,) = steps
    assert 2 <= step < 100_000
    committed = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert committed[-1] == step
    assert max(_losses(workdir)) == step


def test_launcher_refuses_its_own_flags_and_builds_each_command():
    with pytest.raises(ValueError, match="--process_id=3"):
        check_train_args(["--config=c.py", "--process_id=3"])
    command = process_command(
        ["--config=c.py"], process_id=1, num_processes=2, port=1234, devices_per_process=4,
        python="python",
    )  # fmt: skip
    assert command == [
        "python", "-m", "mllm_jax.train", "--config=c.py", "--config.mesh.num_cpu_devices=4",
        "--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=1",
    ]  # fmt: skip


def test_launcher_stops_all_processes_when_one_fails(tmp_path):
    process = _launch(2, ["--config=/nonexistent/config.py", f"--workdir={tmp_path}"])
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "exited with status" in output
