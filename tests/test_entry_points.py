"""The installed commands ([project.scripts] in pyproject.toml) start and print their usage.

Each runs with ``--help`` from the venv's bin directory (``pip install -e .`` puts them there).
absl prints the usage and exits with status 1 before ``main``, so nothing heavier than the
command's imports runs: about 0.2 s each, 3 s for ``mllm-generate``, which imports jax.
"""

import pathlib
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent

# command -> (first line of its module docstring, flags its usage lists)
COMMANDS = {
    "mllm-train": ("Command line: ``python -m mllm_jax.train", ("--config", "--workdir")),
    "mllm-generate": (
        "Answer questions about images",
        ("--model_dir", "--hf_dir", "--image", "--question"),
    ),
    "mllm-sweep": ("Command line: run a named sweep", ("--sweep", "--workdir", "--dry_run")),
    "mllm-prepare-data": ("Builds a dataset into a TFDS data_dir", ("--dataset", "--data_dir")),
}


def test_every_declared_script_is_checked_here():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_prints_its_docstring_and_flags(command, tmp_path):
    script = BIN / command
    if not script.exists():
        pytest.fail(f"{script} is missing: reinstall the project (pip install -e .)")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)  # absl's status for --help
    docstring_start, flag_names = COMMANDS[command]
    assert result.stdout.lstrip().startswith(docstring_start), result.stdout[:500]
    for flag in flag_names:
        assert f"  {flag}" in result.stdout, (flag, result.stdout)


def test_tools_prepare_data_still_runs_the_same_command(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--help"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    assert "mllm-prepare-data" in result.stdout and "  --dataset" in result.stdout
