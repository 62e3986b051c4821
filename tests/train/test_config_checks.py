"""Config values that cannot train are refused by field name before anything compiles: optimizer
fields, learning rates, batch sizes the mesh cannot split, sequences too short for an image."""

import math

import ml_collections
import pytest

from configs import llava_vce
from mllm_jax import sharding
from mllm_jax.recipes import llava_demo
from mllm_jax.recipes.llava_stage_config import check_stage_section
from mllm_jax.train.optimizer import check_optimizer_config
from mllm_jax.train.param_groups import ParamGroup, make_grouped_optimizer
from mllm_jax.train.step import check_batch_size

GOOD_OPTIMIZER = dict(
    learning_rate=1e-3, warmup_steps=0, end_learning_rate_fraction=0.1, b1=0.9, b2=0.95,
    eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
)  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", -1e-3), ("learning_rate", 0.0), ("learning_rate", math.nan),
        ("b1", 1.0), ("b2", -0.1), ("eps", 0.0), ("weight_decay", -0.01),
        ("grad_clip_norm", 0.0), ("end_learning_rate_fraction", 1.5), ("warmup_steps", -1),
    ],
)  # fmt: skip
def test_optimizer_fields_out_of_range_are_named(field, value):
    config = ml_collections.ConfigDict({**GOOD_OPTIMIZER, field: value})
    with pytest.raises(ValueError, match=rf"^optimizer\.{field}={value!r} must be"):
        check_optimizer_config(config)


def test_the_optimizer_is_not_built_from_a_bad_config():
    check_optimizer_config(ml_collections.ConfigDict(GOOD_OPTIMIZER))
    groups = [ParamGroup(name="all", patterns=(".",), learning_rate=1e-3)]
    bad = ml_collections.ConfigDict({**GOOD_OPTIMIZER, "b2": 1.5})
    with pytest.raises(ValueError, match=r"optimizer\.b2=1\.5"):
        make_grouped_optimizer(bad, groups, num_steps=10)


@pytest.mark.parametrize("learning_rate", [-3e-4, 0.0, math.inf])
def test_a_param_group_needs_a_positive_learning_rate(learning_rate):
    with pytest.raises(ValueError, match=r"param group 'lora': learning_rate=.* must be a finite"):
        ParamGroup(name="lora", patterns=("lora",), learning_rate=learning_rate)


@pytest.fixture(scope="module")
def mesh_and_rules(devices):
    config = llava_vce.get_config("size=test")
    mesh = sharding.create_mesh_from_config(config.mesh, devices)
    return mesh, sharding.logical_rules_from_config(config.mesh.logical_axis_rules)


def test_a_batch_size_the_mesh_cannot_split_is_named(mesh_and_rules):
    mesh, rules = mesh_and_rules
    check_batch_size(16, mesh, rules, field="data.batch_size", accumulation_steps=2)
    with pytest.raises(ValueError, match=r"data\.batch_size=6: the 8-way .* multiple of 8"):
        check_batch_size(6, mesh, rules, field="data.batch_size")
    with pytest.raises(ValueError, match=r"accumulation_steps=3 .* multiple of 24 \(e\.g\. 24\)"):
        check_batch_size(16, mesh, rules, field="data.batch_size", accumulation_steps=3)


@pytest.mark.parametrize(
    "stage, field, value, message",
    [
        ("stage2", "adapter_learning_rate", -4e-3, r"stage2\.adapter_learning_rate=-0\.004"),
        ("stage1", "seq_len", 16, r"stage1\.seq_len=16 cannot hold one image: .* 16 tokens"),
        ("stage0_lm", "batch_size", 6, r"stage0_lm\.batch_size=6: the 8-way"),
        ("stage0_vision", "warmup_steps", 10**6, r"stage0_vision\.warmup_steps=1000000"),
    ],
)
def test_each_stage_section_is_checked_before_any_stage_runs(
    mesh_and_rules, stage, field, value, message
):
    mesh, rules = mesh_and_rules
    config = llava_vce.get_config("size=test")
    for name in llava_demo.TRAINING_STAGES:
        check_stage_section(config, name, mesh=mesh, rules=rules, tokens_per_image=16)
    config[stage][field] = value
    with pytest.raises(ValueError, match=message):
        check_stage_section(config, stage, mesh=mesh, rules=rules, tokens_per_image=16)
    config = llava_vce.get_config("size=test")
    config.training.log_every = 0
    with pytest.raises(ValueError, match=r"training\.log_every=0 must be >= 1"):
        check_stage_section(config, stage, mesh=mesh, rules=rules, tokens_per_image=16)


def test_the_llava_job_refuses_a_bad_late_stage_before_training_any(tmp_path):
    config = llava_vce.get_config("size=test")
    config.stage2.projector_learning_rate = -1.0
    with pytest.raises(ValueError, match=r"stage2\.projector_learning_rate=-1\.0"):
        llava_demo.run(config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_url_workdir_is_refused_instead_of_becoming_a_local_directory(tmp_path):
    from mllm_jax.train.trainer import check_local_workdir

    check_local_workdir(tmp_path / "run")
    with pytest.raises(ValueError, match="gs://bucket/run.*gcsfuse"):
        check_local_workdir("gs://bucket/run")
