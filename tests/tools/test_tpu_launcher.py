"""tools/tpu.py: the gcloud commands it plans, its input checks, its executor, and the shell it
runs on TPU VM workers (executed here with bash in a temporary home, with a stand-in trainer)."""

import contextlib
import importlib.util
import io
import os
import pathlib
import shlex
import signal
import subprocess
import tarfile
import time

import pytest

from mllm_jax.launch import steps as steps_lib
from mllm_jax.launch import tpu_launch, tpu_vm, worker_scripts
from mllm_jax.launch.steps import Command, LaunchError, Step
from mllm_jax.launch.tpu_vm import TpuTarget
from mllm_jax.launch.worker_scripts import TrainRun

REPO = pathlib.Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("tpu_tool", REPO / "tools" / "tpu.py")
tpu_tool = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tpu_tool)

WHERE = ("--zone=us-east5-a", "--project=my-project")
TWO_SLICES = TpuTarget(name="my-run", num_slices=2, zone="us-east5-a", project="my-project")
UP_ARGS = [
    "up", "--name", "my-run", "--accelerator_type", "v5litepod-256", "--num_slices", "2",
    "--zone", "us-east5-a", "--project", "my-project", "--spot",
    "--config", "configs/base.py:size=small", "--workdir", "gs://bucket/run",
    "--config.mesh.ici_parallelism.fsdp=-1", "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
]  # fmt: skip


def test_single_slice_create_queues_one_node_named_like_the_request():
    target = TpuTarget(name="lm", zone="us-central2-b", project="my-project")
    assert tpu_vm.create_command(target, "v4-64") == (
        "gcloud", "compute", "tpus", "queued-resources", "create", "lm", "--node-id=lm",
        "--accelerator-type=v4-64", "--runtime-version=tpu-ubuntu2204-base",
        "--zone=us-central2-b", "--project=my-project",
    )  # fmt: skip
    assert target.node_names == ("lm",)


def test_two_slice_create_uses_node_count_and_prefix_and_nodes_are_prefix_dash_index():
    assert tpu_vm.create_command(TWO_SLICES, "v5litepod-256", spot=True) == (
        "gcloud", "compute", "tpus", "queued-resources", "create", "my-run",
        "--node-count=2", "--node-prefix=my-run", "--accelerator-type=v5litepod-256",
        "--runtime-version=v2-alpha-tpuv5-lite", *WHERE, "--spot",
    )  # fmt: skip
    assert TWO_SLICES.node_names == ("my-run-0", "my-run-1")


def test_zone_and_project_flags_are_left_to_gcloud_defaults_when_not_given():
    target = TpuTarget(name="lm")
    assert tpu_vm.create_command(target, "v5p-128")[-2:] == (
        "--accelerator-type=v5p-128",
        "--runtime-version=v2-alpha-tpuv5",
    )
    assert tpu_vm.delete_command(target) == (
        "gcloud", "compute", "tpus", "queued-resources", "delete", "lm", "--force", "--quiet",
    )  # fmt: skip


def test_install_is_one_worker_all_ssh_per_slice():
    step = tpu_launch.install_step(TWO_SLICES, python="python3.11")
    script = (
        'set -e; cd "$HOME/mllm_jax"; if ! command -v python3.11 >/dev/null; then '
        "sudo apt-get update -qq; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "python3.11 python3.11-venv; fi; python3.11 -m venv .venv; "
        '.venv/bin/pip install --quiet --upgrade pip; .venv/bin/pip install --quiet -e ".[tpu]"'
    )
    assert [c.argv for c in step.commands] == [
        ("gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *WHERE, "--worker=all",
         f"--command={script}")
        for node in ("my-run-0", "my-run-1")
    ]  # fmt: skip


