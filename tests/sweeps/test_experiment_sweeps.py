"""Every sweep the repository ships plans cleanly: its configs load and every override exists.

A renamed config field would otherwise surface only when someone launches the sweep.
"""

import importlib.util
import pathlib

import pytest

from mllm_jax.sweeps.definition import _sweep_functions, load_sweep
from mllm_jax.sweeps.runner import plan_sweep

REPO = pathlib.Path(__file__).resolve().parents[2]
SWEEP_FILES = ("experiments/ablations.py", "experiments/lm_sweeps.py")


def _sweep_specs() -> list[str]:
    specs = []
    for file in SWEEP_FILES:
        module_spec = importlib.util.spec_from_file_location("listed", REPO / file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        specs += [f"{file}:{name}" for name in _sweep_functions(module)]
    return specs


@pytest.mark.parametrize("spec", _sweep_specs())
def test_shipped_sweep_plans_with_unique_workdirs(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the sweeps name configs relative to the repository root
    sweep = load_sweep(spec)
    planned = plan_sweep(sweep, tmp_path)
    directories = [point.directory for point in planned]
    assert len(set(directories)) == len(directories) == len(sweep.points) > 0
    for point in planned:
        assert point.command[-2:] == ("--workdir", str(point.directory))


def test_ablation_sweeps_vary_one_thing_over_three_seeds():
    ablations = REPO / "experiments" / "ablations.py"
    llava = ("projector", "projector_grid_long", "adapters", "dual_lora_vs_lora_long")
    for name in (*llava, "moe_vs_dense", "semi_causal"):
        sweep = load_sweep(f"{ablations}:{name}")
        seeds_per_group: dict[tuple, set] = {}
        for point in sweep.points:
            rest = {k: v for k, v in point.overrides.items() if k != "seed"}
            key = (point.config, tuple(sorted((k, repr(v)) for k, v in rest.items())))
            seeds_per_group.setdefault(key, set()).add(point.overrides["seed"])
        assert all(seeds == {0, 1, 2} for seeds in seeds_per_group.values()), name
