"""The MoE benchmark runs end to end on tiny shapes and reports a full table."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "benchmark_moe.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_moe", _PATH)
benchmark_moe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(benchmark_moe)


@pytest.mark.slow
def test_benchmark_reports_every_configuration_with_positive_times():
    rows = benchmark_moe.run_benchmark(
        experts=[4], top_ks=[1, 2], modes=["dropless", "capacity"], batch=2, seq_len=8,
        embed_dim=8, mlp_dim=8, capacity_factor=1.0, steps=1, peak_flops=140e9,
    )  # fmt: skip
    assert [(r["top_k"], r["mode"]) for r in rows] == [
        (1, "dropless"), (1, "capacity"), (2, "dropless"), (2, "capacity"),
    ]  # fmt: skip
    assert all(r["moe_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert all(r["dropped"] == 0 for r in rows if r["mode"] == "dropless")
    table = benchmark_moe.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 4 | 2 | capacity |" in table
