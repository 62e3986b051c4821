"""Sweep points: grid/product order, seeds, and the names that become point workdirs."""

import pytest

from mllm_jax.sweeps.points import (
    Point,
    describe,
    format_value,
    grid,
    point_names,
    product,
    safe_name,
    seeds,
)


def test_grid_varies_the_first_axis_slowest():
    assert grid(seed=[0, 1, 2], **{"model.projector": ["vce", "mlp"]}) == [
        {"seed": 0, "model.projector": "vce"},
        {"seed": 0, "model.projector": "mlp"},
        {"seed": 1, "model.projector": "vce"},
        {"seed": 1, "model.projector": "mlp"},
        {"seed": 2, "model.projector": "vce"},
        {"seed": 2, "model.projector": "mlp"},
    ]
    assert grid() == [{}]


def test_grid_rejects_a_single_string_as_an_axis():
    with pytest.raises(TypeError, match="'model.projector' needs a list"):
        grid(**{"model.projector": "vce"})


def test_product_merges_one_dict_per_list_in_order():
    adapters = [
        {"model.adapter.kind": "lora", "model.adapter.rank": 8},
        {"model.adapter.kind": "dual_lora", "model.adapter.rank": 4},
    ]
    assert product(adapters, seeds(2)) == [
        {"model.adapter.kind": "lora", "model.adapter.rank": 8, "seed": 0},
        {"model.adapter.kind": "lora", "model.adapter.rank": 8, "seed": 1},
        {"model.adapter.kind": "dual_lora", "model.adapter.rank": 4, "seed": 0},
        {"model.adapter.kind": "dual_lora", "model.adapter.rank": 4, "seed": 1},
    ]
    assert seeds(3, key="data.seed") == [{"data.seed": 0}, {"data.seed": 1}, {"data.seed": 2}]


def test_product_refuses_two_lists_setting_the_same_key():
    with pytest.raises(ValueError, match=r"\['seed'\] set by more than one list"):
        product(seeds(2), [{"seed": 5, "x": 1}])


def test_point_names_sort_keys_and_format_values_like_the_command_line():
    points = [
        Point("configs/base.py", {"seed": 1, "model.projector": "mlp"}),
        Point("configs/base.py", {"optimizer.learning_rate": 3e-4, "model.scan_layers": True}),
        Point("configs/base.py", {"vision.sizes": (1, 2)}),
        Point("configs/base.py", {}),
        Point("configs/base.py", {"seed": 2}, name="my run"),
    ]
    assert point_names(points) == [
        "model.projector=mlp,seed=1",
        "model.scan_layers=true,optimizer.learning_rate=0.0003",
        "vision.sizes=_1,_2_",
        "default",
        "my_run",
    ]
    assert format_value(1e-5) == "1e-05" and format_value([1, 2]) == "(1, 2)"


def test_names_are_filesystem_safe_and_long_ones_stay_distinct():
    assert safe_name("data.path=/tmp/a b") == "data.path=_tmp_a_b"
    assert safe_name("..") == "__"
    long_a = describe({f"key_{i}": "value" for i in range(20)})
    long_b = describe({f"key_{i}": "value" for i in range(21)})
    name_a, name_b = safe_name(long_a), safe_name(long_b)
    assert len(name_a) == len(name_b) == 120 and name_a != name_b
    assert name_a[:100] == long_a[:100]


def test_points_of_different_configs_are_named_with_their_config():
    points = [
        Point("configs/base.py:size=tiny", {"seed": 0}),
        Point("configs/moe_lm.py:experts=8,top_k=2", {"seed": 0}),
    ]
    assert point_names(points) == ["base+size=tiny,seed=0", "moe_lm+experts=8+top_k=2,seed=0"]


def test_two_points_with_one_name_are_an_error_naming_both():
    points = [Point("configs/base.py", {"seed": 0}), Point("configs/base.py", {"seed": 0})]
    with pytest.raises(ValueError, match=r"points 0 .* and 1 .* both named 'seed=0'"):
        point_names(points)