def test_run_starts_the_quoted_train_command_with_its_env_on_every_worker():
    run = TrainRun(
        config="configs/base.py:size=small",
        workdir="gs://bucket/run",
        overrides=("--config.mesh.ici_parallelism.fsdp=-1", "--config.name=a b"),
        env=(("LIBTPU_INIT_ARGS", "--xla_a=1 --xla_b=2"),),
    )
    step = tpu_launch.run_step(TWO_SLICES, run)
    log, pid = "$HOME/mllm_jax_logs/train.log", "$HOME/mllm_jax_logs/train.pid"
    script = (
        f'set -e; mkdir -p "$HOME/mllm_jax_logs"; cd "$HOME/mllm_jax"; '
        f'if [ -f "{pid}" ] && kill -0 "$(cat "{pid}")" 2>/dev/null; then echo "$(hostname): '
        f'a run is still going (pid $(cat "{pid}")); stop it first" >&2; exit 1; fi; '
        f'echo "=== $(date -u +%FT%TZ) start" >> "{log}"; '
        "PYTHONUNBUFFERED=1 LIBTPU_INIT_ARGS='--xla_a=1 --xla_b=2' nohup .venv/bin/python -m "
        "mllm_jax.train --config configs/base.py:size=small --workdir gs://bucket/run "
        "--config.mesh.ici_parallelism.fsdp=-1 '--config.name=a b' "
        f'--config.mesh.dcn_parallelism.data=2 >> "{log}" 2>&1 < /dev/null & echo $! > "{pid}"; '
        f'echo "$(hostname): started pid $(cat "{pid}"), log {log}"'
    )
    assert [c.argv for c in step.commands] == [
        ("gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *WHERE, "--worker=all",
         f"--command={script}")
        for node in ("my-run-0", "my-run-1")
    ]  # fmt: skip


def test_slices_go_on_the_dcn_data_axis_unless_a_dcn_override_is_given():
    run = TrainRun(config="configs/base.py", workdir="w")
    dcn = "--config.mesh.dcn_parallelism.data=4"
    assert worker_scripts.train_argv(run, 4)[-1] == dcn
    assert not any("dcn" in a for a in worker_scripts.train_argv(run, 1))
    own = TrainRun(config="configs/base.py", workdir="w",
                   overrides=("--config.mesh.dcn_parallelism.fsdp=4",))  # fmt: skip
    assert dcn not in worker_scripts.train_argv(own, 4)


def test_up_is_check_create_wait_sync_install_run(capsys):
    assert tpu_tool.main([*UP_ARGS, "--dry_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    headers = [line.split(":")[0] for line in out if line.startswith("# ")]
    assert headers == ["# check", "# create", "# wait", "# sync", "# install", "# run"]
    commands = [shlex.split(line) for line in out if not line.startswith("#")]
    # check, create, describe; git archive, 2 scp, 2 unpack; 2 install; 2 run.
    assert len(commands) == 12
    assert commands[1] == list(tpu_vm.create_command(TWO_SLICES, "v5litepod-256", spot=True))
    assert commands[2] == list(tpu_vm.state_command(TWO_SLICES))
    assert commands[3][:4] == ["git", "-C", str(REPO), "archive"]
    assert [c[6] for c in commands[4:6]] == ["my-run-0:mllm_jax.tar.gz", "my-run-1:mllm_jax.tar.gz"]
    # Printed lines are shell-quoted: they split back into the argv that would run.
    assert commands[-1][-1].startswith("--command=set -e;")
    assert "LIBTPU_INIT_ARGS='--xla_a=1 --xla_b=2'" in commands[-1][-1]


def test_dry_run_executes_nothing(monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"executed in a dry run: {args}")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(os, "system", forbidden)
    for argv in (UP_ARGS, ["stop", "--name", "x"], ["delete", "--name", "x"],
                 ["logs", "--name", "x", "--worker", "3"], ["wait", "--name", "x"]):  # fmt: skip
        assert tpu_tool.main([*argv, "--dry_run"]) == 0
    assert "gcloud compute tpus tpu-vm ssh x --worker=3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator_type", "v5e-256"], "v5e is spelled v5litepod"),
        (["--accelerator_type", "v5litepod-12"], "v5litepod slices have 1, 4, 8"),
        (["--accelerator_type", "v4-60"], "multiple of 8"),
        (["--accelerator_type", "v3-32", "--num_slices", "2"], "multislice"),
        (["--num_slices", "0"], "num_slices must be >= 1"),
        (["--zone", "central"], "zone 'central'"),
        (["--name", "My_Run"], "name 'My_Run'"),
        (["--config", "configs/missing.py"], "config file 'configs/missing.py' not found"),
        (["--config", "/etc/base.py"], "relative to the repository root"),
        (["--config.mesh.ici_parallelism.fsdp", "4"], "only --config.<field>=<value>"),
        (["--env", "1X=2"], "--env '1X=2' is not NAME=VALUE"),
        (["--sync", "git"], "needs --git_remote"),
        (["--python", "python2"], "--python 'python2'"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(monkeypatch, capsys, args, message):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("executed"))
    assert tpu_tool.main([*UP_ARGS, *args]) == 1
    assert message in capsys.readouterr().err


