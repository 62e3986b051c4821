"""Metrics from results.json, mean ± std over seeds against numpy, and the written tables/plot."""

import csv
import logging
import math

import numpy as np
import pytest

from mllm_jax.sweeps.aggregate import (
    PointResult,
    aggregate,
    flatten,
    numeric_metrics,
    select_metrics,
)
from mllm_jax.sweeps.report import format_number, format_stats, write_report


def test_nested_results_flatten_to_slash_keys_and_only_numbers_are_metrics():
    results = {
        "causal": {"heldout_loss": 1.5, "eval": {"accuracy": 0.25}},
        "prefix": {"heldout_loss": 1.75},
        "steps": 3,
        "converged": True,
        "paths": {"plots": ["a.png"]},
        "name": "x",
    }
    assert flatten(results)["causal/eval/accuracy"] == 0.25
    assert flatten(results)["paths/plots"] == ["a.png"]
    assert numeric_metrics(results) == {
        "causal/heldout_loss": 1.5,
        "causal/eval/accuracy": 0.25,
        "prefix/heldout_loss": 1.75,
        "steps": 3.0,
    }


def _rows(rng):
    rows = []
    for projector in ("vce", "mlp", "none"):
        for seed in range(3 if projector != "none" else 1):
            metrics = {"loss": float(rng.normal(2, 0.3)), "accuracy": float(rng.uniform())}
            if projector == "mlp" and seed == 2:
                del metrics["accuracy"]
            overrides = {"model.projector": projector, "steps": 10, "seed": seed}
            name = f"{projector}-{seed}"
            rows.append(PointResult(name, "configs/x.py", overrides, "done", 1.0, metrics))
    return rows


def test_groups_of_seeds_match_numpy_mean_and_sample_std():
    rows = _rows(np.random.default_rng(0))
    groups = aggregate(rows, ["loss", "accuracy"])

    assert [g.label for g in groups] == [
        "model.projector=vce",
        "model.projector=mlp",
        "model.projector=none",
    ]
    assert [g.points for g in groups][0] == ["vce-0", "vce-1", "vce-2"]
    for group in groups:
        members = [row for row in rows if row.name in group.points]
        for metric in ("loss", "accuracy"):
            values = [row.metrics[metric] for row in members if metric in row.metrics]
            stats = group.stats[metric]
            assert stats.n == len(values)
            np.testing.assert_allclose(stats.mean, np.mean(values), rtol=1e-12)
            if len(values) > 1:
                np.testing.assert_allclose(stats.std, np.std(values, ddof=1), rtol=1e-12)
            else:
                assert math.isnan(stats.std)
    assert groups[1].stats["accuracy"].n == 2 and groups[1].num_done == 3


def test_groups_keep_configs_apart_and_other_seed_keys_can_be_named():
    rows = [
        PointResult("a", "configs/base.py", {"data.seed": 0}, "done", None, {"loss": 1.0}),
        PointResult("b", "configs/base.py", {"data.seed": 1}, "done", None, {"loss": 3.0}),
        PointResult("c", "configs/moe_lm.py", {"data.seed": 0}, "done", None, {"loss": 5.0}),
    ]
    groups = aggregate(rows, ["loss"], seed_keys=("data.seed",))
    assert [(g.label, g.stats["loss"].mean, g.stats["loss"].n) for g in groups] == [
        ("base", 2.0, 2),
        ("moe_lm", 5.0, 1),
    ]
    assert len(aggregate(rows, ["loss"])) == 3  # data.seed is not a seed key by default


def test_metric_patterns_select_in_pattern_order(caplog):
    rows = [
        PointResult("a", "c.py", {}, "done", None, {"eval_loss": 1.0, "train_loss": 2.0, "n": 3}),
        PointResult("b", "c.py", {}, "done", None, {"eval/accuracy": 0.5}),
    ]
    assert select_metrics(rows) == ["eval_loss", "train_loss", "n", "eval/accuracy"]
    assert select_metrics(rows, ["eval*", "*loss"]) == ["eval_loss", "eval/accuracy", "train_loss"]
    with caplog.at_level(logging.WARNING):
        assert select_metrics(rows, ["acc"]) == []
    assert "metric pattern 'acc' matches none" in caplog.text


@pytest.mark.parametrize(
    "value, text",
    [(3.0, "3"), (0.96412, "0.9641"), (1.23456, "1.235"), (27040.5, "27040.5"),
     (1.2e-5, "1.200e-05"), (None, ""), (math.nan, "")],
)  # fmt: skip
def test_numbers_are_formatted_compactly(value, text):
    assert format_number(value) == text


def test_report_files_hold_every_point_and_group(tmp_path):
    rows = _rows(np.random.default_rng(1))
    overrides = {"model.projector": "none", "steps": 10, "seed": 1}
    rows.append(PointResult("broken", "configs/x.py", overrides, "failed (exit 1)", 2.0, {}))
    metrics = ["loss", "accuracy"]
    groups = aggregate(rows, metrics)
    written = write_report(
        rows, groups, tmp_path, metrics=metrics, plot_metrics=["loss"], title="T", command="cmd"
    )
    assert [p.name for p in written] == [
        "results.csv",
        "aggregated.csv",
        "results.md",
        "results.png",
    ]

    with (tmp_path / "results.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [row["point"] for row in table] == [row.name for row in rows]
    assert table[-1]["status"] == "failed (exit 1)" and table[-1]["loss"] == ""
    assert float(table[0]["loss"]) == rows[0].metrics["loss"]
    assert table[0]["model.projector"] == "vce" and table[0]["seed"] == "0"

    with (tmp_path / "aggregated.csv").open() as file:
        aggregated = list(csv.DictReader(file))
    assert len(aggregated) == len(groups) == 3
    assert groups[2].points == ["none-0", "broken"] and aggregated[2]["n"] == "1"
    assert float(aggregated[0]["loss_std"]) == pytest.approx(groups[0].stats["loss"].std)

    markdown = (tmp_path / "results.md").read_text()
    vce = groups[0].stats["loss"]
    assert f"| model.projector=vce | 3 | {format_stats(vce, 3)} |" in markdown
    assert format_stats(vce, 3) == f"{format_number(vce.mean)} ± {format_number(vce.std)}"
    assert "(n=2)" in markdown  # the mlp group lacks one accuracy
    assert "| broken | failed (exit 1) | 2 |" in markdown
    assert "Command: `cmd`" in markdown and "![loss](results.png)" in markdown
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
