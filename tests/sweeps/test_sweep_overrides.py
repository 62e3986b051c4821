"""Overrides on a real config file: errors that name the point and the key, and the command line
parsing to the same config."""

import pytest

from mllm_jax.sweeps.definition import Sweep
from mllm_jax.sweeps.overrides import (
    OverrideError,
    apply_overrides,
    check_command_line,
    flag_arguments,
    load_config,
    parse_command_line,
)
from mllm_jax.sweeps.points import Point
from mllm_jax.sweeps.runner import plan_sweep

CONFIG = "configs/base.py:size=test"
WHERE = "sweep point 'p1'"


def _apply(overrides):
    return apply_overrides(load_config(CONFIG), overrides, where=WHERE)


def test_overrides_set_nested_fields_and_the_command_line_agrees():
    overrides = {
        "optimizer.learning_rate": 3e-4,
        "optimizer.warmup_steps": 1,
        "model.scan_layers": True,
        "model.dtype": "bfloat16",
        "mesh.ici_parallelism.fsdp": 2,
        "training.eval_batches": 1,
        "seed": 7,
    }
    config = _apply(overrides)
    assert config.optimizer.learning_rate == 3e-4 and config.model.scan_layers is True
    assert config.mesh.ici_parallelism.fsdp == 2 and config.seed == 7
    assert config.model.num_layers == load_config(CONFIG).model.num_layers
    check_command_line(CONFIG, overrides, config, where=WHERE)
    parsed = parse_command_line(CONFIG, flag_arguments(overrides))
    assert parsed.to_dict() == config.to_dict()


def test_an_int_for_a_float_field_becomes_a_float():
    config = _apply({"optimizer.learning_rate": 1})
    assert config.optimizer.learning_rate == 1.0
    assert isinstance(config.optimizer.learning_rate, float)


@pytest.mark.parametrize(
    "key, message",
    [
        ("model.projektor", "override 'model.projektor': model has no field 'projektor'"),
        ("modl.num_layers", "override 'modl.num_layers': the config has no field 'modl'"),
        ("seed.value", "override 'seed.value': seed has no field 'value'"),
    ],
)
def test_unknown_keys_name_the_point_and_the_key(key, message):
    with pytest.raises(OverrideError, match=f"^{WHERE}: {message}"):
        _apply({key: 1})


@pytest.mark.parametrize(
    "key, value, field_type",
    [
        ("training.num_steps", 2.5, "int"),
        ("model.dtype", 16, "str"),
        ("model.scan_layers", 1, "bool"),
        ("seed", True, "int"),
    ],
)
def test_type_mismatches_name_the_point_the_key_and_the_type(key, value, field_type):
    pattern = rf"^{WHERE}: override {key}={value!r} \(\w+\) does not match the field's type "
    with pytest.raises(OverrideError, match=pattern + field_type):
        _apply({key: value})


def test_an_override_the_command_line_cannot_express_is_refused():
    overrides = {"mesh.logical_axis_rules": [("embed", None)]}
    config = _apply(overrides)
    with pytest.raises(OverrideError, match=f"^{WHERE}: the train command line cannot apply"):
        check_command_line(CONFIG, overrides, config, where=WHERE)


def test_a_bad_point_stops_the_plan_before_anything_runs(tmp_path):
    sweep = Sweep([Point(CONFIG, {"seed": 0}), Point(CONFIG, {"training.num_step": 3, "seed": 1})])
    with pytest.raises(OverrideError, match="sweep point 'seed=1,training.num_step=3'"):
        plan_sweep(sweep, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(ValueError, match="'seed=0' .*configs/nope.py.* does not exist"):
        plan_sweep(Sweep([Point("configs/nope.py", {"seed": 0})]), tmp_path / "sweep")