def test_overrides_are_refused_where_no_trainer_runs():
    with pytest.raises(SystemExit) as exit_info:
        tpu_tool.main(["stop", "--name", "x", "--config.a=1"])
    assert exit_info.value.code == 2


def test_missing_gcloud_and_unset_zone_are_clear_errors(monkeypatch, capsys):
    monkeypatch.setattr(tpu_tool.shutil, "which", lambda name: None)
    assert tpu_tool.main(["delete", "--name", "x"]) == 1
    assert "gcloud is not on PATH" in capsys.readouterr().err

    calls = []

    def gcloud_config(argv, **kwargs):
        calls.append(argv)
        value = "my-project\n" if argv[-1] == "core/project" else ""
        return subprocess.CompletedProcess(argv, 0, stdout=value, stderr="(unset)")

    with pytest.raises(ValueError, match="gcloud config set compute/zone"):
        tpu_vm.check_location_defaults(TpuTarget(name="x"), run=gcloud_config)
    tpu_vm.check_location_defaults(TpuTarget(name="x", zone="us-east5-a"), run=gcloud_config)
    assert calls[-1] == ["gcloud", "config", "get-value", "core/project"]


class FakeRun:
    """Stands in for subprocess.run: records argvs, answers with queued states or exit codes."""

    def __init__(self, states=(), fail_on=None):
        self.argvs, self.states, self.fail_on = [], list(states), fail_on

    def __call__(self, argv, check=False, capture_output=False, text=False):
        self.argvs.append(argv)
        if capture_output:
            return subprocess.CompletedProcess(argv, 0, stdout=self.states.pop(0) + "\n", stderr="")
        return subprocess.CompletedProcess(argv, int(self.fail_on is not None and
                                                     self.fail_on in argv))  # fmt: skip


def _wait(run, timeout_minutes=60.0):
    clock = iter(range(0, 100000, 30))
    step = tpu_launch.wait_step(TWO_SLICES, timeout_minutes=timeout_minutes, poll_seconds=30)
    sleeps = []
    steps_lib.execute([step], run=run, sleep=sleeps.append, clock=lambda: next(clock),
                      out=io.StringIO())  # fmt: skip
    return sleeps


