"""Loss and accuracy curves from metric records (``read_jsonl`` output) as PNG files.

Figures are drawn on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so
plotting from a training process opens no window, touches no global figure registry and works
on headless TPU VMs. matplotlib is optional (the ``plots`` extra, part of ``demo`` and ``test``):
a run is the same without it, only without its PNGs, and the process logs one warning saying so.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any


@functools.cache
def _figure_classes() -> tuple[type, type] | None:
    """(Figure, FigureCanvasAgg), or None after one warning when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        logging.warning("no PNG plots: %s is not installed (pip install 'mllm_jax[plots]')", e.name)
        return None
    return Figure, FigureCanvasAgg


def new_figure(figsize: tuple[float, float], dpi: int = 100) -> Any:
    """A ``matplotlib.figure.Figure`` on an Agg canvas; None when matplotlib is not installed."""
    classes = _figure_classes()
    if classes is None:
        return None
    figure_class, canvas_class = classes
    figure = figure_class(figsize=figsize, dpi=dpi)
    canvas_class(figure)
    return figure


def _is_loss(key: str) -> bool:
    return key.endswith("loss")


def _is_accuracy(key: str) -> bool:
    return "accuracy" in key


def _is_eval(key: str) -> bool:
    return key.startswith("eval")


def _series(
    records: Sequence[dict[str, Any]], select: Callable[[str], bool]
) -> dict[str, tuple[list[int], list[float]]]:
    """Per selected key, the (steps, values) of the records holding a finite number for it."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for index, record in enumerate(records):
        if "step" not in record:
            raise ValueError(f"metric record {index} has no 'step': {record!r}")
        for key, value in record.items():
            if key == "step" or not select(key) or isinstance(value, bool):
                continue
            if isinstance(value, numbers.Real) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return series


def _save_plot(
    figure: Any, series: dict[str, tuple[list[int], list[float]]], ylabel: str, path: pathlib.Path
) -> None:
    axes = figure.add_subplot()
    for key in sorted(series):
        steps, values = series[key]
        if _is_eval(key):
            axes.plot(steps, values, marker="o", linestyle="--", linewidth=1, label=key)
        else:
            axes.plot(steps, values, linewidth=1, label=key)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def plot_curves(
    records: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str], *, prefix: str = ""
) -> list[pathlib.Path]:
    """Writes ``{prefix}loss.png`` and ``{prefix}accuracy.png`` to ``out_dir``; returns their paths.

    ``loss.png`` plots every key that ends in ``loss`` against ``step``, ``accuracy.png`` every
    key containing ``accuracy``; keys starting with ``eval`` are drawn as markers. Non-finite and
    non-numeric values are left out; a plot with no finite point is not written. Without
    matplotlib nothing is written (see the module docstring).
    """
    out_dir = pathlib.Path(out_dir)
    written = []
    for name, select in (("loss", _is_loss), ("accuracy", _is_accuracy)):
        series = _series(records, select)
        if not series:
            continue
        figure = new_figure((8, 5))
        if figure is None:
            break
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{prefix}{name}.png"
        _save_plot(figure, series, name, path)
        written.append(path)
    return written
