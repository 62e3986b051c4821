"""A named sweep: a function in a Python file (``FILE:NAME``) that yields points or returns a Sweep.

    # experiments/lm_sweeps.py
    def learning_rates():
        for overrides in product(grid(**{"optimizer.learning_rate": [1e-3, 3e-3]}), seeds(3)):
            yield Point("configs/base.py:size=tiny", overrides)

A function returning ``Sweep(points, metrics=...)`` also names the metrics its tables show.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import pathlib
from collections.abc import Sequence

from mllm_jax.sweeps.points import Point


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Points to run and how to report them.

    ``metrics`` and ``plot_metrics`` are fnmatch patterns over the (``/``-flattened) keys of
    the points' ``results.json``: the table columns (empty: every numeric metric) and the bar
    charts (empty: the table's). ``seed_keys`` are the overrides that only replicate a run:
    points differing in nothing else are one group of the mean ± std table.
    """

    points: Sequence[Point]
    metrics: Sequence[str] = ()
    plot_metrics: Sequence[str] = ()
    seed_keys: Sequence[str] = ("seed",)


def _sweep_functions(module) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value) and value.__module__ == module.__name__ and name[0] != "_"
    )


def load_sweep(spec: str) -> Sweep:
    """Calls ``NAME()`` from the Python file ``FILE`` for ``spec = "FILE:NAME"``.

    The function may return a Sweep or any iterable of Points (a generator).
    """
    file, _, name = spec.partition(":")
    path = pathlib.Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {file!r} (from --sweep={spec}) does not exist")
    module_spec = importlib.util.spec_from_file_location(f"sweep_file_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None) if name else None
    if not callable(function):
        raise ValueError(
            f"--sweep={spec}: name a sweep function of {file} as {file}:NAME; "
            f"its functions: {_sweep_functions(module)}"
        )
    result = function()
    sweep = result if isinstance(result, Sweep) else Sweep(points=list(result))
    sweep = dataclasses.replace(sweep, points=list(sweep.points))
    for index, point in enumerate(sweep.points):
        if not isinstance(point, Point):
            raise TypeError(f"sweep {spec}: item {index} is {point!r}, not a Point")
    if not sweep.points:
        raise ValueError(f"sweep {spec} has no points")
    return sweep