def test_wait_polls_until_active():
    run = FakeRun(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    assert _wait(run) == [30, 30]
    assert run.argvs == [list(tpu_vm.state_command(TWO_SLICES))] * 3


def test_wait_stops_with_a_clear_message_on_failed_suspended_or_timeout():
    with pytest.raises(LaunchError, match=r"state is FAILED\. Details: gcloud .* describe my-run"):
        _wait(FakeRun(["PROVISIONING", "FAILED"]))
    with pytest.raises(LaunchError, match="state is SUSPENDED.*tools/tpu.py delete --name my-run"):
        _wait(FakeRun(["SUSPENDED"]))
    with pytest.raises(LaunchError, match=r"still WAITING_FOR_RESOURCES after 90 s .*queued"):
        _wait(FakeRun(["WAITING_FOR_RESOURCES"] * 5), timeout_minutes=1.5)


def test_a_failing_command_stops_the_launch_naming_the_step_and_hint():
    run = FakeRun(fail_on="my-run-1:mllm_jax.tar.gz")
    plan = [
        tpu_launch.sync_step(TWO_SLICES, tpu_launch.CodeSource(), REPO),
        tpu_launch.install_step(TWO_SLICES, python="python3.11"),
    ]
    with pytest.raises(LaunchError, match=r"step 'sync' failed: `gcloud .* scp .*my-run-1:.*` "
                       r"exited with status 1\. Is the queued resource ACTIVE"):  # fmt: skip
        steps_lib.execute(plan, run=run, out=io.StringIO())
    assert len(run.argvs) == 3  # archive, scp to slice 0, scp to slice 1; nothing after


def test_execute_runs_every_command_in_order():
    run = FakeRun()
    plan = [Step(name="a", description="", commands=(Command(argv=("x",)), Command(argv=("y",))))]
    steps_lib.execute(plan, run=run, out=io.StringIO())
    assert run.argvs == [["x"], ["y"]]


# The worker side, run here: bash with HOME in a temporary directory.


def _bash(script: str, home: pathlib.Path) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip


FAKE_TRAINER = """#!/bin/bash
echo "args: $*"
echo "env: $PYTHONUNBUFFERED|$LIBTPU_INIT_ARGS"
trap 'echo "TERM: saved"; exit 0' TERM
while true; do sleep 0.05; done
"""


@pytest.fixture
def worker_home(tmp_path):
    """A worker's home with the code unpacked from an archive and a stand-in trainer as .venv
    python; kills what the test started."""
    archive = tmp_path / "home" / worker_scripts.REMOTE_ARCHIVE
    archive.parent.mkdir()
    trainer = tmp_path / "python"
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(trainer, arcname=".venv/bin/python")
    yield tmp_path / "home"
    pid_file = tmp_path / "home" / "mllm_jax_logs" / "train.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _log_when(home: pathlib.Path, text: str) -> str:
    log = home / "mllm_jax_logs" / "train.log"
    for _ in range(200):
        if log.exists() and text in log.read_text():
            return log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log: {log.read_text() if log.exists() else None}")


def test_worker_scripts_unpack_start_refuse_a_second_run_tail_and_stop(worker_home):
    assert _bash(worker_scripts.unpack_archive_script(), worker_home).returncode == 0
    assert (worker_home / "mllm_jax" / ".venv" / "bin" / "python").exists()
    assert not (worker_home / worker_scripts.REMOTE_ARCHIVE).exists()

    run = TrainRun(config="configs/base.py", workdir="gs://b/r", overrides=("--config.x=a b",),
                   env=(("LIBTPU_INIT_ARGS", "--xla_a=1 --xla_b=2"),))  # fmt: skip
    start = worker_scripts.start_run_script(worker_scripts.train_argv(run, 2), run.env)
    started = _bash(start, worker_home)
    assert started.returncode == 0, started.stderr
    assert "started pid" in started.stdout
    log = _log_when(worker_home, "env:")
    assert ("args: -m mllm_jax.train --config configs/base.py --workdir gs://b/r "
            "--config.x=a b --config.mesh.dcn_parallelism.data=2") in log  # fmt: skip
    assert "env: 1|--xla_a=1 --xla_b=2" in log

    again = _bash(start, worker_home)
    assert again.returncode == 1 and "a run is still going" in again.stderr
    tail = _bash(worker_scripts.tail_log_script(1, follow=False), worker_home)
    assert tail.stdout.startswith("env: 1|")

    stopped = _bash(worker_scripts.stop_script("TERM"), worker_home)
    assert "sent TERM" in stopped.stdout
    _log_when(worker_home, "TERM: saved")
    for _ in range(100):  # the stand-in exits after its "save"
        if "no run going" in _bash(worker_scripts.stop_script("TERM"), worker_home).stdout:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the run did not stop")
    assert _bash(start, worker_home).returncode == 0  # a stopped run can be started again
    assert _log_when(worker_home, "start\n").count("=== ") == 2  # appended, not overwritten


def test_git_sync_script_checks_out_a_commit_fresh_and_over_an_earlier_copy(tmp_path):
    env = dict(os.environ, GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@b", GIT_COMMITTER_NAME="a",
               GIT_COMMITTER_EMAIL="a@b")  # fmt: skip
    source = tmp_path / "source"
    source.mkdir()
    commits = []
    for text in ("one", "two"):
        (source / "file.txt").write_text(text)
        for argv in (["init", "-q"], ["add", "file.txt"], ["commit", "-qm", text]):
            subprocess.run(["git", "-C", str(source), *argv], env=env, check=True)
        head = ["git", "-C", str(source), "rev-parse", "HEAD"]
        commits.append(subprocess.run(head, capture_output=True, text=True).stdout.strip())
    home = tmp_path / "home"
    home.mkdir()
    for commit, text in zip(commits, ("one", "two"), strict=True):
        done = _bash(worker_scripts.git_checkout_script(str(source), commit), home)
        assert done.returncode == 0, done.stderr
        assert (home / "mllm_jax" / "file.txt").read_text() == text


def _documented_commands() -> list[list[str]]:
    text = (REPO / "docs" / "tpu.md").read_text().replace("\\\n", " ")
    return [
        shlex.split(line, comments=True)[2:]
        for line in text.splitlines()
        if line.startswith("python tools/tpu.py ")
    ]


def test_every_command_in_docs_tpu_md_is_accepted(capsys):
    commands = _documented_commands()
    assert len(commands) >= 9
    for argv in commands:
        assert tpu_tool.main([*argv, "--dry_run"]) == 0, argv
