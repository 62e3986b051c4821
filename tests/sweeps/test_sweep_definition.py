"""Loading a named sweep function from a Python file."""

import pytest

from mllm_jax.sweeps.definition import Sweep, load_sweep
from mllm_jax.sweeps.points import Point

SWEEP_FILE = """
from mllm_jax.sweeps import Point, Sweep, seeds

def two_seeds():
    for overrides in seeds(2):
        yield Point("configs/base.py:size=test", overrides)

def with_metrics():
    return Sweep([Point("configs/base.py", {})], metrics=("eval_loss",), seed_keys=("data.seed",))

def not_points():
    return [{"seed": 0}]

def _helper():
    return []
"""


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "my_sweeps.py"
    path.write_text(SWEEP_FILE)
    return path


def test_a_generator_of_points_and_a_returned_sweep_both_load(sweep_file):
    sweep = load_sweep(f"{sweep_file}:two_seeds")
    assert sweep == Sweep(
        [Point("configs/base.py:size=test", {"seed": 0}),
         Point("configs/base.py:size=test", {"seed": 1})]
    )  # fmt: skip
    sweep = load_sweep(f"{sweep_file}:with_metrics")
    assert sweep.metrics == ("eval_loss",) and sweep.seed_keys == ("data.seed",)


def test_a_missing_sweep_name_lists_the_file_s_sweep_functions(sweep_file):
    for spec in (str(sweep_file), f"{sweep_file}:nope"):
        with pytest.raises(ValueError, match=r"its functions: \['not_points', 'two_seeds', "):
            load_sweep(spec)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_sweep("missing.py:x")


def test_items_that_are_not_points_are_refused(sweep_file):
    with pytest.raises(TypeError, match=r"item 0 is \{'seed': 0\}, not a Point"):
        load_sweep(f"{sweep_file}:not_points")
