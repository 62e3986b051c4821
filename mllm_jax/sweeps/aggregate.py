"""Each point's status and metrics from its workdir, and mean ± std over points that differ
only in their seeds.

Metrics are the numbers of ``results.json`` with nested objects flattened to ``/``-joined keys
(``{"causal": {"heldout_loss": 1.6}}`` -> ``causal/heldout_loss``); strings, lists and bools are
not metrics.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mllm_jax.sweeps.points import describe
from mllm_jax.sweeps.runner import RESULTS_FILE, PlannedPoint, point_status, read_record


@dataclasses.dataclass(frozen=True)
class PointResult:
    """One point's row: its status, wall seconds (when the runner ran it) and metrics."""

    name: str
    config: str
    overrides: Mapping[str, Any]
    status: str
    seconds: float | None
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class MetricStats:
    """Mean and sample standard deviation (ddof 1; NaN for n < 2) of ``n`` values."""

    mean: float
    std: float
    n: int


@dataclasses.dataclass(frozen=True)
class Group:
    """Points equal but for their seed overrides: ``label`` names what sets the group apart;
    ``num_done`` counts its points that have results."""

    label: str
    points: list[str]
    num_done: int
    stats: dict[str, MetricStats]


def flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``results`` with nested mappings flattened to ``/``-joined keys."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numeric_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The real-number entries of ``flatten(results)`` as floats (bools excluded)."""
    return {
        key: float(value)
        for key, value in flatten(results).items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


def collect_results(planned: Sequence[PlannedPoint]) -> list[PointResult]:
    """Every point's status and metrics as its workdir holds them now."""
    rows = []
    for item in planned:
        status = point_status(item.directory)
        metrics: dict[str, float] = {}
        if status == "done":
            path = item.directory / RESULTS_FILE
            try:
                metrics = numeric_metrics(json.loads(path.read_text()))
            except (json.JSONDecodeError, AttributeError) as err:
                status = f"unreadable {RESULTS_FILE}: {err}"
        record = read_record(item.directory)
        seconds = record["seconds"] if record else None
        rows.append(
            PointResult(
                item.name, item.point.config, item.point.overrides, status, seconds, metrics
            )
        )
    return rows


def select_metrics(rows: Sequence[PointResult], patterns: Sequence[str] = ()) -> list[str]:
    """Metric names matching any fnmatch pattern, in pattern order, else first-seen order;
    every metric for no patterns. A pattern that matches nothing is logged."""
    available = list(dict.fromkeys(key for row in rows for key in row.metrics))
    if not patterns:
        return available
    selected: list[str] = []
    for pattern in patterns:
        matches = fnmatch.filter(available, pattern)
        if not matches:
            logging.warning("metric pattern %r matches none of %s", pattern, available)
        selected += [name for name in matches if name not in selected]
    return selected


def _stats(values: list[float]) -> MetricStats:
    if not values:
        return MetricStats(math.nan, math.nan, 0)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return MetricStats(float(np.mean(values)), std, len(values))


def aggregate(
    rows: Sequence[PointResult], metrics: Sequence[str], seed_keys: Sequence[str] = ("seed",)
) -> list[Group]:
    """Groups of rows equal in config and in all overrides but ``seed_keys``, first-seen order,
    each with the stats of every metric over its rows that have it.

    A group's label is the overrides (and the config, if they differ) that vary between rows,
    seeds left out; all its non-seed overrides when none vary.
    """
    keys = [{k: v for k, v in row.overrides.items() if k not in seed_keys} for row in rows]
    varying = {
        key
        for key in {k for overrides in keys for k in overrides}
        if len({repr(overrides.get(key)) for overrides in keys}) > 1
    }
    with_config = len({row.config for row in rows}) > 1
    grouped: dict[tuple, list[PointResult]] = {}
    labels: dict[tuple, str] = {}
    for row, overrides in zip(rows, keys, strict=True):
        identity = (row.config, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        grouped.setdefault(identity, []).append(row)
        shown = {k: v for k, v in overrides.items() if k in varying} if varying else overrides
        labels[identity] = describe(shown, row.config if with_config else None)
    return [
        Group(
            label=labels[identity],
            points=[row.name for row in members],
            num_done=sum(row.status == "done" for row in members),
            stats={
                metric: _stats([row.metrics[metric] for row in members if metric in row.metrics])
                for metric in metrics
            },
        )
        for identity, members in grouped.items()
    ]
