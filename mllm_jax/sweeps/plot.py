"""Bar charts of per-group metric means with sample-std error bars, one panel per metric.

Drawn on a ``matplotlib.figure.Figure`` with an Agg canvas (no pyplot) by ``train/plots.py``'s
``new_figure``; without matplotlib (the ``plots`` extra) there is no plot and one warning.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence

from mllm_jax.sweeps.aggregate import Group
from mllm_jax.train.plots import new_figure

_COLUMNS = 3


def plot_groups(
    groups: Sequence[Group], metrics: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> pathlib.Path | None:
    """Writes a PNG with one bar chart per metric (a bar per group, std error bars, n under each
    label) to ``path`` and returns it; None, writing nothing, without metrics or groups or
    without matplotlib."""
    if not metrics or not groups:
        return None
    columns = min(_COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    panel_width = max(3.5, 0.7 * len(groups) + 1.5)
    figure = new_figure((panel_width * columns, 3.8 * rows))
    if figure is None:
        return None
    positions = list(range(len(groups)))
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, index + 1)
        stats = [group.stats[metric] for group in groups]
        axes.bar(
            positions,
            [s.mean for s in stats],
            yerr=[0.0 if math.isnan(s.std) else s.std for s in stats],
            capsize=4,
            color="tab:blue",
            alpha=0.8,
        )
        labels = [f"{group.label}\n(n={s.n})" for group, s in zip(groups, stats, strict=True)]
        axes.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
        axes.set_title(metric, fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, format="png")
    return path
