"""Loss and accuracy curves from metric records (``read_jsonl`` output) as PNG files.

Figures are drawn on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so
plotting from a training process opens no window, touches no global figure registry and works
on headless TPU VMs.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


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
    series: dict[str, tuple[list[int], list[float]]], ylabel: str, path: pathlib.Path
) -> None:
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
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
    non-numeric values are left out; a plot with no finite point is not written.
    """
    out_dir = pathlib.Path(out_dir)
    written = []
    for name, select in (("loss", _is_loss), ("accuracy", _is_accuracy)):
        series = _series(records, select)
        if not series:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{prefix}{name}.png"
        _save_plot(series, name, path)
        written.append(path)
    return written
