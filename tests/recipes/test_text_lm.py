"""The text LM (configs/base.py, configs/moe_lm.py) through the shared trainer: a killed and
resumed run ends bit-identical to an uninterrupted one, dense and MoE, and profiling works."""

import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import base, moe_lm
from mllm_jax import sharding
from mllm_jax.data import text_corpus
from mllm_jax.recipes import text_lm
from mllm_jax.train.metric_writers import read_jsonl
from mllm_jax.train.trainer import train

SEQ_LEN = 32


@functools.cache
def _datasets():
    return text_corpus.make_text_datasets(SEQ_LEN, 5)


def _config(name: str):
    config = base.get_config("size=test") if name == "dense" else moe_lm.get_config("size=test")
    config.training.update(
        num_steps=8, log_every=1, eval_every=4, checkpoint_every=3, eval_batches=1,
        progress_bar=False,
    )  # fmt: skip
    return config


def _train(config, workdir, **kwargs):
    mesh = sharding.create_mesh_from_config(config.mesh)
    rules = sharding.logical_rules_from_config(config.mesh.logical_axis_rules)
    return train(
        text_lm.text_lm_task(config, mesh, rules, *_datasets()),
        optimizer_config=config.optimizer, training_config=config.training, mesh=mesh,
        rules=rules, workdir=workdir, seed=config.seed, **kwargs,
    )  # fmt: skip


def _flat(params):
    return traverse_util.flatten_dict(jax.device_get(params), sep="/")


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_killed_and_resumed_text_lm_ends_bit_identical(name, tmp_path):
    config = _config(name)
    if name == "dense":  # one run also checks the profiler trace of steps 2-3
        config.training.update(profile_start_step=2, profile_num_steps=2)
    straight = _train(config, tmp_path / "straight")
    # A hard kill after step 5: the checkpoint of step 3 survives, steps 4-5 are redone.
    killed = _train(_config(name), tmp_path / "resumed", stop_after_steps=5)
    assert killed.preempted and killed.step == 5
    resumed = _train(_config(name), tmp_path / "resumed")
    assert resumed.step == 8 and [r["step"] for r in resumed.history] == [4, 5, 6, 7, 8]
    losses = {r["step"]: r["loss"] for r in straight.history}
    assert all(r["loss"] == losses[r["step"]] for r in resumed.history)
    a, b = _flat(straight.params), _flat(resumed.params)
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []
    if name == "moe":
        assert any(k.startswith("moe/") for k in straight.history[-1])
    else:
        assert list((tmp_path / "straight" / "profile").rglob("*.xplane.pb"))
    assert "eval_loss" in straight.history[-1]
    # Steps 4-5 were logged by the killed run and redone by the resumed one: the log holds
    # each step once, with the redone values.
    records = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [losses[step] for step in range(1, 9)]
