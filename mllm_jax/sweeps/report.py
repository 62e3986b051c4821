"""A sweep's result files in its workdir.

results.csv     one row per point: point, config, status, seconds, every override, the metrics
aggregated.csv  one row per group of seeds: group, n, <metric>_mean, <metric>_std, <metric>_n
results.md      the command, the mean ± std table, the per-point table and the plot
results.png     bar charts of the plot metrics per group with std error bars
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
from collections.abc import Sequence

from mllm_jax.sweeps.aggregate import Group, MetricStats, PointResult
from mllm_jax.sweeps.plot import plot_groups
from mllm_jax.sweeps.points import format_value
from mllm_jax.train.summary_table import format_table


def format_number(value: float | None) -> str:
    """Compact text for a table cell: integers whole, others to 4 significant digits, very
    small values in e-notation, None and NaN blank."""
    if value is None or math.isnan(value):
        return ""
    if math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.1f}"
    if abs(value) >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_stats(stats: MetricStats, group_size: int) -> str:
    """``mean ± std``; ``mean`` alone for n = 1; ``(n=k)`` added when k differs from the
    group's number of points with results."""
    if stats.n == 0:
        return ""
    text = format_number(stats.mean)
    if stats.n > 1:
        text += f" ± {format_number(stats.std)}"
    if stats.n != group_size:
        text += f" (n={stats.n})"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def _write_csv(path: pathlib.Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def aggregated_table(groups: Sequence[Group], metrics: Sequence[str]) -> str:
    """The groups as plain text for a terminal: group, n and ``mean ± std`` per metric."""
    return format_table(
        [
            {"group": g.label, "n": g.num_done}
            | {m: format_stats(g.stats[m], g.num_done) for m in metrics}
            for g in groups
        ]
    )


def write_report(
    rows: Sequence[PointResult],
    groups: Sequence[Group],
    workdir: str | os.PathLike[str],
    *,
    metrics: Sequence[str],
    plot_metrics: Sequence[str],
    title: str,
    command: str,
) -> list[pathlib.Path]:
    """Writes the files listed in the module docstring to ``workdir``; returns their paths
    (no PNG without plot metrics)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    override_keys = list(dict.fromkeys(key for row in rows for key in row.overrides))

    points_csv = workdir / "results.csv"
    _write_csv(
        points_csv,
        ["point", "config", "status", "seconds", *override_keys, *metrics],
        [
            [row.name, row.config, row.status, row.seconds]
            + [format_value(row.overrides[k]) if k in row.overrides else "" for k in override_keys]
            + [row.metrics.get(m, "") for m in metrics]
            for row in rows
        ],
    )
    groups_csv = workdir / "aggregated.csv"
    _write_csv(
        groups_csv,
        ["group", "n", *(f"{m}_{part}" for m in metrics for part in ("mean", "std", "n"))],
        [
            [g.label, g.num_done]
            + [x for m in metrics for x in (g.stats[m].mean, g.stats[m].std, g.stats[m].n)]
            for g in groups
        ],
    )
    plot = plot_groups(groups, plot_metrics, workdir / "results.png", title=title)

    groups_md = markdown_table(
        ["group", "n", *metrics],
        [
            [g.label, str(g.num_done), *(format_stats(g.stats[m], g.num_done) for m in metrics)]
            for g in groups
        ],
    )
    points_md = markdown_table(
        ["point", "status", "seconds", *metrics],
        [
            [row.name, row.status, format_number(row.seconds)]
            + [format_number(row.metrics.get(m)) for m in metrics]
            for row in rows
        ],
    )
    sections = [
        f"# {title}",
        f"Command: `{command}`",
        "## Mean ± sample std over seeds\n\n"
        "n: points with results; a cell's (n=k) when fewer of them have that metric.\n\n"
        + groups_md,
        "## Points\n\n" + points_md,
    ]
    if plot is not None:
        sections.append(f"![{', '.join(plot_metrics)}]({plot.name})")
    markdown = workdir / "results.md"
    markdown.write_text("\n\n".join(sections) + "\n")
    return [points_csv, groups_csv, markdown] + ([plot] if plot else [])
