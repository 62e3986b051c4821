"""A damaged latest checkpoint falls back to the newest good step, naming what was wrong; missing
or damaged base weights are clear errors."""

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.train import checkpoint as ckpt

ABSTRACT = dict(
    abstract_trainable={"w": jax.ShapeDtypeStruct((4,), jnp.float32)},
    abstract_opt_state={"m": jax.ShapeDtypeStruct((2,), jnp.float32)},
)


def _save(checkpointer: ckpt.TrainingCheckpointer, step: int, base_params_path: str = "") -> None:
    checkpointer.save(
        step,
        trainable_params={"w": jnp.full((4,), float(step))},
        opt_state={"m": jnp.full((2,), -float(step))},
        data_state={"position": step},
        metadata=ckpt.checkpoint_metadata(
            config={}, adapter=AdapterConfig(), base_params_path=base_params_path
        ),
        force=True,
    )


@pytest.fixture
def checkpoints(tmp_path) -> pathlib.Path:
    directory = tmp_path / "checkpoints"
    with ckpt.TrainingCheckpointer(directory, max_to_keep=3, async_save=False) as checkpointer:
        for step in (1, 2, 3):
            _save(checkpointer, step)
    return directory


def _files(step_dir: pathlib.Path, under: str) -> list[pathlib.Path]:
    return [p for p in (step_dir / under).rglob("*") if p.is_file()]


def _empty(step_dir, under):
    for path in _files(step_dir, under):
        path.write_bytes(b"")


def _garbage(step_dir, under):
    rng = np.random.default_rng(0)
    for path in _files(step_dir, under):
        path.write_bytes(rng.bytes(max(path.stat().st_size, 16)))


DAMAGE = {
    "trainable item deleted": (
        lambda d: shutil.rmtree(d / "trainable"),
        "['trainable'] are missing",
    ),
    "data state emptied": (lambda d: _empty(d, "data"), "JSONDecodeError"),
    "array data emptied": (lambda d: _empty(d, "trainable/d"), "trainable"),
    "garbage bytes": (lambda d: _garbage(d, "opt_state"), "Error"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_latest_step_falls_back_to_the_newest_good_one(checkpoints, case, caplog):
    damage, named = DAMAGE[case]
    damage(checkpoints / "3")
    with ckpt.TrainingCheckpointer(checkpoints, async_save=False) as checkpointer:
        restored = checkpointer.restore_latest_good(**ABSTRACT)
        assert restored.step == 2 and restored.data_state == {"position": 2}
        np.testing.assert_array_equal(restored.trainable["w"], np.full(4, 2.0))
        np.testing.assert_array_equal(restored.opt_state["m"], np.full(2, -2.0))
        assert "checkpoint step 3" in caplog.text and named in caplog.text
        # The damaged step is kept aside, and the run can save step 3 again.
        assert checkpointer.all_steps() == [1, 2]
        assert (checkpoints / "unusable-3").is_dir()
        _save(checkpointer, 3)
    with ckpt.TrainingCheckpointer(checkpoints, async_save=False) as checkpointer:
        assert checkpointer.restore_latest_good(**ABSTRACT).step == 3


def test_a_step_the_caller_rejects_falls_back_too(checkpoints):
    def check(restored):
        if restored.data_state["position"] == 3:
            raise ValueError("iterator state from another pipeline")

    with ckpt.TrainingCheckpointer(checkpoints, async_save=False) as checkpointer:
        assert checkpointer.restore_latest_good(**ABSTRACT, check=check).step == 2


def test_when_no_step_restores_each_problem_is_named_and_nothing_moves(checkpoints):
    for step in (1, 2, 3):
        shutil.rmtree(checkpoints / str(step) / "data")
    with ckpt.TrainingCheckpointer(checkpoints, async_save=False) as checkpointer:
        missing = r"FileNotFoundError: its item\(s\) \['data'\] are missing"
        with pytest.raises(RuntimeError, match=f"step 3: {missing}; step 2: .*new workdir"):
            checkpointer.restore_latest_good(**ABSTRACT)
        assert checkpointer.all_steps() == [1, 2, 3]


def test_an_empty_directory_has_nothing_to_restore(tmp_path):
    with ckpt.TrainingCheckpointer(tmp_path / "none", async_save=False) as checkpointer:
        assert checkpointer.restore_latest_good(**ABSTRACT) is None


def test_missing_or_damaged_base_params_are_named(tmp_path):
    frozen = {"kernel": jnp.ones((2, 3))}
    base = tmp_path / "run" / "base_params"
    abstract = ckpt.abstract_like(frozen)
    with pytest.raises(FileNotFoundError, match=f"base params .*{base} is missing"):
        ckpt.load_base_params(base, abstract)
    with pytest.raises(FileNotFoundError, match=f"{base} is missing"):
        ckpt.read_params(base)
    base.mkdir(parents=True)
    with pytest.raises(ValueError, match=f"base params directory {base} .*delete it and rerun"):
        ckpt.save_base_params(base, frozen)


def test_trained_params_need_the_base_params_the_run_froze(tmp_path):
    workdir = tmp_path / "run"
    base_path = ckpt.save_base_params(workdir / "base_params", {"kernel": jnp.ones((2, 3))})
    with ckpt.TrainingCheckpointer(workdir / "checkpoints", async_save=False) as checkpointer:
        _save(checkpointer, 1, base_params_path=base_path)
    assert set(ckpt.load_trained_params(workdir)) == {"w", "kernel"}
    shutil.rmtree(workdir / "base_params")
    with pytest.raises(FileNotFoundError, match="base_params is missing, but the run .* froze"):
        ckpt.load_trained_params(workdir)
    os.rename(workdir / "checkpoints", tmp_path / "elsewhere")  # no checkpoint: its own error
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        ckpt.load_trained_params(workdir)
